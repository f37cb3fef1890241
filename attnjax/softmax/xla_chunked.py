"""``implementation="xla_chunked"``: blockwise attention in pure JAX.

Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory"
(https://arxiv.org/abs/2112.05682), with the online softmax of FlashAttention:
queries are processed one block at a time (``lax.scan``); for each, only the
key blocks the static mask leaves visible are visited (``fori_loop`` over a
per-block list), carrying a running max ``m``, denominator ``l`` and
accumulator. Memory is O(T + S) per head.

The backward pass is a ``jax.custom_vjp`` that recomputes each block's
probabilities from the saved log-sum-exp, accumulating dQ per query block and
dK/dV (and dbias) into carried buffers: no [T, S] array is ever formed (except
dbias when the bias itself is [T, S]).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import masks as masks_lib
from attnjax.softmax.problem import Problem

__all__ = ["xla_chunked_attention", "xla_chunked_attention_bwd",
           "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV"]

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 1024


@dataclasses.dataclass(frozen=True)
class _Config:
  mask: masks_lib.Mask | None
  scale: float
  soft_cap: float | None
  t: int
  s: int
  block_q: int
  block_kv: int


@functools.lru_cache(maxsize=256)
def _block_lists(mask, t, s, bq, bk):
  """Per query block: the visible key blocks (padded) and their count."""
  nq, nk = math.ceil(t / bq), math.ceil(s / bk)
  if mask is None:
    visit = np.ones((nq, nk), bool)
  else:
    try:
      kinds, _ = mask.block_kinds(t, s, bq, bk)
      visit = kinds.max(axis=0) > masks_lib.EMPTY
    except NotImplementedError:  # unclassifiable mask: visit every tile
      visit = np.ones((nq, nk), bool)
  counts = visit.sum(axis=1).astype(np.int32)
  width = max(int(counts.max()), 1)
  lists = np.zeros((nq, width), np.int32)
  for i in range(nq):
    idx = np.nonzero(visit[i])[0]
    lists[i, :len(idx)] = idx
  return lists, counts


def _vary_like(x, *refs):
  """x marked varying over every manual axis any of refs varies over.

  Inside ``jax.shard_map`` (check_vma) loop carries must carry the same
  varying-axes type as the values flowing into them; fresh constants are
  invariant, so they are cast up front. A no-op outside shard_map.
  """
  axes = set()
  for r in refs:
    if r is not None:
      mat = getattr(jax.typeof(r), "mat", None)
      axes |= set(mat.varying) if mat is not None else set()
  mat = getattr(jax.typeof(x), "mat", None)
  have = set(mat.varying) if mat is not None else set()
  missing = tuple(a for a in axes if a not in have)
  return lax.pcast(x, missing, to="varying") if missing else x


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _pad_axis(x, axis, size):
  if x is None or x.shape[axis] in (1, size):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _slice(x, axis, start, size):
  """dynamic_slice along axis, or x itself where that axis is broadcast (1)."""
  if x.shape[axis] == 1:
    return x
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _heads5(x, kh, g):
  """[Bx, Nx, ...] -> [Bx, K|1, G|1, ...]."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kh, g, *x.shape[2:])


def _block_logits(cfg, qb, kb, bias_blk):
  """Scaled (biased, capped) logits [B, K, G, bq, bk] in float32.

  Returns (logits, capped_tanh) where capped_tanh is tanh(x / cap) or None.
  """
  x = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb,
                 preferred_element_type=jnp.float32,
                 precision=_precision(qb.dtype)) * cfg.scale
  if bias_blk is not None:
    x = x + bias_blk
  if cfg.soft_cap is None:
    return x, None
  th = jnp.tanh(x / cfg.soft_cap)
  return cfg.soft_cap * th, th


