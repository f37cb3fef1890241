"""Pallas chunked-scan kernels for per-key-channel gates (GLA).

Computes, for log gates ``g`` with one value per head and key channel,

  S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t,

chunk by chunk (C tokens). With ``G`` the chunk-local inclusive cumulative
log gate ([C, F] per chunk, float32) and ``L = G[C-1]`` the chunk's total,

  o_i = scale * (sum_{j <= i} A_ij v_j + (q_i * exp(G_i)) S),
  A_ij = sum_f q_if k_jf exp(G_if - G_jf),
  S <- exp(L) * S + (k * exp(L - G))^T v   (row f of S scaled by exp(L_f)).

``exp(G_i - G_j)`` does not factor out of the sum over channels safely
(``exp(-G_j)`` overflows under strong decay), so ``A`` is formed
elementwise over ``[16, 16, fb]`` blocks of channels on the diagonal
16-token sub-chunks, with every exponent <= 0, and by matmuls of factors
<= 1 between sub-chunks (the sweep layout treats its whole 16-token chunk
as one diagonal block); everything else is matmuls on decayed operands.
By default (``ChannelConfig.diag="factored"``) a diagonal block whose
sub-chunk decays by at most a bound in every channel is one matmul of
factors taken relative to the sub-chunk's middle row instead (on an H200
at T = 4k this took the forward from 4.37 to 2.75 ms and forward+backward
from 13.5 to 10.6 ms); ``diag="pairs"`` forms every diagonal block
elementwise.

Two layouts (``ChannelConfig.chunk_parallel``):

* Chunk-parallel (the default, C = 32; fla's ``chunk_gla`` structure, see
  the section "Chunk-parallel path" below). A scores kernel per chunk
  forms A by secondary chunking (matmuls between 16-token sub-chunks, and
  on the diagonal ones where their decay allows) and writes the decayed q
  and k;
  value-block sweeps then only carry the states, by matmuls, storing the
  state entering each chunk for the backward. Backward: a state-gradient
  sweep, a per-chunk kernel for dv and dA = scale * dO v^T, and a
  gradient kernel per (chunk, channel block) for dq, dk and the gate
  gradient.
* Sweep (``chunk_parallel=False``, meant for C = 16): each value-block
  sweep forms the intra-chunk scores itself, chunk by chunk; states are
  recomputed in the backward. A dq kernel per block of ``fb`` key channels
  sweeps forward (storing the state entering each chunk, for the gate
  gradient); a dk kernel per channel block and a dv kernel per value block
  sweep backward with their block of the state gradient dS. One program
  per (value or channel block, head, batch). Slower on an H200 (2x in the
  forward, 1.7x forward+backward at T = 4k: docs/linear/channel_gate.md);
  kept as a second implementation.

The gate gradient per channel, in both: with dG the gradient of the
chunk-local cumulative gates,

  dG_u = q_u * dq_u - k_u * dk_u  (+ on the chunk's last row
         sum_j k_j * dk_j[inter] + sum_v dS_out[:, v] exp(L) S_in[:, v]),

and dg is the reverse cumulative sum of dG within each chunk (the scalar
kernels' identity, one value per channel).

Resets (packed sequences): the chunk-parallel layout masks scores, decayed
operands and chunk decays at segment boundaries (see ``_seg_row``); the
sweep layout raises NotImplementedError (dispatch falls back). Depends
only on jax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear_scan.kernels import (_dots, _flat_call, _num_sms,
                                                _pad_axis, _padded_dim,
                                                env_overrides)

__all__ = ["ChannelConfig", "channel_gated_linear_attention"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
  """Tiling of the per-channel-gate kernels.

  Attributes:
    chunk: C, tokens per chunk (power of two, >= 16); the elementwise
      ``[C, C, fb]`` blocks grow with it.
    block_v: value columns per forward / dv program.
    block_f: key channels per elementwise block, and per dq / dk program.
    num_warps, num_stages: Triton launch parameters (forward).
    num_warps_bwd, num_stages_bwd: the same for the backward kernels.
    chunk_parallel: True (default): GLA's secondary chunking in
      chunk-parallel kernels: scores between 16-token sub-chunks by
      matmuls, elementwise only on the diagonal sub-blocks; the sweeps
      carry the states (the forward's stored for the backward) and do
      matmuls only; the gradients come from per-chunk kernels. Meant for
      ``chunk`` 32 (fastest on an H200) or 64. False: each sweep program
      forms the intra-chunk scores itself (elementwise, chunk by chunk);
      meant for ``chunk`` 16.
    separate_output: chunk-parallel only. False: the forward sweep forms
      the output as it goes (three matmuls per chunk on its sequential
      path). True: the sweep only carries and stores the states (one
      matmul per chunk, and split by ``block_f_state`` rows), and a
      chunk-parallel kernel forms the output from the stored states, as
      fla's ``chunk_gla`` does (more parallel work at batch 1, at the cost
      of writing and reading the per-chunk states).
    block_f_state: chunk-parallel only: key channels (state rows) per
      program of the state sweeps (the state-gradient sweep, and the
      forward sweep with ``separate_output``); None: all of them. The
      per-channel decay scales rows independently, so the rows split
      freely: at batch 1 this multiplies the sweeps' programs.
    diag: chunk-parallel only: how the scores and gradient kernels form
      the diagonal [16, 16] sub-blocks. "pairs": elementwise over
      [16, 16, block_f] tiles, one exp per (query, key, channel), every
      exponent <= 0. "factored": where a sub-chunk's total decay is at
      most 24 (4 for float16 inputs) in every channel of the block, by one
      matmul of q exp(G - G_m) and k exp(G_m - G) (m the sub-chunk's middle
      row; both factors within exp(+-bound)), elementwise otherwise (a
      runtime branch per sub-chunk), so any gate stays exact. The
      default: weak gates (GLA's log-sigmoid / 16) take the matmul. The
      gradient kernel's two diagonal matmuls take float32 operands (TF32
      x3 on the GPU): with bf16 ones the gate gradient, a difference
      q dq - k dk of large terms, came out 5-25% off once summed into a
      fixed decay's gradient (run31). "factored_rows": the same, but the
      gradient kernel's elementwise fallback loops over the 16 key rows
      (one [16, block_f] tile of exponentials a step, used for both dq
      and dk) instead of forming a [16, 16, block_f] tile. The rarely
      taken fallback set the kernel's register count: compiled for an
      H100 (block_f 32, 4 warps) 255 registers, 168 with the loop, so 3
      programs fit a multiprocessor instead of 2 (and block_f 64 no longer
      spills). Opt-in, not yet timed on a GPU.
    sweep_unroll: chunk-parallel only: chunks per loop iteration of the
      sequential sweeps (forward states and the state gradient), their
      state-independent matmuls issued together ahead of the carried
      updates. On an H200 (run30) 2 took the forward+backward at T = 4k
      from 10.6 to 10.3 ms; at T = 64k, B = 1 with the separate layout 4
      took the states sweep from 3.03 to 2.08 ms (the auto layout's).
    seq_splits: chunk-parallel only: the sweeps (forward and state
      gradient) run on this many splits of the chunks at once, for batch
      1, where they have few programs and each walks every chunk. T is
      padded to a multiple of ``seq_splits * chunk``. How the splits are
      joined depends on the layout:

      * ``separate_output=True``: the state sweeps run each split from a
        zero state; a short pass over the splits carries the states
        between them and each stored state gets its split's entering
        state (or gradient) decayed to it: added by the output kernel as
        it loads each tile in a forward without gradient, by one XLA pass
        over the stored states and one over the state gradients for the
        backward (adding it in the dv/dA and gradient kernels was slower,
        run38). The auto layout uses 4 when 4x the programs fit the
        multiprocessors (T = 64k, B = 1 on an H200: forward+backward
        13.8 -> 12.5 ms, run34).
      * ``separate_output=False`` (the fused sweep): two passes. A
        states-only sweep of each split from zero keeps just its end
        state; the short pass carries them; then the fused sweep runs
        each split from the state that really enters it, so the outputs
        and stored states need no join; the state-gradient sweep the same
        way backwards. The extra pass reads k and v once more but stores
        nothing. Not yet timed on a GPU (scripts/gpu/channel_profile.py,
        ``fsplit`` configurations).
    kernel_cumsum: chunk-parallel only: the scores and gradient kernels
      sum the log gates within each 16-token sub-chunk themselves (from
      the raw gates they read) instead of reading sums that an XLA pass
      wrote, and the gradient kernel sums the gate gradient back over
      each chunk's later rows instead of an XLA pass doing it (each pass
      a read and a write of a [B, T, N, F] float32 array; the residual
      is the raw gates). None (the default): on with the chunk-parallel
      layout. On an H200 (run38, B*T = 64k, H = 128, bf16) it took the
      forward at T = 4k from 2.64 to 1.44 ms (the scores kernel 1.43 ->
      0.87 ms, and no XLA pass) and the forward+backward from 10.37 to
      8.58 ms; False keeps the XLA passes.
    early_decay: chunk-parallel only: the sequential sweeps (forward
      states and state gradient) load each chunk's [F] decay with the
      chunk's state-independent loads and matmuls (``sweep_unroll`` of
      them ahead of the updates) instead of inside the carried update,
      where the load sat on the chain from chunk to chunk: Triton's
      pipeliner leaves it (and one more [F] load) synchronous inside the
      loop (the states sweep's compiled TTGIR for an H100, T = 16k, read
      without a GPU). Opt-in, not yet timed.
  """
  chunk: int = 32
  block_v: int = 64
  block_f: int = 32
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  chunk_parallel: bool = True
  separate_output: bool = False
  block_f_state: int | None = None
  diag: str = "factored"
  sweep_unroll: int = 2
  seq_splits: int = 1
  kernel_cumsum: bool | None = None
  early_decay: bool = False


_SUB = 16  # secondary chunk (sub-chunk) of the chunk-parallel kernels


def _factor_bound(dtype) -> float:
  """Largest sub-chunk decay (in every channel) at which "factored"
  diagonal blocks are formed by a matmul: the factors stay within
  exp(+-bound) of the operands, finite in bfloat16 / float32 at 24 and in
  float16 at 4."""
  return 4.0 if jnp.dtype(dtype) == jnp.dtype(jnp.float16) else 24.0


@dataclasses.dataclass(frozen=True)
class _S:
  scale: float
  chunk: int
  nc: int  # chunks
  bv: int
  bf: int
  warps: int
  stages: int
  warps_bwd: int
  stages_bwd: int
  has_s0: bool
  interpret: bool
  upcast: bool
  rep: int
  par: bool = False  # chunk_parallel
  sep: bool = False  # separate_output
  seg: bool = False  # resets (chunk-parallel layout only)
  fs: int = 0  # state rows per program of the state sweeps
  factor_bound: float = 0.0  # > 0: diag == "factored"
  unroll: int = 1  # chunks per loop iteration of the chunk-parallel sweeps
  splits: int = 1  # sequence splits of the chunk-parallel sweeps
  kcs: bool = False  # kernel_cumsum: the gate refs hold raw log gates
  rows_fallback: bool = False  # diag == "factored_rows"
  early: bool = False  # early_decay


def _params(s: _S, bwd: bool = False):
  if s.interpret:
    return None
  if bwd:
    return plgpu.CompilerParams(num_warps=s.warps_bwd,
                                num_stages=s.stages_bwd)
  return plgpu.CompilerParams(num_warps=s.warps, num_stages=s.stages)


def _last_row(x):
  """x[-1] of a [C, D] block, as a masked reduction over rows."""
  c = x.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(rows == c - 1, x, 0.0), axis=0)


def _pair_decay(g, transpose: bool):
  """[C, C, fb]: exp(g_i - g_j) where j <= i, else 0 (rows i, columns j);
  transposed (rows j, columns i) when ``transpose``."""
  c = g.shape[0]
  i = lax.broadcasted_iota(jnp.int32, (c, c, 1), 0)
  j = lax.broadcasted_iota(jnp.int32, (c, c, 1), 1)
  if not transpose:
    diff = g[:, None, :] - g[None, :, :]
    mask = j <= i
  else:
    diff = g[None, :, :] - g[:, None, :]
    mask = i <= j
  return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def _intra(q_ref, k_ref, gates, rows, s: _S, f: int, loop: bool = False):
  """A [C, C] float32: A_ij = sum_f q_if k_jf exp(G_if - G_jf), j <= i,
  accumulated over blocks of ``s.bf`` channels loaded from the refs (in a
  loop rather than unrolled when ``loop``: a smaller Triton program).
  ``gates``: the cumulative log gates (a ``_Gates``)."""
  c = s.chunk

  def block(cols, a):
    qb = q_ref[rows, cols].astype(_F32)
    kb = k_ref[rows, cols].astype(_F32)
    e = _pair_decay(gates.block(rows, cols), transpose=False)
    return a + jnp.sum(qb[:, None, :] * kb[None, :, :] * e, axis=2)

  a = jnp.zeros((c, c), _F32)
  if loop:
    return lax.fori_loop(
        0, f // s.bf,
        lambda j, a: block(pl.ds(pl.multiple_of(j * s.bf, s.bf), s.bf), a),
        a)
  for f0 in range(0, f, s.bf):
    a = block(pl.ds(f0, s.bf), a)
  return a


# ----------------------------------------------------------------------------
# Kernels. Grid (value or channel block, head, batch).


def _fwd_kernel(*refs, s: _S):
  _dot, _dot_tn, _ = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, gc_ref = next(it), next(it), next(it), next(it)
  s0_ref = next(it) if s.has_s0 else None
  o_ref, st_ref = next(it), next(it)
  c, f = s.chunk, q_ref.shape[-1]
  state = (s0_ref[...].astype(_F32) if s.has_s0 else
           jnp.zeros(st_ref.shape, _F32))

  def body(i, state):
    rows = pl.ds(pl.multiple_of(i * c, c), c)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g = gc_ref[rows, :]
    a = _intra(q_ref, k_ref, _Gates(gc_ref, raw=False), rows, s, f)
    o = _dot((a * s.scale).astype(v.dtype), v)
    qd = (q.astype(_F32) * jnp.exp(g)).astype(q.dtype)
    o = o + s.scale * _dot(qd, state.astype(q.dtype))
    o_ref[rows, :] = o.astype(o_ref.dtype)
    last = _last_row(g)
    kd = (k.astype(_F32) * jnp.exp(last[None, :] - g)).astype(k.dtype)
    return state * jnp.exp(last)[:, None] + _dot_tn(kd, v)

  st_ref[...] = lax.fori_loop(0, s.nc, body, state)


def _dq_kernel(*refs, s: _S):
  """dq (and q * dq, the per-chunk entering states) for one channel block."""
  _dot, _dot_tn, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, gc_ref = (next(it), next(it), next(it),
                                         next(it), next(it))
  s0_ref = next(it) if s.has_s0 else None
  dq_ref, dgq_ref, hs_ref = next(it), next(it), next(it)
  c = s.chunk
  shape = (q_ref.shape[-1], v_ref.shape[-1])
  state = s0_ref[...].astype(_F32) if s.has_s0 else jnp.zeros(shape, _F32)

  def body(i, state):
    rows = pl.ds(pl.multiple_of(i * c, c), c)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[
        rows, :]
    g = gc_ref[rows, :]
    da = _dot_nt(do, v) * s.scale  # da_ij = scale * do_i . v_j
    e = _pair_decay(g, transpose=False)
    dq = jnp.sum(da[:, :, None] * k.astype(_F32)[None, :, :] * e, axis=1)
    state_in = state.astype(do.dtype)
    hs_ref[i] = state_in.astype(hs_ref.dtype)
    dq = dq + s.scale * _dot_nt(do, state_in) * jnp.exp(g)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dgq_ref[rows, :] = q.astype(_F32) * dq
    last = _last_row(g)
    kd = (k.astype(_F32) * jnp.exp(last[None, :] - g)).astype(k.dtype)
    return state * jnp.exp(last)[:, None] + _dot_tn(kd, v)

  lax.fori_loop(0, s.nc, body, state)


def _dk_kernel(*refs, s: _S):
  """dk and k * dk (minus the chunk constant) for one channel block,
  sweeping chunks backwards with dS[block, :]."""
  _dot, _dot_tn, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, gc_ref = (next(it), next(it), next(it),
                                         next(it), next(it))
  hs_ref, ds_ref = next(it), next(it)
  dk_ref, dgk_ref = next(it), next(it)
  c = s.chunk

  def body(i, dstate):
    ci = s.nc - 1 - i
    rows = pl.ds(pl.multiple_of(ci * c, c), c)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[
        rows, :]
    g = gc_ref[rows, :]
    dat = _dot_nt(v, do) * s.scale  # rows j (keys), columns i (queries)
    et = _pair_decay(g, transpose=True)
    dk = jnp.sum(dat[:, :, None] * q.astype(_F32)[None, :, :] * et, axis=1)
    last = _last_row(g)
    wk = jnp.exp(last[None, :] - g)
    inter = _dot_nt(v, dstate.astype(v.dtype)) * wk
    dk = dk + inter
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    kf = k.astype(_F32)
    dec = jnp.exp(last)
    spans = jnp.sum(dstate * hs_ref[ci].astype(_F32), axis=1) * dec
    e = jnp.sum(kf * inter, axis=0) + spans
    is_last = lax.broadcasted_iota(jnp.int32, kf.shape, 0) == c - 1
    dgk_ref[rows, :] = kf * dk - jnp.where(is_last, e[None, :], 0.0)
    qd = (q.astype(_F32) * (jnp.exp(g) * s.scale)).astype(q.dtype)
    return dstate * dec[:, None] + _dot_tn(qd, do)

  lax.fori_loop(0, s.nc, body, ds_ref[...].astype(_F32))


def _dv_kernel(*refs, s: _S):
  """dv for one value block, sweeping chunks backwards with dS[:, block];
  the state gradient entering the sequence comes out (initial state)."""
  _dot, _dot_tn, _ = _dots(s)
  it = iter(refs)
  q_ref, k_ref, do_ref, gc_ref, ds_ref = (next(it), next(it), next(it),
                                          next(it), next(it))
  dv_ref, dsout_ref = next(it), next(it)
  c, f = s.chunk, q_ref.shape[-1]

  def body(i, dstate):
    rows = pl.ds(pl.multiple_of((s.nc - 1 - i) * c, c), c)
    q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
    g = gc_ref[rows, :]
    a = _intra(q_ref, k_ref, _Gates(gc_ref, raw=False), rows, s, f)
    last = _last_row(g)
    kd = (k.astype(_F32) * jnp.exp(last[None, :] - g)).astype(k.dtype)
    dv = _dot_tn((a * s.scale).astype(do.dtype), do) + _dot(
        kd, dstate.astype(k.dtype))
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    qd = (q.astype(_F32) * (jnp.exp(g) * s.scale)).astype(q.dtype)
    return dstate * jnp.exp(last)[:, None] + _dot_tn(qd, do)

  dsout_ref[...] = lax.fori_loop(0, s.nc, body, ds_ref[...].astype(_F32))


# ----------------------------------------------------------------------------
# pallas_call wrappers. q, dO, gc [B, Tp, N, *]; k, v [B, Tp, K, *].


def _index_maps(s: _S):
  """(query head -> key/value head, identity, zero, identity) for _blk."""
  return (lambda n: n // s.rep), (lambda n: n), (lambda j: 0), (lambda j: j)


def _blk(tp, width, head_fn, col_fn):
  return pl.BlockSpec((None, tp, None, width),
                      lambda j, n, b: (b, 0, head_fn(n), col_fn(j)))


def _state(rows, cols, by_row: bool):
  if by_row:
    return pl.BlockSpec((None, None, rows, cols),
                        lambda j, n, b: (b, n, j, 0))
  return pl.BlockSpec((None, None, rows, cols), lambda j, n, b: (b, n, 0, j))


def _fwd_call(q, k, v, gc, s0, s: _S):
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  kv, same, zero, col = _index_maps(s)
  in_specs = [_blk(tp, f, same, zero), _blk(tp, f, kv, zero),
              _blk(tp, s.bv, kv, col), _blk(tp, f, same, zero)]
  args = [q, k, v, gc]
  if s.has_s0:
    in_specs.append(_state(f, s.bv, by_row=False))
    args.append(s0)
  return _flat_call(
      functools.partial(_fwd_kernel, s=s),
      grid=(vp // s.bv, n, b),
      in_specs=in_specs,
      out_specs=[_blk(tp, s.bv, same, col), _state(f, s.bv, by_row=False)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, vp), q.dtype),
                 jax.ShapeDtypeStruct((b, n, f, vp), _F32)],
      compiler_params=_params(s),
      interpret=s.interpret,
      name="linear_scan_channel_fwd",
  )(*args)


def _channel_inputs(q, k, v, do, gc, s: _S):
  tp, vp = q.shape[1], v.shape[-1]
  kv, same, zero, col = _index_maps(s)
  specs = [_blk(tp, s.bf, same, col), _blk(tp, s.bf, kv, col),
           _blk(tp, vp, kv, zero), _blk(tp, vp, same, zero),
           _blk(tp, s.bf, same, col)]
  return specs, [q, k, v, do, gc]


def _dq_call(q, k, v, do, gc, s0, s: _S):
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  in_specs, args = _channel_inputs(q, k, v, do, gc, s)
  if s.has_s0:
    in_specs.append(_state(s.bf, vp, by_row=True))
    args.append(s0)
  blk = _blk(tp, s.bf, lambda x: x, lambda j: j)
  return _flat_call(
      functools.partial(_dq_kernel, s=s),
      grid=(f // s.bf, n, b),
      in_specs=in_specs,
      out_specs=[blk, blk, pl.BlockSpec((None, None, s.nc, s.bf, vp),
                                        lambda j, n_, b_: (b_, n_, 0, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape, _F32),
                 jax.ShapeDtypeStruct((b, n, s.nc, f, vp), q.dtype)],
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_channel_dq",
  )(*args)


def _dk_call(q, k, v, do, gc, hs, dfinal, s: _S):
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  in_specs, args = _channel_inputs(q, k, v, do, gc, s)
  in_specs += [pl.BlockSpec((None, None, s.nc, s.bf, vp),
                            lambda j, n_, b_: (b_, n_, 0, j, 0)),
               _state(s.bf, vp, by_row=True)]
  args += [hs, dfinal]
  blk = _blk(tp, s.bf, lambda x: x, lambda j: j)
  return _flat_call(
      functools.partial(_dk_kernel, s=s),
      grid=(f // s.bf, n, b),
      in_specs=in_specs,
      out_specs=[blk, blk],
      out_shape=[jax.ShapeDtypeStruct(q.shape, k.dtype),
                 jax.ShapeDtypeStruct(q.shape, _F32)],
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_channel_dk",
  )(*args)


def _dv_call(q, k, do, gc, dfinal, s: _S):
  b, tp, n, f = q.shape
  vp = do.shape[-1]
  kv, same, zero, col = _index_maps(s)
  in_specs = [_blk(tp, f, same, zero), _blk(tp, f, kv, zero),
              _blk(tp, s.bv, same, col), _blk(tp, f, same, zero),
              _state(f, s.bv, by_row=False)]
  return _flat_call(
      functools.partial(_dv_kernel, s=s),
      grid=(vp // s.bv, n, b),
      in_specs=in_specs,
      out_specs=[_blk(tp, s.bv, same, col), _state(f, s.bv, by_row=False)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, vp), do.dtype),
                 jax.ShapeDtypeStruct((b, n, f, vp), _F32)],
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_channel_dv",
  )(q, k, do, gc, dfinal)


# ----------------------------------------------------------------------------
# custom_vjp core on padded arrays; gc = chunk-local cumulative log gates.


def _chunk_cumsum(g, chunk):
  b, tp, n, f = g.shape
  gc = jnp.cumsum(g.reshape(b, tp // chunk, chunk, n, f), axis=2)
  return gc.reshape(b, tp, n, f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, g, s0, s: _S):
  return _fwd_call(q, k, v, _chunk_cumsum(g, s.chunk), s0, s)


def _core_fwd(q, k, v, g, s0, s: _S):
  gc = _chunk_cumsum(g, s.chunk)
  return _fwd_call(q, k, v, gc, s0, s), (q, k, v, gc, s0)


def _core_bwd(s: _S, res, cts):
  q, k, v, gc, s0 = res
  do, dfinal = cts
  b, tp, n, f = q.shape
  kh, vp = k.shape[2], v.shape[-1]
  do = do.astype(q.dtype)
  dfinal = dfinal.astype(_F32)
  dq, dgq, hs = _dq_call(q, k, v, do, gc, s0, s)
  dk, dgk = _dk_call(q, k, v, do, gc, hs, dfinal, s)
  dv, ds0 = _dv_call(q, k, do, gc, dfinal, s)
  if s.rep > 1:
    dk = dk.astype(_F32).reshape(b, tp, kh, s.rep, f).sum(3).astype(k.dtype)
    dv = dv.astype(_F32).reshape(b, tp, kh, s.rep, vp).sum(3).astype(
        v.dtype)
  rows = (dgq - dgk).reshape(b, tp // s.chunk, s.chunk, n, f)
  dg = jnp.flip(jnp.cumsum(jnp.flip(rows, 2), 2), 2).reshape(b, tp, n, f)
  return dq, dk, dv, dg, (ds0 if s.has_s0 else None)


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------
# Chunk-parallel path (ChannelConfig.chunk_parallel): GLA's secondary
# chunking. The log gates come as cumulative sums local to 16-token
# sub-chunks (gs); with Tot_c the total of sub-chunk c, the chunk-level
# G_i = sum_{c < a} Tot_c + gs_i for token i of sub-chunk a. Every decay
# factor is rebuilt from sub-chunk-local differences and whole totals, so
# no exponent is a difference of two large chunk-level sums (which would
# carry ~C * |g| * eps of cancellation error). Between sub-chunks a > b,
# through the token r before sub-chunk a (G_r = sum_{c < a} Tot_c):
#
#   A_ab = (q_a exp(gs_a)) (k_b exp(Tot_b - gs_b + sum_{b<c<a} Tot_c))^T,
#
# both factors <= 1; the diagonal sub-blocks are formed elementwise over
# [16, 16, fb] channel blocks. The scores kernel also writes the decayed
# q exp(G) and k exp(L - G) and the chunk decay exp(L), so the sweeps read
# no gates and do matmuls only.


def _sub(a):
  return pl.ds(a * _SUB, _SUB)


class _Gates:
  """One chunk's log gates summed within each 16-token sub-chunk, G: read
  from a ref that holds them, or (``raw``: the ref holds the per-token log
  gates, ``ChannelConfig.kernel_cumsum``) summed here on each read."""

  def __init__(self, ref, raw: bool):
    self.ref, self.raw = ref, raw

  def block(self, rows, cols):
    """G over ``rows`` (one whole sub-chunk when ``raw``) and ``cols``."""
    x = self.ref[rows, cols]
    return jnp.cumsum(x, axis=0) if self.raw else x

  def sub(self, a, cols):
    return self.block(_sub(a), cols)

  def total(self, a, cols):
    """Sub-chunk a's last row of G, [width]."""
    x = self.ref[_sub(a), cols]
    return jnp.sum(x, axis=0) if self.raw else _last_row(x)

  def subs(self, ns, cols):
    """``a -> G`` of sub-chunk a over ``cols``: when ``raw`` every sub-chunk
    is summed once here (the kernels use each two or three times, and
    stores between the uses keep the compiler from merging the sums), else
    each is read where it is used."""
    if self.raw:
      return [self.sub(a, cols) for a in range(ns)].__getitem__
    return lambda a: self.sub(a, cols)

  def row(self, a, r, cols):
    """Row r of sub-chunk a's G, [1, width]."""
    if not self.raw:
      return self.ref[pl.ds(a * _SUB + r, 1), cols]
    x = self.ref[_sub(a), cols]
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows <= r, x, 0.0), axis=0)[None, :]


