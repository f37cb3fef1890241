"""Pallas kernels for the chunked (gated) delta rule (DeltaNet, Gated DeltaNet).

The recurrence, per head, with a float32 state ``S`` [F, V]:

  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
  o_t = scale * q_t S_t.

Chunked (C tokens) in the UT form: with ``G`` the chunk-local inclusive
cumulative log gate, ``g_in = exp(G)`` (zero after a reset inside the
chunk), ``g_out_j = exp(G_C - G_j)`` (zero before a later reset) and

  L = diag(beta) (k k^T o exp(G_i - G_j)) strictly below the diagonal,
  T = (I + L)^{-1},  U = T diag(beta) v,  W = T diag(beta g_in) k,

the chunk-to-chunk pass is, chunk by chunk with ``S`` the entering state,

  v_c     = U - W S                                 ("new values")
  O       = scale (g_in o q S + (q k^T o D) v_c)    (D: causal decays)
  S      <- exp(G_C) S + (g_out o k)^T v_c.

Kernels (one ``pallas_call`` each; Triton on GPUs, interpret mode on CPU):

* ``_ut_kernel``: one program per chunk: ``L`` from ``k k^T``, ``T`` by
  blocks of 16 rows (diagonal blocks by forward substitution, the others
  by 16 x 16 matmuls: no powers of ``L``, so nearly aligned keys lose no
  accuracy), then ``U`` and ``W``.
* ``_fwd_kernel``: one program per (value block, head, batch) sweeping the
  chunks with the state in registers; the chunk's scores ``q k^T o D``,
  ``g_in`` and ``g_out`` are formed in the kernel.
* backward (custom_vjp): the forward sweep again, storing the state
  entering each chunk and the new values (states recomputed, not saved),
  then ``_bwd_kernel`` sweeping backwards with ``Lam``, the gradient of
  the state leaving the chunk:

    Gv  = scale (q k^T o D)^T dO + g_out o (k Lam)        (gradient of v_c)
    Lam <- scale q^T (g_in o dO) + exp(G_C) Lam - W^T Gv,

  storing ``Lam`` and ``Gv``; the products with the stored states (which
  sum over value columns) and the chunk-local terms then run as batched
  matmuls over all chunks at once, in XLA, as the pull-back of the
  chunk-local jnp forms of the operands (``jax.vjp``). The UT transform's
  backward is likewise the pull-back of its jnp form (``T`` from
  ``tril_inverse.unit_lower_inverse``, whose backward is a kernel too).

Depends only on jax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear_scan import tril_inverse
from pallas_kernels.linear_scan.kernels import (
    _block_weights, _dots, _intra_weights, _last, _pad_axis, _padded_dim)

__all__ = ["DeltaConfig", "delta_rule"]

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
_SUB = 16  # rows per block of the triangular inverse


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
  """Tiling of the delta-rule kernels.

  Attributes:
    chunk: C, tokens per chunk (a multiple of 16, power of two).
    block_v: value columns per forward program.
    block_v_bwd: value columns per backward program.
    num_warps, num_stages: Triton launch parameters of the forward sweep.
    num_warps_bwd, num_stages_bwd: the same for the backward sweep.
    num_warps_ut: warps of the UT-transform kernel.
  """
  chunk: int = 64
  block_v: int = 64
  block_v_bwd: int = 64
  num_warps: int = 4
  num_stages: int = 3
  num_warps_bwd: int = 4
  num_stages_bwd: int = 3
  num_warps_ut: int = 2


@dataclasses.dataclass(frozen=True)
class _S:
  scale: float
  chunk: int
  nc: int
  bv: int
  bvb: int
  warps: int
  stages: int
  warps_bwd: int
  stages_bwd: int
  warps_ut: int
  has_s0: bool
  has_seg: bool
  interpret: bool
  upcast: bool
  rep: int
  has_gate: bool = True  # (read by kernels._intra_weights)


def _params(s: _S, warps: int, stages: int):
  if s.interpret:
    return None
  return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------
# UT transform.


def _ut_kernel(*refs, s: _S):
  _dot, _, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, beta_ref, gc_ref, wq_ref = (next(it) for _ in range(6))
  rc_ref = next(it) if s.has_seg else None
  w_ref, u_ref, a_ref = next(it), next(it), next(it)
  dt = k_ref.dtype
  prec = None if s.interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  mm = lambda a, b: lax.dot_general(  # noqa: E731
      a, b, (((1,), (0,)), ((), ())), precision=prec,
      preferred_element_type=_F32)
  nb = s.chunk // _SUB
  blk = lambda i: pl.ds(i * _SUB, _SUB)  # noqa: E731
  rows = lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 0)
  cols = lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 1)
  k = [k_ref[blk(i), :] for i in range(nb)]
  beta = [beta_ref[blk(i)] for i in range(nb)]
  g = [gc_ref[blk(i)] for i in range(nb)]
  rc = [rc_ref[blk(i)] for i in range(nb)] if s.has_seg else None

  def lower(i, m):  # block (i, m), m <= i, of L
    mask = (cols < rows) if m == i else (rows >= 0)
    if s.has_seg:
      mask = jnp.logical_and(mask, rc[i][:, None] == rc[m][None, :])
    d = jnp.exp(jnp.where(mask, g[i][:, None] - g[m][None, :], -jnp.inf))
    return beta[i][:, None] * _dot_nt(k[i], k[m]) * d

  t = {}
  for i in range(nb):
    low = [lower(i, m) for m in range(i)]
    t[i, i] = tril_inverse._diag_inverse(lower(i, i))
    for j in range(i - 1, -1, -1):
      acc = jnp.zeros((_SUB, _SUB), _F32)
      for m in range(j, i):
        acc = acc + mm(low[m], t[m, j])
      t[i, j] = -mm(t[i, i], acc)
  rv = [(v_ref[blk(j), :].astype(_F32) * beta[j][:, None]).astype(dt)
        for j in range(nb)]
  rk = [(k[j].astype(_F32) * (beta[j] * wq_ref[blk(j)])[:, None]).astype(dt)
        for j in range(nb)]
  for i in range(nb):
    u = sum(_dot(t[i, j].astype(dt), rv[j]) for j in range(i + 1))
    w = sum(_dot(t[i, j].astype(dt), rk[j]) for j in range(i + 1))
    u_ref[blk(i), :] = u.astype(u_ref.dtype)
    w_ref[blk(i), :] = w.astype(w_ref.dtype)
  # The chunk's scores for the sweep, scale (q k^T o D) with D the causal
  # decays, by blocks of 16 rows (a whole [C, C] tile spills registers).
  k_all, g_all = k_ref[...], gc_ref[...]
  rc_all = rc_ref[...] if s.has_seg else None
  cols_c = lax.broadcasted_iota(jnp.int32, (_SUB, s.chunk), 1)
  rows_c = lax.broadcasted_iota(jnp.int32, (_SUB, s.chunk), 0)
  for i in range(nb):
    mask = cols_c <= rows_c + i * _SUB
    if s.has_seg:
      mask = jnp.logical_and(mask, rc[i][:, None] == rc_all[None, :])
    d = jnp.exp(jnp.where(mask, g[i][:, None] - g_all[None, :], -jnp.inf))
    a = _dot_nt(q_ref[blk(i), :], k_all) * d
    a_ref[blk(i), :] = (a * s.scale).astype(a_ref.dtype)


def _ut_call(q, k, v, beta, gc, wq, rc, s: _S):
  b, tp, kh, f = k.shape
  n = beta.shape[1]
  vp = v.shape[-1]
  c = s.chunk
  kv = lambda d: pl.BlockSpec(  # noqa: E731
      (None, c, None, d), lambda ci, n_, b_: (b_, ci, n_ // s.rep, 0))
  own = lambda d: pl.BlockSpec(  # noqa: E731
      (None, c, None, d), lambda ci, n_, b_: (b_, ci, n_, 0))
  tok = pl.BlockSpec((None, None, c), lambda ci, n_, b_: (b_, n_, ci))
  in_specs = [own(f), kv(f), kv(vp), tok, tok, tok]
  args = [q, k, v, beta, gc, wq]
  if s.has_seg:
    in_specs.append(pl.BlockSpec((None, c), lambda ci, n_, b_: (b_, ci)))
    args.append(rc)
  return pl.pallas_call(
      functools.partial(_ut_kernel, s=s),
      grid=(s.nc, n, b),
      in_specs=in_specs,
      out_specs=[own(f), own(vp), own(c)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, f), k.dtype),
                 jax.ShapeDtypeStruct((b, tp, n, vp), k.dtype),
                 jax.ShapeDtypeStruct((b, tp, n, c), k.dtype)],
      compiler_params=_params(s, s.warps_ut, 1),
      interpret=s.interpret,
      name="delta_rule_ut",
  )(*args)


def _chunks(x, c):
  """[B, Tp, H, D] -> [B, nc, C, H, D]; [B, N, Tp] -> [B, N, nc, C]."""
  if x.ndim == 4:
    b, tp = x.shape[:2]
    return x.reshape((b, tp // c, c) + x.shape[2:])
  return x.reshape(x.shape[:2] + (x.shape[2] // c, c))


def _same_segment(rc, c):
  """[B, nc, C, C] bool or None, from the reset counters [B, Tp]."""
  if rc is None:
    return None
  r = rc.reshape(rc.shape[0], -1, c)
  return r[..., :, None] == r[..., None, :]


def _mm(spec, x, y, s: _S, dt):
  """einsum with operands rounded to ``dt`` and a float32 result (upcast
  in interpret mode on a CPU, which has no bf16 x bf16 -> f32 matmul; the
  products are exact either way)."""
  x, y = x.astype(dt), y.astype(dt)
  if s.upcast or jnp.dtype(dt) == jnp.dtype(_F32):
    return jnp.einsum(spec, x.astype(_F32), y.astype(_F32), precision=_HI)
  return jnp.einsum(spec, x, y, preferred_element_type=_F32)


def _ut_jnp(q, k, v, beta, gc, wq, rc, s: _S):
  """The UT transform and scores in jnp (matmul operands rounded as in the
  kernel): the backward pass's pull-back."""
  c, dt = s.chunk, k.dtype
  qc = _chunks(q, c)
  kc = jnp.repeat(_chunks(k, c), s.rep, axis=3)  # [B, nc, C, N, F]
  vc = jnp.repeat(_chunks(v, c), s.rep, axis=3)
  bc, gcc, wqc = (_chunks(x, c) for x in (beta, gc, wq))  # [B, N, nc, C]
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  incl = jnp.tril(jnp.ones((c, c), bool))
  same = _same_segment(rc, c)
  if same is not None:
    strict = jnp.logical_and(strict, same[:, None])
    incl = jnp.logical_and(incl, same[:, None])
  diff = gcc[..., :, None] - gcc[..., None, :]
  kk = _mm("bcinf,bcjnf->bncij", kc, kc, s, dt)
  low = bc[..., None] * kk * jnp.exp(jnp.where(strict, diff, -jnp.inf))
  t = tril_inverse.unit_lower_inverse(low, interpret=s.interpret)
  rv = vc.astype(_F32) * jnp.moveaxis(bc, 1, 3)[..., None]
  rk = kc.astype(_F32) * jnp.moveaxis(bc * wqc, 1, 3)[..., None]
  u = _mm("bncij,bcjnv->bcinv", t, rv, s, dt)
  w = _mm("bncij,bcjnf->bcinf", t, rk, s, dt)
  a = s.scale * _mm("bcinf,bcjnf->bcinj", qc, kc, s, dt) * jnp.moveaxis(
      jnp.exp(jnp.where(incl, diff, -jnp.inf)), 1, 3)
  flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[3:])  # noqa: E731
  return flat(w), flat(u), flat(a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ut(q, k, v, beta, gc, wq, rc, s: _S):
  return tuple(_ut_call(q, k, v, beta, gc, wq, rc, s))


def _ut_fwd(q, k, v, beta, gc, wq, rc, s: _S):
  return _ut(q, k, v, beta, gc, wq, rc, s), (q, k, v, beta, gc, wq, rc)


def _ut_bwd(s: _S, res, cts):
  q, k, v, beta, gc, wq, rc = res
  _, pull = jax.vjp(lambda *a: _ut_jnp(*a, rc, s), q, k, v, beta, gc, wq)
  return tuple(pull(tuple(x.astype(_F32) for x in cts))) + (None,)


_ut.defvjp(_ut_fwd, _ut_bwd)


# ----------------------------------------------------------------------------
# Chunk-to-chunk sweeps. Layouts: q, w [B, Tp, N, F], k [B, Tp, K, F],
# u, dO [B, Tp, N, V]; per-token weights [B, N, Tp]; reset counters
# [B, Tp]; states [B, N, F, V].


def _fwd_kernel(*refs, s: _S, store: bool):
  """Forward sweep. ``store``: the backward pass's recomputation, writing
  the state entering each chunk and the new values instead of outputs."""
  _dot, _dot_tn, _ = _dots(s)
  it = iter(refs)
  q_ref, k_ref, a_ref, w_ref, u_ref, wq_ref, wk_ref, dec_ref = (
      next(it) for _ in range(8))
  s0_ref = next(it) if s.has_s0 else None
  if store:
    h_ref, vn_ref = next(it), next(it)
  else:
    o_ref, st_ref = next(it), next(it)
  c = s.chunk
  dt = w_ref.dtype
  shape = (w_ref.shape[-1], u_ref.shape[-1])
  state = s0_ref[...].astype(_F32) if s.has_s0 else jnp.zeros(shape, _F32)

  def body(i, state):
    rows = pl.ds(pl.multiple_of(i * c, c), c)
    sb = state.astype(dt)
    vn = u_ref[rows, :].astype(_F32) - _dot(w_ref[rows, :], sb)
    vb = vn.astype(dt)
    if store:
      h_ref[i] = sb
      vn_ref[rows, :] = vb
    else:
      o = (_dot(q_ref[rows, :], sb) * (wq_ref[rows] * s.scale)[:, None]
           + _dot(a_ref[rows, :], vb))
      o_ref[rows, :] = o.astype(o_ref.dtype)
    vw = (vn * wk_ref[rows][:, None]).astype(dt)
    return state * _last(dec_ref[rows]) + _dot_tn(k_ref[rows, :], vw)

  final = lax.fori_loop(0, s.nc, body, state)
  if not store:
    st_ref[...] = final


def _bwd_kernel(q_ref, k_ref, a_ref, w_ref, wq_ref, wk_ref, dec_ref, do_ref,
                dfin_ref, gv_ref, lam_ref, ds0_ref, *, s: _S):
  """Reverse sweep: Gv and Lam per chunk (see the module docstring)."""
  _dot, _dot_tn, _ = _dots(s)
  c = s.chunk
  dt = w_ref.dtype

  def body(i, lam):
    ci = s.nc - 1 - i
    rows = pl.ds(pl.multiple_of(ci * c, c), c)
    do = do_ref[rows, :]
    lb = lam.astype(dt)
    lam_ref[ci] = lb
    gv = (_dot_tn(a_ref[rows, :], do)
          + _dot(k_ref[rows, :], lb) * wk_ref[rows][:, None])
    gb = gv.astype(dt)
    gv_ref[rows, :] = gb
    dow = (do.astype(_F32) * (wq_ref[rows] * s.scale)[:, None]).astype(dt)
    return (_dot_tn(q_ref[rows, :], dow) + _last(dec_ref[rows]) * lam
            - _dot_tn(w_ref[rows, :], gb))

  ds0_ref[...] = lax.fori_loop(0, s.nc, body, dfin_ref[...].astype(_F32))


def _seq(tp, d, head, col):
  return pl.BlockSpec((None, tp, None, d),
                      lambda j, n, b: (b, 0, head(n), col(j)))


def _sweep_inputs(q, k, a, w, wq, wk, dec, s: _S):
  tp, f, c = q.shape[1], q.shape[-1], s.chunk
  same, kv, zero = (lambda n: n), (lambda n: n // s.rep), (lambda j: 0)
  tok = pl.BlockSpec((None, None, tp), lambda j, n, b: (b, n, 0))
  specs = [_seq(tp, f, same, zero), _seq(tp, f, kv, zero),
           _seq(tp, c, same, zero), _seq(tp, f, same, zero), tok, tok, tok]
  return specs, [q, k, a, w, wq, wk, dec]


def _state_spec(f, bv):
  return pl.BlockSpec((None, None, f, bv), lambda j, n, b: (b, n, 0, j))


def _chunk_states_spec(nc, f, bv):
  return pl.BlockSpec((None, None, nc, f, bv),
                      lambda j, n, b: (b, n, 0, 0, j))


def _fwd_call(q, k, a, w, u, wq, wk, dec, s0, s: _S, store: bool):
  b, tp, n, f = q.shape
  vp = u.shape[-1]
  bv = min(s.bv, vp)
  specs, args = _sweep_inputs(q, k, a, w, wq, wk, dec, s)
  col = _seq(tp, bv, lambda n_: n_, lambda j: j)
  specs = specs[:4] + [col] + specs[4:]
  args = args[:4] + [u] + args[4:]
  if s.has_s0:
    specs.append(_state_spec(f, bv))
    args.append(s0)
  if store:
    out_specs = [_chunk_states_spec(s.nc, f, bv), col]
    out_shape = [jax.ShapeDtypeStruct((b, n, s.nc, f, vp), w.dtype),
                 jax.ShapeDtypeStruct((b, tp, n, vp), w.dtype)]
  else:
    out_specs = [col, _state_spec(f, bv)]
    out_shape = [jax.ShapeDtypeStruct((b, tp, n, vp), _F32),
                 jax.ShapeDtypeStruct((b, n, f, vp), _F32)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, s=s, store=store),
      grid=(vp // bv, n, b),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, s.warps, s.stages),
      interpret=s.interpret,
      name="delta_rule_fwd" + ("_states" if store else ""),
  )(*args)


def _bwd_call(q, k, a, w, wq, wk, dec, do, dfin, s: _S):
  b, tp, n, f = q.shape
  vp = do.shape[-1]
  bv = min(s.bvb, vp)
  specs, args = _sweep_inputs(q, k, a, w, wq, wk, dec, s)
  col = _seq(tp, bv, lambda n_: n_, lambda j: j)
  specs += [col, _state_spec(f, bv)]
  args += [do, dfin]
  return pl.pallas_call(
      functools.partial(_bwd_kernel, s=s),
      grid=(vp // bv, n, b),
      in_specs=specs,
      out_specs=[col, _chunk_states_spec(s.nc, f, bv), _state_spec(f, bv)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, vp), w.dtype),
                 jax.ShapeDtypeStruct((b, n, s.nc, f, vp), w.dtype),
                 jax.ShapeDtypeStruct((b, n, f, vp), _F32)],
      compiler_params=_params(s, s.warps_bwd, s.stages_bwd),
      interpret=s.interpret,
      name="delta_rule_bwd",
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _sweep(q, k, a, w, u, wq, wk, dec, s0, s: _S):
  return tuple(_fwd_call(q, k, a, w, u, wq, wk, dec, s0, s, False))


def _sweep_fwd(q, k, a, w, u, wq, wk, dec, s0, s: _S):
  out = _sweep(q, k, a, w, u, wq, wk, dec, s0, s)
  return out, (q, k, a, w, u, wq, wk, dec, s0)


def _sweep_bwd(s: _S, res, cts):
  q, k, a, w, u, wq, wk, dec, s0 = res
  do, dfin = cts
  b, tp, n, f = q.shape
  kh = k.shape[2]
  c = s.chunk
  dt = w.dtype
  h, vn = _fwd_call(q, k, a, w, u, wq, wk, dec, s0, s, store=True)
  do = do.astype(dt)
  gv, lam, ds0 = _bwd_call(q, k, a, w, wq, wk, dec, do, dfin.astype(_F32),
                           s)
  # Products with the per-chunk states, parallel over chunks (XLA).
  doc, gvc, vnc = (_chunks(x, c) for x in (do, gv, vn))
  flat = lambda x: x.reshape((b, tp) + x.shape[3:])  # noqa: E731
  tok = lambda x: jnp.moveaxis(x, 1, 2)[..., None]  # [B,N,Tp] -> [B,Tp,N,1]  # noqa: E731
  dq_raw = flat(_mm("bcinv,bncfv->bcinf", doc, h, s, dt))  # dO h^T
  dk_raw = flat(_mm("bcinv,bncfv->bcinf", vnc, lam, s, dt))  # v_c Lam^T
  dw = -flat(_mm("bcinv,bncfv->bcinf", gvc, h, s, dt))
  da = flat(_mm("bcinv,bcjnv->bcinj", doc, vnc, s, dt))
  kr = jnp.repeat(k, s.rep, axis=2).astype(_F32)
  dq = dq_raw * tok(wq) * s.scale
  dwq = jnp.moveaxis(jnp.sum(dq_raw * q.astype(_F32), -1), 1, 2) * s.scale
  dk = dk_raw * tok(wk)
  dwk = jnp.moveaxis(jnp.sum(dk_raw * kr, -1), 1, 2)
  if s.rep > 1:
    dk = dk.reshape(b, tp, kh, s.rep, f).sum(3)
  dd = jnp.sum(h.astype(_F32) * lam.astype(_F32), axis=(3, 4))  # [B,N,nc]
  # The decay array repeats each chunk's decay on its rows; the kernels
  # read the last row only, so its gradient goes there.
  last = (jnp.arange(c) == c - 1).astype(_F32)
  ddec = (dd[..., None] * last).reshape(b, n, tp)
  return (dq.astype(q.dtype), dk.astype(k.dtype), da.astype(a.dtype),
          dw.astype(w.dtype), gv.astype(u.dtype), dwq, dwk, ddec,
          ds0 if s.has_s0 else None)


_sweep.defvjp(_sweep_fwd, _sweep_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _f32_tiles(cfg: DeltaConfig, default: bool) -> DeltaConfig:
  """float32 tiles are twice the bytes: narrower value blocks by default,
  and one pipeline stage always (three stages of [C, F] float32 q, k, w
  tiles overflow the H100's 227 KiB of shared memory)."""
  if default:
    cfg = dataclasses.replace(cfg, block_v=32, block_v_bwd=32)
  return dataclasses.replace(cfg, num_stages=1, num_stages_bwd=1)


def delta_rule(q, k, v, beta, log_gate=None, resets=None, *, scale: float,
               initial_state=None, config: DeltaConfig | None = None,
               chunk: int | None = None, interpret: bool | None = None):
  """The (gated) delta rule through the Pallas kernels.

  Args:
    q: [B, T, N, F] (float32, bfloat16 or float16).
    k: [B, T, K, F] (N % K == 0), same dtype.
    v: [B, T, K, V], same dtype.
    beta: [B, T, N] write strengths.
    log_gate: None or [B, T, N] log decays (<= 0).
    resets: None or bool [B, T]: the state is zeroed before token t.
    scale: output scale.
    initial_state: None or float32 [B, N, F, V].
    config: tiling (default ``DeltaConfig()``).
    chunk: overrides ``config.chunk``.
    interpret: Pallas interpret mode (default: unless on a GPU).

  Returns:
    ``(out float32 [B, T, N, V], final_state float32 [B, N, F, V])``,
    differentiable in q, k, v, beta, log_gate and initial_state.

  Raises:
    NotImplementedError: F or V above 256, a chunk that is not a power of
      two >= 16.

  >>> import jax.numpy as jnp
  >>> k = jnp.zeros((1, 32, 1, 16)).at[..., 0].set(1.0)
  >>> o, s = delta_rule(k, k, jnp.ones((1, 32, 1, 16)),
  ...                   jnp.full((1, 32, 1), 0.5), scale=1.0,
  ...                   interpret=True)
  >>> float(o[0, 0, 0, 0]), round(float(o[0, 31, 0, 0]), 6)
  (0.5, 1.0)
  """
  b, t, n, f = q.shape
  kh, vd = k.shape[2], v.shape[-1]
  cfg = config or DeltaConfig()
  if chunk is not None:
    cfg = dataclasses.replace(cfg, chunk=int(chunk))
  c = cfg.chunk
  if c < _SUB or c & (c - 1):
    raise NotImplementedError(f"chunk {c} is not a power of two >= 16")
  fp, vp = _padded_dim(f), _padded_dim(vd)
  if fp > 256 or vp > 256:
    raise NotImplementedError("feature and value dims above 256 are not "
                              "supported by the delta-rule kernels")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if jnp.dtype(q.dtype) == jnp.dtype(_F32):
    cfg = _f32_tiles(cfg, config is None)
  nc = -(-t // c)
  tp = nc * c
  s = _S(scale=float(scale), chunk=c, nc=nc, bv=min(cfg.block_v, vp),
         bvb=min(cfg.block_v_bwd, vp), warps=cfg.num_warps,
         stages=cfg.num_stages, warps_bwd=cfg.num_warps_bwd,
         stages_bwd=cfg.num_stages_bwd, warps_ut=cfg.num_warps_ut,
         has_s0=initial_state is not None, has_seg=resets is not None,
         interpret=bool(interpret),
         upcast=bool(interpret) and jax.default_backend() == "cpu",
         rep=n // kh)
  # Padding: beta = 0 and g = 0 leave the state untouched.
  qp = _pad_axis(_pad_axis(q, 3, fp), 1, tp)
  kp = _pad_axis(_pad_axis(k, 3, fp), 1, tp)
  vpd = _pad_axis(_pad_axis(v, 3, vp), 1, tp)
  bp = _pad_axis(jnp.moveaxis(beta.astype(_F32), 1, 2), 2, tp)
  if log_gate is None:
    g = jnp.zeros((b, n, tp), _F32)
  else:
    g = _pad_axis(jnp.moveaxis(log_gate.astype(_F32), 1, 2), 2, tp)
  r = None if resets is None else _pad_axis(resets.astype(bool), 1, tp)
  gc, wq, wk, dec = _block_weights(g, r, c)
  rc = None if r is None else jnp.cumsum(r.astype(jnp.int32), axis=-1)
  dec = jnp.repeat(dec, c, axis=-1)
  s0 = None
  if initial_state is not None:
    s0 = _pad_axis(_pad_axis(initial_state.astype(_F32), 2, fp), 3, vp)
  w, u, a = _ut(qp, kp, vpd, bp, gc, wq, rc, s)
  o, final = _sweep(qp, kp, a, w, u, wq, wk, dec, s0, s)
  return o[:, :t, :, :vd], final[:, :, :f, :vd]