def _visibility(cfg, q_pos, k_pos, kh, g, mask_blk, qseg, kvseg, qlen, kvlen):
  """Bool visibility broadcastable to [B, K, G, bq, bk]."""
  qp, kp = q_pos[:, None], k_pos[None, :]
  vis = jnp.broadcast_to(kp < cfg.s, (len(q_pos), len(k_pos)))[None, None,
                                                                 None]
  if cfg.mask is not None:
    if cfg.mask.num_heads == 1:
      vis = vis & cfg.mask(qp, kp)[None, None, None]
    else:
      heads = jnp.arange(kh * g).reshape(kh, g, 1, 1)
      vis = vis & cfg.mask(qp[None, None], kp[None, None], heads)[None]
  if mask_blk is not None:
    vis = vis & mask_blk
  if qseg is not None:
    vis = vis & (qseg[:, None, None, :, None] == kvseg[:, None, None, None, :])
  if qlen is not None:
    vis = vis & (qp < qlen[:, None, None, None, None])
  if kvlen is not None:
    vis = vis & (kp < kvlen[:, None, None, None, None])
  return vis


def _dyn_blocks(cfg, i, j, kh, g, bias, mask_array, qseg, kvseg):
  """Slices the per-block pieces of the dynamic inputs."""
  bq, bk = cfg.block_q, cfg.block_kv
  qs, ks = i * bq, j * bk
  bias_blk = mask_blk = qseg_blk = kvseg_blk = None
  if bias is not None:
    bias_blk = _heads5(_slice(_slice(bias, 2, qs, bq), 3, ks, bk), kh, g)
    bias_blk = bias_blk.astype(jnp.float32)
  if mask_array is not None:
    mask_blk = _heads5(_slice(_slice(mask_array, 2, qs, bq), 3, ks, bk), kh, g)
  if qseg is not None:
    qseg_blk = lax.dynamic_slice_in_dim(qseg, qs, bq, 1)
    kvseg_blk = lax.dynamic_slice_in_dim(kvseg, ks, bk, 1)
  return bias_blk, mask_blk, qseg_blk, kvseg_blk