def _totals(gates: _Gates, ns, cols):
  """Tot_c for each sub-chunk ([fb] each): G's last rows."""
  return [gates.total(c, cols) for c in range(ns)]


def _k_to_sub_end(k_ref, gsub, tot, ns, cols):
  """k_b exp(G_end(b) - G_b) for each sub-chunk b before the last (float32,
  [16, width] each; gsub from _Gates.subs): the key factor of the
  off-diagonal blocks, up to whole sub-chunk totals."""
  return [k_ref[_sub(b), cols].astype(_F32) * jnp.exp(
      tot[b][None, :] - gsub(b)) for b in range(ns - 1)]


def _between(tot, lo, hi):
  """sum_{lo <= c < hi} Tot_c (zeros when empty)."""
  acc = jnp.zeros_like(tot[0])
  for c in range(lo, hi):
    acc = acc + tot[c]
  return acc


# Resets (packed sequences) in the chunk-parallel layout: ``seg`` [B, 4, Tp]
# float32 holds per token the running reset count (row 0), whether no reset
# lies between the chunk's start and the token (row 1: the entering state
# reaches it) and whether none lies after it in the chunk (row 2: it
# reaches the leaving state). Scores and dA between tokens of different
# segments are zeroed, q exp(G) and k exp(L - G) are masked by rows 1 and
# 2, and the chunk decay by row 1 of the last token; the decay exponents
# themselves are unchanged (every pair they are used for lies within one
# segment), so the gate-gradient identity holds as it is.


