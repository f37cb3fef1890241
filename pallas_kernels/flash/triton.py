"""Portable FlashAttention in Pallas: lowers through Triton, runs interpreted.

FlashAttention-2 (Dao, https://arxiv.org/abs/2307.08691), forward Algorithm
1 with the online softmax, backward Algorithm 2 split into a ``rowsum(dO*O)``
pre-pass, a dQ kernel and a dK/dV kernel (``triton_bwd.py``), joined with
``jax.custom_vjp``. Probabilities are recomputed block by block from the
saved log-sum-exp, so no [T, S] array exists in either pass (except dbias
when the bias itself is [T, S]).

Forward, per program (query block i, K/V head kh, batch b):

* the query tile is ``[block_t * g_pad, H]``: the ``G = N / K`` query heads
  that share K/V head ``kh`` are packed as extra rows, so each K/V block is
  read once for the whole group (GQA/MQA without repeating K/V);
* key blocks come from a per-query-block plan (``common.make_plan``): EMPTY
  tiles are never loaded, FULL tiles skip the static mask (and use unmasked
  loads), PARTIAL tiles (the causal diagonal, window edges, ragged ends)
  evaluate ``mask.kernel_predicate`` elementwise; the loops have dynamic trip
  counts since the plan is data the kernel reads;
* logits stay in base 2: ``scale * log2(e)`` is folded into one multiplier
  so ``p = exp2(s * c - m)`` is one FMA and one ``ex2``; dots take the
  input dtype (bf16/f16) with float32 accumulation (float32 inputs use
  full-precision dots, never TF32);
* bias, logits soft-cap, dense masks, segment ids, key lengths and sinks are
  fused; rows with nothing visible give zeros and ``lse = -inf``.

Example:

>>> import jax, jax.numpy as jnp
>>> from pallas_kernels.flash import triton as ft
>>> q = jax.random.normal(jax.random.key(0), (1, 40, 2, 32))
>>> out, lse = ft.flash_attention(q, q, q, scale=0.2, interpret=True,
...     block_sizes=ft.BlockSizes(block_q=16, block_kv=16))
>>> out.shape, lse.shape
((1, 40, 2, 32), (1, 2, 40))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import common
from pallas_kernels.flash import triton_bwd
from pallas_kernels.flash.common import BlockSizes, Spec

__all__ = ["BlockSizes", "flash_attention", "supported_dtypes"]

supported_dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------
# Forward kernel.
# ---------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, plan_ref, aux_ref, bias_ref, marr_ref,
                qseg_ref, kvseg_ref, qlen_ref, kvlen_ref, sinks_ref,
                o_ref, lse_ref, *, sp: Spec, plan: common.Plan, block_t: int,
                block_kv: int):
  pid, kh, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  i = (plan.num_rows - 1 - pid) if plan.reverse else pid
  hgrp = kh if plan.num_groups > 1 else 0
  t_ragged = sp.q_len % block_t != 0
  kv_ragged = sp.kv_len % block_kv != 0
  rows = common.Rows.make(i, kh, block_t=block_t, g_pad=sp.g_pad, g=sp.group,
                          seq_len=sp.q_len, ragged=t_ragged)
  m_rows = rows.size
  kv_len_b = common.scalar(kvlen_ref, b) if sp.kv_lengths else None
  tm = common.TileMath(sp, False, b, kh, bias_ref, marr_ref, aux_ref, plan,
                       kv_len_b)

  q = rows.load(q_ref, b, sp.hp, sp.head_dim)
  q_seg = rows.load_seq(qseg_ref, b, other=0) if sp.segment_ids else None

  n_full, n_part, f0, p0 = common.plan_counts(plan_ref, hgrp, i)
  if sp.q_lengths:
    # Whole query blocks past the length: nothing to compute.
    live = rows.t0 < common.scalar(qlen_ref, b)
    n_full, n_part = jnp.where(live, n_full, 0), jnp.where(live, n_part, 0)
  if sp.kv_lengths:
    limit = common.cdiv_dyn(kv_len_b, block_kv)
    n_full = common.clamp_range(n_full, f0, limit, plan.full_range)
    n_part = common.clamp_range(n_part, p0, limit, plan.partial_range)

  if sp.sinks:
    # The sink is one more logit with no value: it starts the running max.
    sink = rows.load_head(sinks_ref).astype(jnp.float32) * common.LOG2E
    m0 = jnp.broadcast_to(sink, (m_rows,))
    l0 = jnp.ones((m_rows,), jnp.float32)
  else:
    m0 = jnp.full((m_rows,), common.M_INIT, jnp.float32)
    l0 = jnp.zeros((m_rows,), jnp.float32)
  acc0 = jnp.zeros((m_rows, sp.hvp), jnp.float32)

  def body(jj, carry, *, partial):
    m, l, acc = carry
    j = common.plan_block(plan_ref, plan, hgrp, i, jj, full=not partial,
                          start=p0 if partial else f0)
    ragged = partial and kv_ragged
    kv_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
    k = common.load_kv(k_ref, b, j, kh, block_kv, sp.hp, sp.head_dim,
                       sp.kv_len, ragged)
    s = common.dot(q, k, trans_b=True, precision=sp.precision)
    x, c, _ = tm.scores(s, rows, kv_pos, ragged)
    kv_seg = (common.load_vec(kvseg_ref, b, j, block_kv, sp.kv_len, ragged)
              if sp.segment_ids else None)
    vis = tm.visibility(rows, kv_pos, i, j, partial=partial,
                        kv_ragged=ragged, q_seg=q_seg, kv_seg=kv_seg)
    if vis is not None:
      x = jnp.where(vis, x, -jnp.inf)
    # Online softmax (FA-2 Algorithm 1, lines 8-10), base 2.
    m_new = jnp.maximum(m, jnp.max(x, axis=1) * c)
    p = jnp.exp2(x * c - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    v = common.load_kv(v_ref, b, j, kh, block_kv, sp.hvp, sp.value_head_dim,
                       sp.kv_len, ragged)
    pv = common.dot(p.astype(v.dtype), v, precision=sp.precision)
    return m_new, l, acc * alpha[:, None] + pv

  carry = (m0, l0, acc0)
  carry = jax.lax.fori_loop(0, n_full, functools.partial(body, partial=False),
                            carry)
  m, l, acc = jax.lax.fori_loop(0, n_part,
                                functools.partial(body, partial=True), carry)

  # FA-2 Algorithm 1, lines 12-13; rows with nothing visible (l = 0) -> 0.
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  out = acc * (1.0 / l_safe)[:, None]
  lse = jnp.where(has, m + jnp.log2(l_safe), -jnp.inf)
  if sp.q_lengths:
    live = rows.t < common.scalar(qlen_ref, b)
    out = jnp.where(live[:, None], out, 0.0)
    lse = jnp.where(live, lse, -jnp.inf)
  rows.store(o_ref, b, out, sp.value_head_dim)
  rows.store_stat(lse_ref, b, lse)


def _forward(sp: Spec, bs: BlockSizes, q, k, v, bias, mask_array, qseg, kvseg,
             qlen, kvlen, sinks):
  """Returns (out [B, T, N, Hv], lse2 float32 [B, T, N], base-2)."""
  block_t, block_kv = common.tile_shape(bs.block_q, bs.block_kv, sp)
  plan, plan_arr, aux = common.make_plan(
      sp.mask, sp.q_len, sp.kv_len, block_t, block_kv, sp.num_kv_heads,
      sp.group)
  kernel = functools.partial(_fwd_kernel, sp=sp, plan=plan, block_t=block_t,
                             block_kv=block_kv)
  grid = (plan.num_rows, sp.num_kv_heads, sp.batch)
  ins = (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks)
  out_shape = (
      common.out_struct(q.shape[:3] + (sp.value_head_dim,), q.dtype, *ins),
      common.out_struct(q.shape[:3], jnp.float32, *ins),
  )
  return pl.pallas_call(
      kernel,
      grid=grid,
      out_shape=out_shape,
      interpret=sp.interpret,
      name="attnjax_flash_fwd",
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps,
                                           num_stages=bs.num_stages),
  )(q, k, v, jnp.asarray(plan_arr), None if aux is None else jnp.asarray(aux),
    bias, mask_array, qseg, kvseg, qlen, kvlen, sinks)


# ---------------------------------------------------------------------------
# custom_vjp.
# ---------------------------------------------------------------------------


def _to_natural_lse(lse2):
  """[B, T, N] base-2 -> [B, N, T] natural log (``-inf`` stays ``-inf``)."""
  return jnp.transpose(lse2, (0, 2, 1)) * common.LN2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(sp, bs, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen,
           sinks):
  out, lse2 = _forward(sp, bs, q, k, v, bias, mask_array, qseg, kvseg, qlen,
                       kvlen, sinks)
  return out, _to_natural_lse(lse2)


def _flash_fwd(sp, bs, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen,
               sinks):
  out, lse2 = _forward(sp, bs, q, k, v, bias, mask_array, qseg, kvseg, qlen,
                       kvlen, sinks)
  res = (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks, out,
         lse2)
  return (out, _to_natural_lse(lse2)), res


def _flash_bwd(sp, bs, res, cotangents):
  d_out, d_lse = cotangents
  (q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks, out,
   lse2) = res
  dq, dk, dv, dbias, dsinks = triton_bwd.backward(
      sp, bs, q, k, v, bias, mask_array, qseg, kvseg, qlen, kvlen, sinks, out,
      lse2, d_out, jnp.transpose(d_lse, (0, 2, 1)))
  return (dq, dk, dv, dbias, None, None, None, None, None, dsinks)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


def _bcast4(x, name, dims):
  if x is None:
    return None
  if x.ndim != 4 or any(a not in (1, d) for a, d in zip(x.shape, dims)):
    raise ValueError(f"{name} of shape {x.shape} must be 4-D and broadcast "
                     f"to [B, N, T, S]={list(dims)}")
  return x


def flash_attention(q, k, v, *, bias=None, mask_array=None,
                    q_segment_ids=None, kv_segment_ids=None, q_lengths=None,
                    kv_lengths=None, sinks=None, scale: float | None = None,
                    logits_soft_cap: float | None = None, mask=None,
                    block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
  """Blockwise softmax attention; differentiable (custom VJP).

  Args:
    q: [B, T, N, H] queries (float32, bfloat16 or float16).
    k: [B, S, K, H] keys, N % K == 0.
    v: [B, S, K, Hv] values.
    bias: optional float [B|1, N|1, T|1, S|1], added to the scaled logits.
    mask_array: optional bool [B|1, N|1, T|1, S|1], True = visible.
    q_segment_ids, kv_segment_ids: optional int32 [B, T] and [B, S].
    q_lengths, kv_lengths: optional int32 [B].
    sinks: optional float [N] sink logits.
    scale: logit scale (default ``1 / sqrt(H)``).
    logits_soft_cap: optional c > 0: logits -> ``c * tanh(logits / c)``.
    mask: optional static mask object with ``num_heads``,
      ``block_kinds(T, S, bq, bk, need_aux=True)`` and
      ``kernel_predicate(q_idx, kv_idx, aux)`` (``attnjax.masks`` objects).
    block_sizes: tiles and launch parameters (default ``BlockSizes()``).
    interpret: run the Pallas interpreter (CPU) instead of Triton.

  Returns:
    ``(out [B, T, N, Hv] in q's dtype, lse float32 [B, N, T])`` with the
    natural-log normaliser (``-inf`` for rows that see nothing and no sink).

  Raises:
    ValueError: malformed arguments.
    NotImplementedError: unsupported dtype or head dim, or a mask the tiles
      cannot follow (e.g. a misaligned BlockSparse layout).
  """
  b, t, n, h = q.shape
  if k.ndim != 4 or v.ndim != 4 or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"bad key shape {k.shape} for query {q.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"value {v.shape} and key {k.shape} disagree")
  s, kh, hv = k.shape[1], k.shape[2], v.shape[3]
  if n % kh:
    raise ValueError(f"query heads {n=} must be a multiple of {kh=}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if q.dtype not in supported_dtypes:
    raise NotImplementedError(f"dtype {q.dtype} is not supported")
  if max(h, hv) > MAX_HEAD_DIM:
    raise NotImplementedError(f"head dims {h}, {hv} exceed {MAX_HEAD_DIM}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids go together")
  dims = (b, n, t, s)
  bias = _bcast4(bias, "bias", dims)
  mask_array = _bcast4(mask_array, "mask_array", dims)
  if mask is not None and mask.num_heads not in (1, n):
    raise ValueError(f"mask distinguishes {mask.num_heads} heads, not {n}")
  if scale is None:
    scale = 1.0 / float(np.sqrt(h))
  i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  sp = Spec(
      batch=b, q_len=t, kv_len=s, num_heads=n, num_kv_heads=kh, head_dim=h,
      value_head_dim=hv, dtype=np.dtype(q.dtype).name, scale=float(scale),
      soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      bias_shape=None if bias is None else tuple(bias.shape),
      mask_array_shape=None if mask_array is None else tuple(
          mask_array.shape),
      segment_ids=q_segment_ids is not None, q_lengths=q_lengths is not None,
      kv_lengths=kv_lengths is not None, sinks=sinks is not None, mask=mask,
      interpret=bool(interpret))
  bs = block_sizes or BlockSizes()
  # Plans are built here (outside the VJP) so tiling errors surface early.
  for rows, bk, kv_major in ((bs.block_q, bs.block_kv, False),
                             (bs.block_q_dq, bs.block_kv_dq, False),
                             (bs.block_q_dkv, bs.block_kv_dkv, True)):
    bt, bk = common.tile_shape(rows, bk, sp)
    common.make_plan(mask, t, s, bt, bk, kh, n // kh, kv_major=kv_major)
  return _flash(sp, bs, q, k, v, bias, mask_array, i32(q_segment_ids),
                i32(kv_segment_ids), i32(q_lengths), i32(kv_lengths), sinks)