def _prepare(cfg, q, k, v, bias, mask_array, qseg, kvseg):
  """Pads everything to whole blocks; q -> [B, Tp, K, G, H]."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  tp = math.ceil(t / cfg.block_q) * cfg.block_q
  sp = math.ceil(cfg.s / cfg.block_kv) * cfg.block_kv
  q = _pad_axis(q, 1, tp).reshape(b, tp, kh, n // kh, h)
  k, v = _pad_axis(k, 1, sp), _pad_axis(v, 1, sp)
  bias = _pad_axis(_pad_axis(bias, 2, tp), 3, sp)
  mask_array = _pad_axis(_pad_axis(mask_array, 2, tp), 3, sp)
  if qseg is not None:
    qseg, kvseg = _pad_axis(qseg, 1, tp), _pad_axis(kvseg, 1, sp)
  return q, k, v, bias, mask_array, qseg, kvseg


def _forward(cfg, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks):
  b, t, n, _ = q.shape
  kh, hv = k.shape[2], v.shape[3]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_kv
  lists, counts = _block_lists(cfg.mask, t, cfg.s, bq, bk)
  lists, counts = jnp.asarray(lists), jnp.asarray(counts)
  qp, kp, vp, bias, mask_array, qseg, kvseg = _prepare(
      cfg, q, k, v, bias, mask_array, qseg, kvseg)
  nq = lists.shape[0]
  refs = (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks)
  if sinks is not None:
    m0 = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kh, g, 1),
                          (b, kh, g, bq))
    l0 = jnp.ones((b, kh, g, bq), jnp.float32)
  else:
    m0 = jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((b, kh, g, bq), jnp.float32)
  m0, l0 = _vary_like(m0, *refs), _vary_like(l0, *refs)

  def q_block(_, i):
    qb = lax.dynamic_slice_in_dim(qp, i * bq, bq, 1)
    q_pos = i * bq + jnp.arange(bq)

    def kv_step(jj, carry):
      m, l, acc = carry
      j = lists[i, jj]
      kb = lax.dynamic_slice_in_dim(kp, j * bk, bk, 1)
      vb = lax.dynamic_slice_in_dim(vp, j * bk, bk, 1)
      bias_blk, mask_blk, qs_blk, ks_blk = _dyn_blocks(
          cfg, i, j, kh, g, bias, mask_array, qseg, kvseg)
      x, _ = _block_logits(cfg, qb, kb, bias_blk)
      vis = _visibility(cfg, q_pos, j * bk + jnp.arange(bk), kh, g, mask_blk,
                        qs_blk, ks_blk, qlen, kvlen)
      x = jnp.where(vis, x, -jnp.inf)
      m_new = jnp.maximum(m, x.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      pr = jnp.exp(x - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + pr.sum(-1)
      pv = jnp.einsum("bkgqs,bskv->bkgqv", pr.astype(v.dtype), vb,
                      preferred_element_type=jnp.float32,
                      precision=_precision(v.dtype))
      return m_new, l, alpha[..., None] * acc + pv

    acc0 = _vary_like(jnp.zeros((b, kh, g, bq, hv), jnp.float32), *refs)
    m, l, acc = lax.fori_loop(0, counts[i], kv_step, (m0, l0, acc0))
    safe_l = jnp.where(l > 0, l, 1.0)
    out = acc / safe_l[..., None]
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = jnp.where(l > 0, m_safe + jnp.log(safe_l), -jnp.inf)
    return None, (out, lse)

  _, (out, lse) = lax.scan(q_block, None, jnp.arange(nq))
  # out: [nq, B, K, G, bq, Hv] -> [B, T, N, Hv]; lse: [nq, B, K, G, bq].
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, hv)[:, :t]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, n, nq * bq)[:, :, :t]
  if qlen is not None:
    valid = jnp.arange(t)[None, :] < qlen[:, None]
    out = jnp.where(valid[:, :, None, None], out, 0.0)
    lse = jnp.where(valid[:, None, :], lse, -jnp.inf)
  return out.astype(q.dtype), lse


def _backward(cfg, res, d_out, d_lse):
  (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks, out, lse) = res
  b, t, n, h = q.shape
  kh, hv = k.shape[2], v.shape[3]
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_kv
  lists, counts = _block_lists(cfg.mask, t, cfg.s, bq, bk)
  lists, counts = jnp.asarray(lists), jnp.asarray(counts)
  nq = lists.shape[0]
  qp, kp, vp, biasp, mask_array, qseg, kvseg = _prepare(
      cfg, q, k, v, bias, mask_array, qseg, kvseg)
  tp, sp = qp.shape[1], kp.shape[1]

  d_out = d_out.astype(jnp.float32)
  if qlen is not None:
    valid = jnp.arange(t)[None, :] < qlen[:, None]
    d_out = jnp.where(valid[:, :, None, None], d_out, 0.0)
  # D_i = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4), [B, N, T].
  delta = jnp.einsum("btnv,btnv->bnt", d_out, out.astype(jnp.float32))
  # d lse / d logits = p, so an lse cotangent enters as ds += p * d_lse.
  d_lse = jnp.zeros_like(lse) if d_lse is None else d_lse
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def pad_t(x):  # [B, N, T] -> [B, K, G, Tp]
    return _pad_axis(x, 2, tp).reshape(b, kh, g, tp)

  delta_p, lse_p, dlse_p = pad_t(delta), pad_t(lse_safe), pad_t(d_lse)
  do_p = _pad_axis(d_out, 1, tp).reshape(b, tp, kh, g, hv).astype(v.dtype)

  refs = res + (d_out, d_lse)
  dk0 = _vary_like(jnp.zeros(kp.shape, jnp.float32), *refs)
  dv0 = _vary_like(jnp.zeros(vp.shape, jnp.float32), *refs)
  dbias0 = None if bias is None else _vary_like(
      jnp.zeros(biasp.shape, jnp.float32), *refs)

  def q_block(carry, i):
    dk_all, dv_all, dbias_all = carry
    qb = lax.dynamic_slice_in_dim(qp, i * bq, bq, 1)
    dob = lax.dynamic_slice_in_dim(do_p, i * bq, bq, 1)
    lse_b = lax.dynamic_slice_in_dim(lse_p, i * bq, bq, 3)
    delta_b = lax.dynamic_slice_in_dim(delta_p, i * bq, bq, 3)
    dlse_b = lax.dynamic_slice_in_dim(dlse_p, i * bq, bq, 3)
    q_pos = i * bq + jnp.arange(bq)

    def kv_step(jj, inner):
      dq, dk_all, dv_all, dbias_all = inner
      j = lists[i, jj]
      kb = lax.dynamic_slice_in_dim(kp, j * bk, bk, 1)
      vb = lax.dynamic_slice_in_dim(vp, j * bk, bk, 1)
      bias_blk, mask_blk, qs_blk, ks_blk = _dyn_blocks(
          cfg, i, j, kh, g, biasp, mask_array, qseg, kvseg)
      x, th = _block_logits(cfg, qb, kb, bias_blk)
      vis = _visibility(cfg, q_pos, j * bk + jnp.arange(bk), kh, g, mask_blk,
                        qs_blk, ks_blk, qlen, kvlen)
      pr = jnp.where(vis, jnp.exp(x - lse_b[..., None]), 0.0)
      dv_blk = jnp.einsum("bkgqs,bqkgv->bskv", pr.astype(v.dtype), dob,
                          preferred_element_type=jnp.float32,
                          precision=_precision(v.dtype))
      dp = jnp.einsum("bqkgv,bskv->bkgqs", dob, vb,
                      preferred_element_type=jnp.float32,
                      precision=_precision(v.dtype))
      ds = pr * (dp - delta_b[..., None] + dlse_b[..., None])
      if th is not None:
        ds = ds * (1.0 - th * th)
      if dbias_all is not None:
        red = ds.reshape(b, n, bq, bk)
        axes = tuple(a for a in range(4) if biasp.shape[a] == 1)
        red = red.sum(axis=axes, keepdims=True)
        start = (0, 0, i * bq if biasp.shape[2] > 1 else 0,
                 j * bk if biasp.shape[3] > 1 else 0)
        cur = lax.dynamic_slice(dbias_all, start, red.shape)
        dbias_all = lax.dynamic_update_slice(dbias_all, cur + red, start)
      ds_c = ds.astype(q.dtype)
      dq = dq + jnp.einsum("bkgqs,bskh->bqkgh", ds_c, kb,
                           preferred_element_type=jnp.float32,
                           precision=_precision(q.dtype))
      dk_blk = jnp.einsum("bkgqs,bqkgh->bskh", ds_c, qb,
                          preferred_element_type=jnp.float32,
                          precision=_precision(q.dtype))
      cur = lax.dynamic_slice_in_dim(dk_all, j * bk, bk, 1)
      dk_all = lax.dynamic_update_slice_in_dim(dk_all, cur + dk_blk, j * bk, 1)
      cur = lax.dynamic_slice_in_dim(dv_all, j * bk, bk, 1)
      dv_all = lax.dynamic_update_slice_in_dim(dv_all, cur + dv_blk, j * bk, 1)
      return dq, dk_all, dv_all, dbias_all

    dq0 = _vary_like(jnp.zeros((b, bq, kh, g, h), jnp.float32), *refs)
    dq, dk_all, dv_all, dbias_all = lax.fori_loop(
        0, counts[i], kv_step, (dq0, dk_all, dv_all, dbias_all))
    return (dk_all, dv_all, dbias_all), dq

  (dk, dv, dbias), dq = lax.scan(q_block, (dk0, dv0, dbias0), jnp.arange(nq))
  dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(b, tp, n, h)[:, :t] * cfg.scale
  dk = dk[:, :cfg.s] * cfg.scale
  dv = dv[:, :cfg.s]
  if dbias is not None:
    dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype)
  dsinks = None
  if sinks is not None:
    # d lse_i / d sink = exp(sink - lse_i); d out_i / d sink = -that * out_i.
    w = jnp.where(jnp.isfinite(lse), jnp.exp(sinks.astype(jnp.float32)[
        None, :, None] - lse_safe), 0.0)
    dsinks = jnp.sum(w * (d_lse - delta), axis=(0, 2)).astype(sinks.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias,
          None, None, None, None, None, dsinks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen,
               sinks):
  return _forward(cfg, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen,
                  sinks)


def _attention_fwd(cfg, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen,
                   sinks):
  out, lse = _forward(cfg, q, k, v, bias, mask_array, qseg, kvseg, qlen,
                      kvlen, sinks)
  res = (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks, out, lse)
  return (out, lse), res


def _attention_bwd(cfg, res, cotangents):
  d_out, d_lse = cotangents
  return _backward(cfg, res, d_out, d_lse)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _config(p: Problem, block_q, block_kv) -> _Config:
  _, t, s, _, _, _, _ = p.shape
  bq = min(block_q or DEFAULT_BLOCK_Q, t)
  bk = min(block_kv or DEFAULT_BLOCK_KV, s)
  if bq <= 0 or bk <= 0:
    raise ValueError(f"block sizes must be positive, got {block_q=}, "
                     f"{block_kv=}")
  return _Config(mask=p.mask, scale=p.scale, soft_cap=p.logits_soft_cap, t=t,
                 s=s, block_q=bq, block_kv=bk)


def xla_chunked_attention(p: Problem, *, block_q: int | None = None,
                          block_kv: int | None = None):
  """Blockwise attention with O(T + S) memory. Returns (out, lse).

  Args:
    p: the validated problem.
    block_q: query block (default ``DEFAULT_BLOCK_Q``, capped at T).
    block_kv: key block (default ``DEFAULT_BLOCK_KV``, capped at S).
  """
  cfg = _config(p, block_q, block_kv)
  return _attention(cfg, p.q, p.k, p.v, p.bias, p.mask_array, p.q_segment_ids,
                    p.kv_segment_ids, p.q_lengths, p.kv_lengths, p.sinks)


def xla_chunked_attention_bwd(p: Problem, out, lse, d_out, d_lse=None, *,
                              block_q: int | None = None,
                              block_kv: int | None = None):
  """The backward pass alone, from residuals the caller supplies.

  ``out`` and ``lse`` need not come from this problem's own forward pass:
  given the output and log-sum-exp of a *larger* problem whose keys include
  this one's (ring attention's final residuals), the result is this key
  block's share of that problem's gradients (``p = exp(s - lse)`` and
  ``D = rowsum(dO * O)`` are global quantities).

  Args:
    p: the validated problem (its sinks, if any, enter only through lse).
    out: [B, T, N, Hv] output residual.
    lse: float32 [B, N, T] natural-log normaliser (-inf: row sees nothing).
    d_out: [B, T, N, Hv] output cotangent.
    d_lse: optional float32 [B, N, T] lse cotangent.
    block_q, block_kv: tiling, as in ``xla_chunked_attention``.

  Returns:
    ``(dq, dk, dv)`` in the input dtypes.
  """
  cfg = _config(p, block_q, block_kv)
  res = (p.q, p.k, p.v, p.bias, p.mask_array, p.q_segment_ids,
         p.kv_segment_ids, p.q_lengths, p.kv_lengths, None, out, lse)
  dq, dk, dv = _backward(cfg, res, d_out, d_lse)[:3]
  return dq, dk, dv