def _seg_row(seg_ref, row, a):
  """Row ``row`` of ``seg`` over sub-chunk ``a`` ([16])."""
  return seg_ref[row, _sub(a)]


def _chunk_end_mask(seg_ref, c):
  """1.0 when no reset lies in the chunk (the entering state reaches its
  end), else 0.0: row 1 at the chunk's last token."""
  m = seg_ref[1, pl.ds(0, c)]
  return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1,
                           m, 0.0))


def _mid_factors(gs, gates: _Gates, a, cols):
  """exp(G - G_m) and exp(G_m - G) ([16, width] float32) for sub-chunk a,
  m its middle row: the factors of the "factored" diagonal blocks."""
  d = gs - gates.row(a, _SUB // 2, cols)
  return jnp.exp(d), jnp.exp(-d)


def _factorable(tot_a, s: _S):
  """Whether sub-chunk a's total decay is within the factor bound in every
  channel (tot_a: its [width] sums of log gates, <= 0)."""
  return jnp.min(tot_a) >= -s.factor_bound


def _lower(x):
  """x [16, 16] with the entries above the diagonal zeroed."""
  i = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  j = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.where(j <= i, x, 0.0)


def _scores_kernel(q_ref, k_ref, gs_ref, *refs, s: _S):
  """For one chunk: A [C, C] = scale * (q k^T weighted by the pairwise
  channel decays), lower triangular; q exp(G); k exp(L - G); exp(L) (each
  masked at resets when ``s.seg``)."""
  seg_ref = refs[0] if s.seg else None
  a_ref, qd_ref, kd_ref, dec_ref = refs[1:] if s.seg else refs
  _, _, _dot_nt = _dots(s)
  ns, f = s.chunk // _SUB, q_ref.shape[-1]
  every = pl.ds(0, f)
  gates = _Gates(gs_ref, s.kcs)
  tot = _totals(gates, ns, every)
  gsub = gates.subs(ns, every)
  sub_s = dataclasses.replace(s, chunk=_SUB)
  k_dec = _k_to_sub_end(k_ref, gsub, tot, ns, every)
  for a in range(ns):
    gs = gsub(a)
    q = q_ref[_sub(a), :].astype(_F32)
    k = k_ref[_sub(a), :].astype(_F32)
    qd = q * jnp.exp(_between(tot, 0, a)[None, :] + gs)
    kd = k * jnp.exp((tot[a][None, :] - gs)
                     + _between(tot, a + 1, ns)[None, :])
    if s.seg:
      qd = qd * _seg_row(seg_ref, 1, a)[:, None]
      kd = kd * _seg_row(seg_ref, 2, a)[:, None]
    qd_ref[_sub(a), :] = qd.astype(qd_ref.dtype)
    kd_ref[_sub(a), :] = kd.astype(kd_ref.dtype)
    qa = (q * jnp.exp(gs)).astype(q_ref.dtype)  # q_a exp(G_a - G_r)
    for b in range(ns):
      if b > a:
        blk = jnp.zeros((_SUB, _SUB), _F32)
      elif b == a and s.factor_bound:
        def by_matmul(q=q, k=k, gs=gs, a=a):
          up, down = _mid_factors(gs, gates, a, every)
          return _lower(_dot_nt((q * up).astype(q_ref.dtype),
                                (k * down).astype(k_ref.dtype)))
        blk = lax.cond(
            _factorable(tot[a], s), by_matmul,
            lambda a=a: _intra(q_ref, k_ref, gates, _sub(a), sub_s, f,
                               loop=True))
      elif b == a:
        blk = _intra(q_ref, k_ref, gates, _sub(a), sub_s, f, loop=True)
      else:
        kb = k_dec[b] * jnp.exp(_between(tot, b + 1, a))[None, :]
        blk = _dot_nt(qa, kb.astype(k_ref.dtype))
      if s.seg and b <= a:
        same = (_seg_row(seg_ref, 0, a)[:, None]
                == _seg_row(seg_ref, 0, b)[None, :])
        blk = jnp.where(same, blk, 0.0)
      a_ref[_sub(a), _sub(b)] = blk * s.scale
  dec = jnp.exp(_between(tot, 0, ns))
  if s.seg:
    dec = dec * _chunk_end_mask(seg_ref, s.chunk)
  dec_ref[...] = dec


def _unrolled_sweep(nc: int, unroll: int, pre, update, state):
  """``state = update(i, state, pre(i))`` for i = 0 .. nc-1, ``unroll``
  steps per loop iteration with every ``pre`` of an iteration (the
  state-independent matmuls and loads) issued before its updates, so the
  chain carried from chunk to chunk is only the updates."""
  def body(j, state):
    idx = [j * unroll + r for r in range(unroll)]
    parts = [pre(i) for i in idx]
    for i, part in zip(idx, parts):
      state = update(i, state, part)
    return state

  state = lax.fori_loop(0, nc // unroll, body, state)
  # The remainder, one chunk an iteration (a loop, not Python ints: the
  # Triton lowering wants traced indices).
  return lax.fori_loop(nc - nc % unroll, nc,
                       lambda i, state: update(i, state, pre(i)), state)


def _sweep_kernel(*refs, s: _S, store: bool, output: bool):
  """The forward sweep over chunks for one value block (and, without
  ``output``, one block of state rows), from the decayed operands:
  o = A v + scale (q exp(G)) S when ``output``, S <- exp(L) S +
  (k exp(L-G))^T v; with ``store`` the state entering each chunk goes out."""
  _dot, _dot_tn, _ = _dots(s)
  it = iter(refs)
  qd_ref = next(it) if output else None
  kd_ref, v_ref = next(it), next(it)
  a_ref = next(it) if output else None
  dec_ref = next(it)
  s0_ref = next(it) if s.has_s0 else None
  o_ref = next(it) if output else None
  st_ref = next(it)
  hs_ref = next(it) if store else None
  c = s.chunk
  state = (s0_ref[...].astype(_F32) if s.has_s0 else
           jnp.zeros(st_ref.shape, _F32))

  def pre(i):
    rows = pl.ds(pl.multiple_of(i * c, c), c)
    dec = dec_ref[i] if s.early else None
    v = v_ref[rows, :]
    return rows, v, _dot_tn(kd_ref[rows, :], v), dec

  def update(i, state, part):
    rows, v, kv, dec = part
    if store:
      hs_ref[i] = state.astype(hs_ref.dtype)
    if output:
      o = (_dot(a_ref[rows, :].astype(v.dtype), v)
           + s.scale * _dot(qd_ref[rows, :], state.astype(v.dtype)))
      o_ref[rows, :] = o.astype(o_ref.dtype)
    if dec is None:
      dec = dec_ref[i]
    return state * dec[:, None] + kv

  st_ref[...] = _unrolled_sweep(s.nc // s.splits, s.unroll, pre, update,
                                state)


def _state_tile(ref, carry, cols):
  """Columns ``cols`` of a chunk's stored state (or state gradient) block
  ``ref`` [rows, V]; with sequence splits (``carry``: the refs of the
  chunk's decays since its split's edge [rows] and of the state entering
  the split [rows, V], float32) the split's local value plus the decayed
  entering one, float32."""
  x = ref[:, cols]
  if carry is None:
    return x
  edge_ref, in_ref = carry
  return x.astype(_F32) + edge_ref[...][:, None] * in_ref[:, cols]


def _output_kernel(qd_ref, v_ref, a_ref, hs_ref, *refs, s: _S,
                   carried: bool):
  """One chunk and value block of the output from the stored state
  entering the chunk: o = A v + scale (q exp(G)) S (with ``carried``, the
  forward without gradient on sequence splits, S joined here: see
  _state_tile)."""
  _dot, _, _ = _dots(s)
  o_ref = refs[-1]
  carry = refs[:2] if carried else None
  v = v_ref[...]
  hs = _state_tile(hs_ref, carry, slice(None)).astype(v.dtype)
  o = (_dot(a_ref[...].astype(v.dtype), v)
       + s.scale * _dot(qd_ref[...], hs))
  o_ref[...] = o.astype(o_ref.dtype)


def _dstate_kernel(qd_ref, do_ref, dec_ref, ds_ref, *refs, s: _S,
                   store: bool):
  """The state gradient, swept backwards over chunks for one value block:
  with ``store`` dhs[i] is the gradient of the state leaving chunk i; the
  gradient of the state entering the (split's) first chunk comes out."""
  dhs_ref, dsout_ref = refs if store else (None, refs[0])
  _, _dot_tn, _ = _dots(s)
  c, ncl = s.chunk, s.nc // s.splits

  def pre(i):
    rows = pl.ds(pl.multiple_of((ncl - 1 - i) * c, c), c)
    dec = dec_ref[ncl - 1 - i] if s.early else None
    do = do_ref[rows, :]
    return _dot_tn(qd_ref[rows, :].astype(do.dtype), do), dec

  def update(i, dstate, part):
    qdo, dec = part
    ci = ncl - 1 - i
    if store:
      dhs_ref[ci] = dstate.astype(dhs_ref.dtype)
    if dec is None:
      dec = dec_ref[ci]
    return dstate * dec[:, None] + s.scale * qdo

  dsout_ref[...] = _unrolled_sweep(ncl, s.unroll, pre, update,
                                   ds_ref[...].astype(_F32))


def _dadv_kernel(a_ref, do_ref, v_ref, kd_ref, dhs_ref, *refs, s: _S):
  """For one chunk: dv = A^T dO + (k exp(L - G)) dS_out, and the score
  gradient dA = scale * dO v^T (lower triangular, float32) that the
  channel-block gradient programs read by sub-blocks. A loop over blocks
  of ``s.bv`` value columns keeps the tiles small (whole [F, V] float32
  tiles spilled tens of KB)."""
  seg_ref = refs[0] if s.seg else None
  dv_ref, da_ref = refs[1:] if s.seg else refs
  _dot, _dot_tn, _dot_nt = _dots(s)
  c, bv = s.chunk, s.bv
  dt = do_ref.dtype
  a = a_ref[...].astype(dt)
  kd = kd_ref[...].astype(dt)

  def body(jv, da):
    cols = pl.ds(pl.multiple_of(jv * bv, bv), bv)
    do = do_ref[:, cols]
    dv = _dot_tn(a, do) + _dot(kd, dhs_ref[:, cols].astype(dt))
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)
    return da + _dot_nt(do, v_ref[:, cols].astype(dt))

  da = lax.fori_loop(0, do_ref.shape[-1] // bv, body,
                     jnp.zeros((c, c), _F32)) * s.scale
  i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  j = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  keep = j <= i
  if s.seg:
    rc = seg_ref[0, pl.ds(0, c)]
    keep = jnp.logical_and(keep, rc[:, None] == rc[None, :])
  da_ref[...] = jnp.where(keep, da, 0.0)


def _grad_kernel(q_ref, k_ref, v_ref, do_ref, gs_ref, da_ref, hs_ref, dhs_ref,
                 *refs, s: _S):
  """dq, dk and the per-row gradient dG of the chunk-level cumulative gates
  (reverse-summed within the chunk outside, or with ``s.kcs`` here: then
  the raw log gates' gradient) for one chunk and one block of
  ``s.bf`` key channels, given the state entering the chunk (hs), the
  gradient of the state leaving it (dhs) and dA."""
  seg_ref = refs[0] if s.seg else None
  dq_ref, dk_ref, dg_ref = refs[1:] if s.seg else refs
  _dot, _dot_tn, _dot_nt = _dots(s)
  ns = s.chunk // _SUB
  dt = do_ref.dtype
  every = pl.ds(0, s.bf)
  gates = _Gates(gs_ref, s.kcs)
  tot = _totals(gates, ns, every)

  # The products with the states, per sub-chunk, in a loop over blocks of
  # s.bv value columns (whole [fb, V] float32 tiles spill): dO_r S_in^T,
  # v_r dS_out^T and <S_in, dS_out> per channel.
  def vbody(jv, carry):
    span, dqi, dki = carry
    cols = pl.ds(pl.multiple_of(jv * s.bv, s.bv), s.bv)
    hs_c, dhs_c = hs_ref[:, cols], dhs_ref[:, cols]
    span = span + jnp.sum(dhs_c.astype(_F32) * hs_c.astype(_F32), axis=1)
    hs_c, dhs_c = hs_c.astype(dt), dhs_c.astype(dt)
    dqi = tuple(dqi[r] + _dot_nt(do_ref[_sub(r), cols], hs_c)
                for r in range(ns))
    dki = tuple(dki[r] + _dot_nt(v_ref[_sub(r), cols].astype(dt), dhs_c)
                for r in range(ns))
    return span, dqi, dki

  zero = jnp.zeros((_SUB, s.bf), _F32)
  span, dqi, dki = lax.fori_loop(
      0, do_ref.shape[-1] // s.bv, vbody,
      (jnp.zeros((s.bf,), _F32), (zero,) * ns, (zero,) * ns))
  e = span * jnp.exp(_between(tot, 0, ns))  # the state-span term, last row
  if s.seg:
    e = e * _chunk_end_mask(seg_ref, s.chunk)
  # Per sub-chunk, once: q_a exp(G_a - G_ref(a)) and k_b exp(G_end(b) -
  # G_b), the factors of the off-diagonal blocks up to whole totals.
  gsub = gates.subs(ns, every)
  q_dec = [(q_ref[_sub(a), :].astype(_F32) * jnp.exp(gsub(a))).astype(dt)
           for a in range(1, ns)]
  k_dec = _k_to_sub_end(k_ref, gsub, tot, ns, every)
  dgs = []
  for r in range(ns):
    gs = gsub(r)
    q = q_ref[_sub(r), :].astype(_F32)
    k = k_ref[_sub(r), :].astype(_F32)
    to_end = (tot[r][None, :] - gs) + _between(tot, r + 1, ns)[None, :]
    # Inter-chunk parts, through the states.
    dq = s.scale * jnp.exp(_between(tot, 0, r)[None, :] + gs) * dqi[r]
    dk_inter = jnp.exp(to_end) * dki[r]
    if s.seg:
      dq = dq * _seg_row(seg_ref, 1, r)[:, None]
      dk_inter = dk_inter * _seg_row(seg_ref, 2, r)[:, None]
    dk = dk_inter
    # Off-diagonal sub-blocks: dq from earlier keys, dk from later queries.
    if r > 0:
      acc = jnp.zeros((_SUB, s.bf), _F32)
      for b in range(r):
        kb = k_dec[b] * jnp.exp(_between(tot, b + 1, r))[None, :]
        acc = acc + _dot(da_ref[_sub(r), _sub(b)].astype(dt), kb.astype(dt))
      dq = dq + acc * jnp.exp(gs)
    if r < ns - 1:
      acc = jnp.zeros((_SUB, s.bf), _F32)
      for a in range(r + 1, ns):
        acc = acc + jnp.exp(_between(tot, r + 1, a))[None, :] * _dot_tn(
            da_ref[_sub(a), _sub(r)].astype(dt), q_dec[a - 1])
      dk = dk + jnp.exp(tot[r][None, :] - gs) * acc
    # Diagonal sub-block: elementwise, or (factored) by two matmuls.
    def pairs(q=q, k=k, gs=gs, r=r):
      de = da_ref[_sub(r), _sub(r)][:, :, None] * _pair_decay(
          gs, transpose=False)
      return jnp.sum(de * k[None, :, :], axis=1), jnp.sum(
          de * q[:, None, :], axis=0)
    if s.factor_bound:
      # float32 operands: see ChannelConfig.diag.
      def by_matmul(q=q, k=k, gs=gs, r=r):
        up, down = _mid_factors(gs, gates, r, every)
        da = da_ref[_sub(r), _sub(r)]
        return up * _dot(da, k * down), down * _dot_tn(da, q * up)
      fallback = pairs
      if s.rows_fallback:
        fallback = functools.partial(_diag_by_rows, da_ref[_sub(r), _sub(r)],
                                     q, k, gs)
      ddq, ddk = lax.cond(_factorable(tot[r], s), by_matmul, fallback)
    else:
      ddq, ddk = pairs()
    dq = dq + ddq
    dk = dk + ddk
    dq_ref[_sub(r), :] = dq.astype(dq_ref.dtype)
    dk_ref[_sub(r), :] = dk.astype(dk_ref.dtype)
    e = e + jnp.sum(k * dk_inter, axis=0)
    dg = q * dq - k * dk
    if r == ns - 1:
      is_last = lax.broadcasted_iota(jnp.int32, dg.shape, 0) == _SUB - 1
      dg = dg + jnp.where(is_last, e[None, :], 0.0)
    dgs.append(dg)
  if not s.kcs:
    for r in range(ns):
      dg_ref[_sub(r), :] = dgs[r]
    return
  # kernel_cumsum: the gradient of each raw log gate, the sum of dG over
  # the rows from it to the chunk's end (the suffix sums of a sub-chunk as
  # one float32 matmul with an upper-triangular block of ones).
  i = lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 0)
  j = lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 1)
  upper = jnp.where(j >= i, 1.0, 0.0).astype(_F32)
  later = jnp.zeros((s.bf,), _F32)
  for r in reversed(range(ns)):
    dg_ref[_sub(r), :] = _dot(upper, dgs[r]) + later[None, :]
    later = later + jnp.sum(dgs[r], axis=0)


def _diag_by_rows(da, q, k, gs):
  """The diagonal [16, 16] sub-block's dq and dk contributions,
  ddq_i = sum_{j <= i} da_ij exp(G_i - G_j) k_j and ddk_j = sum_{i >= j}
  da_ij exp(G_i - G_j) q_i, in a loop over the key row j (one [16, fb]
  tile of exponentials per step, each used for both) instead of as one
  [16, 16, fb] tile (``ChannelConfig.diag="factored_rows"``'s fallback:
  that tile set the gradient kernel's register count)."""
  rows = lax.broadcasted_iota(jnp.int32, q.shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, da.shape, 1)

  def row(x, m):  # row m of x [16, fb] as [1, fb]
    return jnp.sum(jnp.where(rows == m, x, 0.0), axis=0)[None, :]

  def body(m, carry):
    ddq, ddk = carry
    da_m = jnp.sum(jnp.where(cols == m, da, 0.0), axis=1)  # da[:, m]
    e = jnp.exp(jnp.where(rows >= m, gs - row(gs, m), -jnp.inf))
    w = da_m[:, None] * e  # da_im exp(G_i - G_m), i >= m
    ddq = ddq + w * row(k, m)
    ddk = jnp.where(rows == m, jnp.sum(w * q, axis=0)[None, :], ddk)
    return ddq, ddk

  zero = jnp.zeros(q.shape, _F32)
  return lax.fori_loop(0, q.shape[0], body, (zero, zero))


def _chunk_rows(s: _S, head, width):
  """[C, width] rows of one chunk (grid: chunk, head, batch)."""
  return pl.BlockSpec((None, s.chunk, None, width),
                      lambda i, n_, b_: (b_, i, head(n_), 0))


def _seg_spec(s: _S, chunk_of=lambda i: i):
  """The [4, C] block of ``seg`` for the chunk of grid index i."""
  return pl.BlockSpec((None, 4, s.chunk),
                      lambda i, n_, b_: (b_, 0, chunk_of(i)))


def _with_seg(s: _S, specs, args, seg, chunk_of=lambda i: i):
  if s.seg:
    return specs + [_seg_spec(s, chunk_of)], args + [seg]
  return specs, args


def _scores_call(q, k, gs, seg, s: _S):
  b, tp, n, f = q.shape
  c = s.chunk
  same, kv = (lambda x: x), (lambda x: x // s.rep)
  in_specs, args = _with_seg(
      s, [_chunk_rows(s, same, f), _chunk_rows(s, kv, f),
          _chunk_rows(s, same, f)], [q, k, gs], seg)
  return _flat_call(
      functools.partial(_scores_kernel, s=s),
      grid=(s.nc, n, b),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, c, c),
                              lambda i, n_, b_: (b_, n_, i, 0)),
                 _chunk_rows(s, same, f), _chunk_rows(s, same, f),
                 pl.BlockSpec((None, None, None, f),
                              lambda i, n_, b_: (b_, n_, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, n, tp, c), _F32),
                 jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, s.nc, f), _F32)],
      compiler_params=_params(s),
      interpret=s.interpret,
      name="linear_scan_channel_scores",
  )(*args)


def _row_blocks(s: _S, f: int, vp: int, rows: int):
  """Grid axis 0 of the state sweeps: value block j % nv, row block
  (j // nv) % (f // rows), sequence split j // (nv * f // rows) (of
  ``s.splits``); the BlockSpecs of a [T, rows] operand of head n, of a
  value block of kv head n // rep and of head n, of a [rows, bv] state
  (per split: [splits, rows, bv] arrays when s.splits > 1), of the
  [nc, rows] chunk decays, of the [nc, rows, bv] per-chunk states and of
  the split's [T / splits, C] scores."""
  nv, nf = vp // s.bv, f // rows
  jv, jf, jp = (lambda j: j % nv), (lambda j: (j // nv) % nf), (
      lambda j: j // (nv * nf))
  ncl = s.nc // s.splits
  tl = ncl * s.chunk
  if s.splits == 1:
    st = pl.BlockSpec((None, None, rows, s.bv),
                      lambda j, n_, b_: (b_, n_, jf(j), jv(j)))
  else:
    st = pl.BlockSpec((None, None, None, rows, s.bv),
                      lambda j, n_, b_: (b_, n_, jp(j), jf(j), jv(j)))
  return dict(
      grid0=s.splits * nv * nf,
      rows=pl.BlockSpec((None, tl, None, rows),
                        lambda j, n_, b_: (b_, jp(j), n_, jf(j))),
      val=pl.BlockSpec((None, tl, None, s.bv),
                       lambda j, n_, b_: (b_, jp(j), n_ // s.rep, jv(j))),
      val_head=pl.BlockSpec((None, tl, None, s.bv),
                            lambda j, n_, b_: (b_, jp(j), n_, jv(j))),
      st=st,
      dec=pl.BlockSpec((None, None, ncl, rows),
                       lambda j, n_, b_: (b_, n_, jp(j), jf(j))),
      scores=pl.BlockSpec((None, None, tl, s.chunk),
                          lambda j, n_, b_: (b_, n_, jp(j), 0)),
      hs=pl.BlockSpec((None, None, ncl, rows, s.bv),
                      lambda j, n_, b_: (b_, n_, jp(j), jf(j), jv(j))))


def _sweep_call(qd, kd, v, a, dec, s0, s: _S, store: bool,
                output: bool = True):
  b, tp, n, f = qd.shape
  vp = v.shape[-1]
  rows = f if output else s.fs  # the output needs every row of the state
  blk = _row_blocks(s, f, vp, rows)
  rows_spec, st = blk["rows"], blk["st"]
  in_specs, args = [], []
  if output:
    in_specs.append(rows_spec)  # rows == f: all of qd
    args.append(qd)
  in_specs += [rows_spec, blk["val"]]
  args += [kd, v]
  if output:
    in_specs.append(blk["scores"])
    args.append(a)
  in_specs.append(blk["dec"])
  args.append(dec)
  if s.has_s0:
    in_specs.append(st)
    args.append(s0)
  out_specs, out_shape = [], []
  if output:
    out_specs.append(blk["val_head"])
    out_shape.append(jax.ShapeDtypeStruct((b, tp, n, vp), qd.dtype))
  out_specs.append(st)
  out_shape.append(jax.ShapeDtypeStruct(
      (b, n, f, vp) if s.splits == 1 else (b, n, s.splits, f, vp), _F32))
  if store:
    out_specs.append(blk["hs"])
    out_shape.append(jax.ShapeDtypeStruct((b, n, s.nc, f, vp), qd.dtype))
  name = "linear_scan_channel_sweep"
  if not output:
    name = "linear_scan_channel_states" + ("" if store else "_ends")
  elif store:
    name = "linear_scan_channel_sweep_states"
  return _flat_call(
      functools.partial(_sweep_kernel, s=s, store=store, output=output),
      grid=(blk["grid0"], n, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s),
      interpret=s.interpret,
      name=name,
  )(*args)


def _output_call(qd, v, a, hs, s: _S):
  """Grid (chunk x value block, head, batch). ``hs``: the per-chunk
  states, or (sequence splits, not yet joined) (local states, edge
  [B, N, nc, F], entering [B, N, splits, F, V]) (see _state_tile)."""
  carried = isinstance(hs, tuple)
  b, tp, n, f = qd.shape
  vp, c = v.shape[-1], s.chunk
  nv, ncl = vp // s.bv, s.nc // s.splits
  in_specs = [pl.BlockSpec((None, c, None, f),
                           lambda i, n_, b_: (b_, i // nv, n_, 0)),
              pl.BlockSpec((None, c, None, s.bv),
                           lambda i, n_, b_: (b_, i // nv, n_ // s.rep,
                                              i % nv)),
              pl.BlockSpec((None, None, c, c),
                           lambda i, n_, b_: (b_, n_, i // nv, 0)),
              pl.BlockSpec((None, None, None, f, s.bv),
                           lambda i, n_, b_: (b_, n_, i // nv, 0, i % nv))]
  if carried:
    in_specs += [pl.BlockSpec((None, None, None, f),
                              lambda i, n_, b_: (b_, n_, i // nv, 0)),
                 pl.BlockSpec((None, None, None, f, s.bv),
                              lambda i, n_, b_: (b_, n_, i // nv // ncl, 0,
                                                 i % nv))]
  args = [qd, v, a, *(hs if carried else [hs])]
  return _flat_call(
      functools.partial(_output_kernel, s=s, carried=carried),
      grid=(s.nc * nv, n, b),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, c, None, s.bv),
                             lambda i, n_, b_: (b_, i // nv, n_, i % nv)),
      out_shape=jax.ShapeDtypeStruct((b, tp, n, vp), qd.dtype),
      compiler_params=_params(s),
      interpret=s.interpret,
      name="linear_scan_channel_output",
  )(*args)


def _forward(q, k, v, gs, s0, seg, s: _S, store: bool):
  """(o, final state, residuals or None) of the chunk-parallel forward."""
  a, qd, kd, dec = _scores_call(q, k, gs, seg, s)
  if s.splits > 1 and not s.sep:
    # The fused sweep on sequence splits, in two passes: the states-only
    # sweep of each split from zero, keeping only its end; the carries
    # through the splits; then the fused sweep of each split from the
    # state that really enters it (outputs and stored states need no join).
    (ends,) = _sweep_call(qd, kd, v, None, dec, None,
                          dataclasses.replace(s, has_s0=False), store=False,
                          output=False)
    b, n, _, f, vp = ends.shape
    s0 = s0 if s.has_s0 else jnp.zeros((b, n, f, vp), _F32)
    entering, final = _carry_through(_split_decays(dec, s), ends, s0,
                                     reverse=False)
    outs = _sweep_call(qd, kd, v, a, dec, entering,
                       dataclasses.replace(s, has_s0=True), store=store)
    o, hs = outs[0], (outs[2] if store else None)
  elif s.sep:
    final, hs = _split_states(qd, kd, v, a, dec, s0, s)
    if store and s.splits > 1:
      hs = _join_splits(*hs, qd.dtype)
    o = _output_call(qd, v, a, hs, s)
  elif store:
    o, final, hs = _sweep_call(qd, kd, v, a, dec, s0, s, store=True)
  else:
    o, final = _sweep_call(qd, kd, v, a, dec, s0, s, store=False)
    hs = None
  return o, final, ((a, qd, kd, dec, hs) if store else None)


def _dstate_call(qd, do, dec, dfinal, s: _S, store: bool = True):
  """(dhs, ds0), or without ``store`` (ds0,); with s.splits > 1 ``dfinal``
  is [B, N, splits, F, V] (the gradient at each split's end) and so is the
  ds0 that comes out."""
  b, tp, n, f = qd.shape
  vp = do.shape[-1]
  blk = _row_blocks(s, f, vp, s.fs)
  st_shape = (b, n, f, vp) if s.splits == 1 else (b, n, s.splits, f, vp)
  out_specs = [blk["st"]]
  out_shape = [jax.ShapeDtypeStruct(st_shape, _F32)]
  if store:
    out_specs.insert(0, blk["hs"])
    out_shape.insert(0, jax.ShapeDtypeStruct((b, n, s.nc, f, vp), qd.dtype))
  return _flat_call(
      functools.partial(_dstate_kernel, s=s, store=store),
      grid=(blk["grid0"], n, b),
      in_specs=[blk["rows"], blk["val_head"], blk["dec"], blk["st"]],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_channel_dstate" + ("" if store else "_ends"),
  )(qd, do, dec, dfinal)


def _split_decays(dec, s: _S):
  """[B, N, P, F]: the product of each split's chunk decays (``dec``
  [B, N, nc, F]; numbers in [0, 1], so it can only underflow, to the
  right limit 0)."""
  b, n, nc, f = dec.shape
  return jnp.prod(dec.reshape(b, n, s.splits, nc // s.splits, f), axis=3)


def _carry_through(decays, ends, carry, reverse: bool):
  """The pass over the splits: ``ends`` [B, N, P, F, V] is what each
  split's sweep ended with from zero, ``decays`` [B, N, P, F] the product
  of its chunk decays, ``carry`` the initial state (the final state's
  gradient when ``reverse``). Returns (the carry entering each split
  [B, N, P, F, V], the carry out of the last one)."""
  p = ends.shape[2]
  entering = [None] * p
  for i in (reversed(range(p)) if reverse else range(p)):
    entering[i] = carry
    carry = decays[:, :, i, :, None] * carry + ends[:, :, i]
  return jnp.stack(entering, axis=2), carry


def _split_carries(dec, local, carry, s: _S, reverse: bool):
  """The pass over the s.splits sweeps that ran from zero. ``dec``
  [B, N, nc, F]: the chunk decays; ``local`` [B, N, P, F, V]: what each
  split's sweep ended with; ``carry``: the initial state (the final
  state's gradient when ``reverse``), carried through the splits (each
  split's decay product times it plus its local end). Returns (edge
  [B, N, nc, F]: the product of the chunk decays between each chunk and
  its split's edge; entering [B, N, P, F, V]: the carry entering each
  split; the carry out of the last split). Products of numbers in [0, 1]
  (a reset makes one 0): no overflow, and underflow to 0 is the right
  limit."""
  b, n, nc, f = dec.shape
  p = s.splits
  d = dec.reshape(b, n, p, nc // p, f)
  if reverse:
    d = jnp.flip(d, 3)
  incl = jnp.cumprod(d, axis=3)
  edge = jnp.concatenate([jnp.ones_like(d[:, :, :, :1]), incl[:, :, :, :-1]],
                         axis=3)  # decays between the split's edge and it
  if reverse:
    edge = jnp.flip(edge, 3)
  entering, carry = _carry_through(incl[:, :, :, -1], local, carry, reverse)
  return edge.reshape(b, n, nc, f), entering, carry


def _join_splits(local, edge, entering, dtype):
  """Per-chunk values [B, N, nc, F, V] of split sweeps that ran from zero,
  joined: local + edge * the carry entering the split (_split_carries).
  One XLA pass over them, for the backward's kernels: joining on every
  tile they load instead cost more on the H200 (T = 64k, B = 1: dv/dA
  0.62 -> 1.48 ms, the gradient kernel 5.4 -> 6.9 ms, run38)."""
  b, n, nc, f, vp = local.shape
  p = entering.shape[2]
  x = local.reshape(b, n, p, nc // p, f, vp).astype(_F32) + (
      edge.reshape(b, n, p, nc // p, f, 1) * entering[:, :, :, None])
  return x.reshape(b, n, nc, f, vp).astype(dtype)


def _split_states(qd, kd, v, a, dec, s0, s: _S):
  """(final, hs) of the separate layout's states sweep. With s.splits > 1
  each split of the chunks is swept from a zero state in parallel and hs
  is (local states, edge, entering) from _split_carries, for the output
  kernel to join (_state_tile) or _join_splits."""
  if s.splits == 1:
    return _sweep_call(qd, kd, v, a, dec, s0, s, store=True, output=False)
  ends, hs = _sweep_call(qd, kd, v, a, dec, None,
                         dataclasses.replace(s, has_s0=False), store=True,
                         output=False)
  b, n, _, f, vp = ends.shape
  s0 = s0 if s.has_s0 else jnp.zeros((b, n, f, vp), _F32)
  edge, entering, final = _split_carries(dec, ends, s0, s, reverse=False)
  return final, (hs, edge, entering)


def _split_dstate(qd, do, dec, dfinal, s: _S):
  """(dhs, ds0): the state-gradient sweep, split as the forward's sweeps:
  joined by _join_splits (separate layout) or swept twice (fused layout:
  each split's gradient at its start from zero, the carries through the
  splits, then the storing sweep from the gradient that really enters
  each split)."""
  if s.splits == 1:
    return _dstate_call(qd, do, dec, dfinal, s)
  b, n, f, vp = dfinal.shape
  zeros = jnp.zeros((b, n, s.splits, f, vp), _F32)
  if not s.sep:
    (ends,) = _dstate_call(qd, do, dec, zeros, s, store=False)
    entering, ds0 = _carry_through(_split_decays(dec, s), ends, dfinal,
                                   reverse=True)
    dhs, _ = _dstate_call(qd, do, dec, entering, s)
    return dhs, ds0
  dhs, ends = _dstate_call(qd, do, dec, zeros, s)
  edge, entering, ds0 = _split_carries(dec, ends, dfinal, s, reverse=True)
  return _join_splits(dhs, edge, entering, dhs.dtype), ds0


def _dadv_call(a, do, v, kd, dhs, seg, s: _S):
  b, tp, n, f = kd.shape
  vp, c = v.shape[-1], s.chunk
  same, kv = (lambda x: x), (lambda x: x // s.rep)
  per_chunk = pl.BlockSpec((None, None, c, c),
                           lambda i, n_, b_: (b_, n_, i, 0))
  in_specs, args = _with_seg(
      s, [per_chunk, _chunk_rows(s, same, vp), _chunk_rows(s, kv, vp),
          _chunk_rows(s, same, f),
          pl.BlockSpec((None, None, None, f, vp),
                       lambda i, n_, b_: (b_, n_, i, 0, 0))],
      [a, do, v, kd, dhs], seg)
  return _flat_call(
      functools.partial(_dadv_kernel, s=s),
      grid=(s.nc, n, b),
      in_specs=in_specs,
      out_specs=[_chunk_rows(s, same, vp), per_chunk],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, vp),
                                      v.dtype if s.rep == 1 else _F32),
                 jax.ShapeDtypeStruct((b, n, tp, c), _F32)],
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_channel_dadv",
  )(*args)


def _grad_call(q, k, v, do, gs, da, hs, dhs, seg, s: _S):
  """Grid (chunk x channel block, head, batch): neighbouring programs share
  the chunk's dO, v and dA."""
  b, tp, n, f = q.shape
  vp, c, bf = v.shape[-1], s.chunk, s.bf
  nf = f // bf
  kv = lambda x: x // s.rep  # noqa: E731

  def cols(head):
    return pl.BlockSpec((None, c, None, bf),
                        lambda i, n_, b_: (b_, i // nf, head(n_), i % nf))

  def rows(head):
    return pl.BlockSpec((None, c, None, vp),
                        lambda i, n_, b_: (b_, i // nf, head(n_), 0))

  same = lambda x: x  # noqa: E731
  st = pl.BlockSpec((None, None, None, bf, vp),
                    lambda i, n_, b_: (b_, n_, i // nf, i % nf, 0))
  specs = [cols(same), cols(kv), rows(kv), rows(same), cols(same),
           pl.BlockSpec((None, None, c, c),
                        lambda i, n_, b_: (b_, n_, i // nf, 0)), st, st]
  in_specs, args = _with_seg(s, specs, [q, k, v, do, gs, da, hs, dhs], seg,
                             chunk_of=lambda i: i // nf)
  return _flat_call(
      functools.partial(_grad_kernel, s=s),
      grid=(s.nc * nf, n, b),
      in_specs=in_specs,
      out_specs=[cols(same), cols(same), cols(same)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape,
                                      k.dtype if s.rep == 1 else _F32),
                 jax.ShapeDtypeStruct(q.shape, _F32)],
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_channel_grads",
  )(*args)


def _sub_gates(g, s: _S):
  """What the chunk-parallel kernels read as gates: the sums within each
  sub-chunk, or with ``s.kcs`` the raw log gates (they sum them)."""
  return g if s.kcs else _chunk_cumsum(g, _SUB)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core_par(q, k, v, g, s0, seg, s: _S):
  o, final, _ = _forward(q, k, v, _sub_gates(g, s), s0, seg, s, store=False)
  return o, final


def _core_par_fwd(q, k, v, g, s0, seg, s: _S):
  gs = _sub_gates(g, s)
  o, final, res = _forward(q, k, v, gs, s0, seg, s, store=True)
  return (o, final), (q, k, v, gs, seg) + res


def _core_par_bwd(s: _S, res, cts):
  q, k, v, gs, seg, a, qd, kd, dec, hs = res
  do, dfinal = cts
  b, tp, n, f = q.shape
  kh, vp = k.shape[2], v.shape[-1]
  do = do.astype(q.dtype)
  dhs, ds0 = _split_dstate(qd, do, dec, dfinal.astype(_F32), s)
  dv, da = _dadv_call(a, do, v, kd, dhs, seg, s)
  dq, dk, dgr = _grad_call(q, k, v, do, gs, da, hs, dhs, seg, s)
  if s.rep > 1:
    dk = dk.reshape(b, tp, kh, s.rep, f).sum(3).astype(k.dtype)
    dv = dv.reshape(b, tp, kh, s.rep, vp).sum(3).astype(v.dtype)
  if s.kcs:  # the kernel summed dG back to the raw gates
    dg = dgr
  else:
    rows = dgr.reshape(b, tp // s.chunk, s.chunk, n, f)
    dg = jnp.flip(jnp.cumsum(jnp.flip(rows, 2), 2), 2).reshape(b, tp, n, f)
  return dq, dk, dv, dg, (ds0 if s.has_s0 else None), None


_core_par.defvjp(_core_par_fwd, _core_par_bwd)


def _segments(resets, tp, c):
  """``seg`` [B, 4, Tp] float32 for the chunk-parallel kernels (see
  _seg_row): the running reset count, [no reset in [chunk start, i]],
  [no reset in (i, chunk end]], and a zero row."""
  b, t = resets.shape
  r = jnp.pad(resets.astype(jnp.int32), ((0, 0), (0, tp - t)))
  count = jnp.cumsum(r.reshape(b, tp // c, c), axis=-1)
  to_end = count[..., -1:] - count
  rows = [jnp.cumsum(r, axis=-1), (count == 0).reshape(b, tp),
          (to_end == 0).reshape(b, tp), jnp.zeros((b, tp))]
  return jnp.stack([x.astype(_F32) for x in rows], axis=1)


def _static(cfg: ChannelConfig, *, scale, t, rep, fp, vp, has_s0,
            interpret, seg=False, dtype=jnp.bfloat16) -> _S:
  """The kernels' static parameters for T = t tokens and padded feature
  and value dims fp, vp (also used by scripts/gpu/channel_profile.py)."""
  nc = -(-t // cfg.chunk)
  nc = -(-nc // cfg.seq_splits) * cfg.seq_splits
  return _S(scale=float(scale), chunk=cfg.chunk, nc=nc,
            bv=min(cfg.block_v, vp), bf=min(cfg.block_f, fp),
            warps=cfg.num_warps, stages=cfg.num_stages,
            warps_bwd=cfg.num_warps_bwd, stages_bwd=cfg.num_stages_bwd,
            has_s0=has_s0, interpret=interpret,
            upcast=interpret and jax.default_backend() == "cpu", rep=rep,
            par=cfg.chunk_parallel, sep=cfg.separate_output,
            fs=min(cfg.block_f_state or fp, fp), seg=seg,
            factor_bound=_factor_bound(dtype) if cfg.diag != "pairs"
            else 0.0, rows_fallback=cfg.diag == "factored_rows",
            unroll=cfg.sweep_unroll, splits=cfg.seq_splits,
            kcs=cfg.chunk_parallel and cfg.kernel_cumsum is not False,
            early=cfg.early_decay)


def _auto_layout(cfg: ChannelConfig, programs: int, sms: int,
                 chunks: int = 0) -> ChannelConfig:
  """The default configuration, adapted to a GPU with ``sms``
  multiprocessors: when the forward sweep's ``programs`` (batch x heads x
  value blocks) fill at most half of them (long sequences at batch 1),
  the states-only sweep split by 64 state rows plus the chunk-parallel
  output kernel, the sweeps 4 chunks a loop iteration. On an H200 at
  T = 64k, B = 1, N = 16, H = Hv = 128 (32 programs): forward 4.81
  against 6.20 ms, forward+backward 13.6 against 16.8 ms (the fused
  layout, 2 chunks an iteration); at T = 4k, B = 16 (512 programs) the
  forward is 22% slower that way, 3.26 against 2.68 ms
  (docs/dev/gpu-runs/run30-h200-channel-unroll-profile.log).

  When 4 sequence splits of the sweeps still fit the multiprocessors and
  each split walks at least 128 of the ``chunks``, the sweeps also run on
  4 splits: at T = 64k, B = 1 (32 programs) forward 4.80 -> 4.09 ms,
  forward+backward 13.83 -> 12.51 ms; at T = 32k, B = 2 (64 programs,
  not split) 2, 4 and 8 splits were 6%, 8% and 5% slower in the forward
  (docs/dev/gpu-runs/run34-h200-channel-splits.log)."""
  if cfg.chunk_parallel and sms and 2 * programs <= sms:
    splits = 4 if 4 * programs <= sms and chunks >= 4 * 128 else 1
    return dataclasses.replace(cfg, separate_output=True, block_f_state=64,
                               sweep_unroll=4, seq_splits=splits)
  return cfg


def channel_gated_linear_attention(q, k, v, log_gate, resets=None, *,
                                   scale: float, initial_state=None,
                                   config: ChannelConfig | None = None,
                                   interpret: bool | None = None):
  """Linear attention with per-key-channel log gates (GLA), Pallas kernels.

  Args:
    q: [B, T, N, F] feature-mapped queries (float32, bfloat16 or float16).
    k: [B, T, K, F] (N % K == 0), same dtype.
    v: [B, T, K, V], same dtype.
    log_gate: float [B, T, N, F], every entry <= 0 (log of the per-step,
      per-channel decay).
    resets: None or bool [B, T]: the state is zeroed before token t
      (packed sequences). Chunk-parallel layout only (the sweep layout
      raises NotImplementedError).
    scale: output scale.
    initial_state: None or float32 [B, N, F, V].
    config: tiling (default ``ChannelConfig()``; float32 inputs use a
      16-channel block; on a GPU that batch x heads x value blocks fill at
      most half of, ``separate_output=True, block_f_state=64``, and 4
      sequence splits where they fit too: see ``_auto_layout``; the
      fields of the JSON object in ``ATTNJAX_CHANNEL_CONFIG`` replace the
      defaults' if that is set: a tuning override).
    interpret: Pallas interpret mode (default: unless on a GPU).

  Returns:
    ``(out [B, T, N, V] in q.dtype, final_state float32 [B, N, F, V])``;
    differentiable in q, k, v, log_gate and initial_state.

  Raises:
    NotImplementedError: resets with the sweep layout, feature or value
      dims above 256, a chunk that is not a power of two >= 16.

  >>> import jax.numpy as jnp
  >>> x = jnp.ones((1, 32, 1, 16))
  >>> g = jnp.zeros((1, 32, 1, 16))
  >>> o, s = channel_gated_linear_attention(x, x, x, g, scale=1.0,
  ...                                       interpret=True)
  >>> float(o[0, 0, 0, 0]), float(o[0, 31, 0, 0])
  (16.0, 512.0)
  """
  if log_gate is None or log_gate.ndim != 4:
    raise NotImplementedError("per-channel gates [B, T, N, F] expected")
  b, t, n, f = q.shape
  kh, vd = k.shape[2], v.shape[-1]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  # No config: the defaults, with any ATTNJAX_CHANNEL_CONFIG (JSON) fields.
  cfg = config or env_overrides(ChannelConfig(), "ATTNJAX_CHANNEL_CONFIG")
  if config is None and jnp.dtype(q.dtype) == jnp.dtype(jnp.float32):
    cfg = dataclasses.replace(cfg, block_f=16, block_v=32)
  c = cfg.chunk
  if c < 16 or c & (c - 1):
    raise NotImplementedError(f"chunk {c} is not a power of two >= 16")
  if resets is not None and not cfg.chunk_parallel:
    raise NotImplementedError("the sweep layout of the per-channel-gate "
                              "kernels does not take resets")
  if resets is not None and resets.shape != (b, t):
    raise ValueError(f"resets has shape {resets.shape}, expected {(b, t)}")
  if cfg.diag not in ("pairs", "factored", "factored_rows"):
    raise ValueError(f"config.diag={cfg.diag!r} is not 'pairs', "
                     "'factored' or 'factored_rows'")
  if cfg.sweep_unroll < 1:
    raise ValueError(f"config.sweep_unroll={cfg.sweep_unroll} is not >= 1")
  if cfg.seq_splits < 1:
    raise ValueError(f"config.seq_splits={cfg.seq_splits} is not >= 1")
  if cfg.seq_splits > 1 and not cfg.chunk_parallel:
    raise ValueError(f"config.seq_splits={cfg.seq_splits} needs "
                     "chunk_parallel=True")
  if cfg.kernel_cumsum and not cfg.chunk_parallel:
    raise ValueError("config.kernel_cumsum=True needs chunk_parallel=True")
  fs = cfg.block_f_state
  if fs is not None and (fs < 16 or fs & (fs - 1)):
    raise ValueError(f"config.block_f_state={fs} is not a power of two "
                     ">= 16")
  fp, vp = _padded_dim(f), _padded_dim(vd)
  if fp > 256 or vp > 256:
    raise NotImplementedError("feature and value dims above 256 are not "
                              "supported by the per-channel-gate kernels")
  if config is None and not interpret:
    cfg = _auto_layout(cfg, b * n * -(-vp // min(cfg.block_v, vp)),
                       _num_sms(), -(-t // cfg.chunk))
  s = _static(cfg, scale=scale, t=t, rep=n // kh, fp=fp, vp=vp,
              has_s0=initial_state is not None, interpret=bool(interpret),
              seg=resets is not None, dtype=q.dtype)
  tp = s.nc * c
  qp = _pad_axis(_pad_axis(q, 3, fp), 1, tp)
  kp = _pad_axis(_pad_axis(k, 3, fp), 1, tp)
  vpd = _pad_axis(_pad_axis(v, 3, vp), 1, tp)
  g = _pad_axis(_pad_axis(log_gate.astype(_F32), 3, fp), 1, tp)
  s0 = None
  if initial_state is not None:
    s0 = _pad_axis(_pad_axis(initial_state.astype(_F32), 2, fp), 3, vp)
  if s.par:
    seg = None if resets is None else _segments(resets, tp, c)
    o, final = _core_par(qp, kp, vpd, g, s0, seg, s)
  else:
    o, final = _core(qp, kp, vpd, g, s0, s)
  return o[:, :t, :, :vd], final[:, :, :f, :vd]
