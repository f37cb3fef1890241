"""Pallas chunked-scan kernels for gated linear attention (Triton on GPUs).

Computes, for scalar per-head log gates ``g`` (fixed decay, Mamba-2 / simple
GLA gates, or none) and optional state resets,

  S_t = exp(g_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t,

as Lightning Attention-2 does: the sequence is cut into chunks of C tokens;
inside a chunk the output is a masked, decayed matmul ``(q k^T * D) v`` and
the state entering the chunk adds ``exp(G_i) q_i S``; the state is carried
from chunk to chunk in registers (float32) by one program per
(batch, head, value block, split).

Parallelism: B * N * (V / block) programs can be far fewer than the 132 SMs
of an H100 at long T and small batch. The sequence is then also cut into
``num_splits`` splits processed in parallel, in two phases: a matmul kernel
(``_gram_kernel``) computes each split's own state contribution
``sum_j w_j k_j^T v_j`` (one [F, V] matrix per split, with large row blocks,
so it runs near matmul speed; not for the last split, whose sum no later
split needs: the final state comes from the sweep), a short chain over
splits gives the state entering every split, and the chunked kernel then
runs every split from its own starting state.

Backward pass (custom_vjp): the forward stores no per-chunk states; they
are recomputed. ``_dq_kernel`` sweeps forward from the split starting states
saved by the forward pass; ``_dk_kernel`` (one program per key-feature
block) and ``_dv_kernel`` (per value block) sweep backward carrying their
block of the state gradient dS (split ends from a Gram kernel over
``q^T dO`` and a reverse chain). Separate dk and dv kernels keep every
program's accumulators within the register file (a fused dk/dv program
spilled at H = Hv = 128; measured with ptxas for sm_90a). The gradient of
the log gates: every pair (query i, key j) with ``j < t <= i`` carries
``g_t``, so for t in chunk c

  dg_t = sum_{i >= t in c} q_i.dq_i - sum_{j >= t in c} k_j.dk_j + E_c,
  E_c = sum_{j in c} k_j.dk_j[inter] + <dS_out(c), dec_c S_in(c)>

(``dk[inter]`` the part from the state gradient leaving the chunk, the last
term the pairs spanning the whole chunk). The kernels emit the row sums in
float32; ``_dk_kernel`` computes E_c from the states entering each chunk,
which ``_dq_kernel`` stores ([B, N, chunks, F, V] in the input dtype). The
same identity over the whole sequence (a global reverse cumsum plus
<dS_T, S_T>) needs no stored states, but there the q and k row sums of the
pairs with ``j >= t``, rounded differently (bf16 states and weights),
cancel over the entire remaining sequence: with bf16 inputs d log_decay
(a sum over t) came out wrong by ~5% of sum |dg| at T = 1000.

Numerics: decays enter only as chunk-relative (or split-relative) cumulative
log gates, exponentiated after subtraction, so every factor is <= 1; the
state and all accumulators are float32, matmul operands are in the input
dtype.

Runs through Triton on GPUs and in interpret mode elsewhere. Depends only on
jax.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["KernelConfig", "chunked_linear_attention", "default_config"]

_F32 = jnp.float32
# Without per-row weights (no gate, no resets) the Gram pass multiplies by
# none (since 2026-12-06 evening); False: by ones, as before (timing only,
# scripts/gpu/linear_profile.py --parts). On an H100 (run82) the ungated
# Gram pass took 0.174 -> 0.138 ms at T = 32k (B = 2, 4 splits) and
# 0.173 -> 0.159 at 64k, the forward 118 -> 128 and 118 -> 123 M tokens/s.
_UNWEIGHTED_GRAM = True


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling of the chunked-scan kernels.

  Attributes:
    chunk: C, tokens per chunk (power of two, >= 16).
    block_v: value columns per forward program.
    block_f: key-feature rows of the state per dq and dk program.
    block_v_bwd: value columns per dv program.
    block_rows: rows per step of the split-state (Gram) kernel.
    block_v_gram: value (or dO) columns per Gram program; the whole padded
      V up to this, so that each key (query) tile is read once.
    num_warps, num_stages: Triton launch parameters (forward).
      ``default_config`` pipelines 4 stages in the ungated bf16/f16
      forward (H100, run49: 156 -> 176 M tokens/s at T = 4k, 109 -> 119
      at 64k) and 2 where a gate or decay is present (3 or 4 stages made
      the fixed-decay and scalar-gate forwards 12-16% slower).
    num_warps_gram, num_stages_gram: the same for the Gram kernel.
    num_warps_bwd, num_stages_bwd: the same for the backward kernels.
    num_splits: sequence splits (None: ``_auto_splits``).
    split_programs_per_sm: what ``_auto_splits`` aims at: programs (batch x
      head x split) per SM when the batch and heads alone do not fill the
      GPU.
    num_sms: streaming multiprocessors to plan for (None: the device's
      count; 132, an H100, where the device does not say).
    prefetch_weights: the sweeps (forward, dq, dv, dk) load each chunk's
      per-token weights (wq, wk) one chunk ahead, carried through the
      loop: Triton's pipeliner leaves these [C] float32 loads synchronous
      inside the sequential loop (the forward's compiled TTGIR for an
      H100, read without a GPU), so every step waits on memory for them.
      Opt-in, not yet timed (as ``DeltaConfig.prefetch_weights``).
    chained_tile: tokens per tile of the single-pass ("chained") forward,
      0 for none. Where the sequence is split (``num_splits`` or
      ``_auto_splits`` > 1), one kernel replaces the forward's Gram pass,
      chain over splits and sweeps: each
      program sums its tile's k^T v (from HBM), publishes that sum in
      global memory, adds its predecessors' published sums or prefix states
      (decoupled look-back, spinning on per-tile flags), publishes its own
      prefix state and sweeps the tile again for the outputs (k and v from
      L2 when the tile is short). Programs wait only on earlier tiles of
      their head, which start earlier in launch order. Under
      differentiation it also stores the states entering the splits for
      the backward. Rounded down to a divisor of the split length (in
      chunks). Not bitwise repeatable: whether a tile adds its
      predecessor's prefix state or the sums of several tiles before it
      depends on timing. Opt-in and slower than the split path on an
      H100 (run68: 78-99 against 119 M tokens/s forward at T = 64k, the
      longer the tile the faster; ``scripts/gpu/chained_time.py``).
    chained_lookback: False: the chained forward publishes only the states
      leaving the tiles, so each tile waits for its predecessor's (a
      serial chain of hand-offs through L2, half the published bytes).
    gram_parts: programs per split of the Gram pass (rounded up to a
      power of two), each summing a contiguous 1 / gram_parts of the
      split's rows, their sums then added (jnp, float32): at T = 64k,
      B = 1 the pass has 7 x 16 programs for 132 SMs, each a sequential
      loop over 8k rows. Halved while the split's rows do not divide into
      whole Gram steps. Opt-in: slower on an H100 (run82, no gate: the
      Gram pass at T = 32k 0.138 -> 0.154 / 0.163 ms at 2 / 4 parts, 64k
      0.159 -> 0.178 / 0.188; it already streams k and v at about the
      full bandwidth, 3.3 TB/s), GPU tests pass.
    packed_weights: the sweeps (forward, chained forward, dq, dv, dk) read
      each chunk's per-token weights (the chunk-local log-gate sums, wq,
      wk and the reset counts) as one [C, 4] float32 tile of one array
      ([B, N, Tp, 4], built in ``_prep``) instead of three or four [C]
      vectors, and pick the columns out in registers. Compiled for an
      H100 (``scripts/aot/ptxas_report.py --case scalar --loads``, T = 4k,
      B = 16, gated) Triton's pipeliner leaves synchronous loads in the
      sweeps' loops: 2 / 3 / 2 / 4 a step in the forward / dq / dv / dk
      kernels with separate arrays (the [C] weight vectors among them),
      0 / 1 / 0 / 2 packed (the tile becomes an asynchronous copy; the
      rest are q or dO tiles), no spills either way. The delta rule's
      sweeps gained 3-30% from the same change
      (``DeltaConfig.packed_weights``, H100, runs 108-111). Opt-in here:
      CPU- and lowering-tested, not yet run on a GPU
      (``scripts/gpu/pending.sh linpacked``).
  """
  chunk: int = 64
  block_v: int = 64
  block_f: int = 64
  block_v_bwd: int = 64
  block_rows: int = 64
  block_v_gram: int = 128
  num_warps: int = 4
  num_stages: int = 2
  num_warps_gram: int = 8
  num_stages_gram: int = 3
  num_warps_bwd: int = 8
  num_stages_bwd: int = 2
  num_splits: int | None = None
  split_programs_per_sm: float = 0.5
  num_sms: int | None = None
  prefetch_weights: bool = False
  chained_tile: int = 0
  chained_lookback: bool = True
  gram_parts: int = 1
  packed_weights: bool = False


def default_config(dtype=jnp.bfloat16, feature_dim: int | None = None,
                   value_dim: int | None = None, *, gated: bool = True,
                   **overrides) -> KernelConfig:
  """Defaults for ``dtype``, the (unpadded) feature / value dims and whether
  the call has a gate (``log_gate``, a fixed decay folded in included).

  Chosen without a GPU from Triton compiles for sm_90a (ptxas register,
  spill and shared-memory reports): every kernel at these tiles uses wgmma
  and does not spill for H in {64, 128, 256}, bf16 and float32. The forward
  and dv kernels hold full-F tiles (narrower value blocks when F > 128); the
  dq and dk kernels hold full-V tiles (narrower feature blocks when
  V > 128); float32 tiles hold twice the bytes.

  For tuning, the environment variable ``ATTNJAX_LINEAR_SCAN_CONFIG`` may
  hold a JSON object of ``KernelConfig`` fields applied on top (e.g.
  ``{"chunk": 128, "num_warps": 8}``); explicit overrides win.
  """
  wide_f = feature_dim is not None and _padded_dim(feature_dim) > 128
  wide_v = value_dim is not None and _padded_dim(value_dim) > 128
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    base = KernelConfig(block_v=32, block_v_bwd=32,
                        block_f=16 if wide_v else 32, num_warps=8,
                        block_v_gram=32, num_stages_gram=2)
  else:
    base = KernelConfig(block_v=32 if wide_f else 64,
                        block_v_bwd=32 if wide_f else 64,
                        block_f=16 if wide_v else 64,
                        num_warps=8 if wide_f else 4,
                        block_v_gram=64 if wide_f else 128,
                        num_stages_gram=2 if wide_f or wide_v else 3,
                        num_stages=2 if gated or wide_f else 4)
  base = env_overrides(base, "ATTNJAX_LINEAR_SCAN_CONFIG")
  return dataclasses.replace(base, **overrides)


def env_overrides(cfg, var: str):
  """``cfg`` with the fields of the JSON object in environment variable
  ``var`` (if set) replaced: a tuning override of a default
  configuration, e.g. for benchmarking a candidate default beside the
  other libraries without editing code."""
  env = os.environ.get(var)
  if not env:
    return cfg
  return dataclasses.replace(cfg, **json.loads(env))


def _pow2(x: int, lo: int = 16) -> int:
  return max(lo, 1 << (max(int(x), 1) - 1).bit_length())


def _padded_dim(d: int) -> int:
  """Feature/value dims are zero-padded to a power of two (Triton tiles)."""
  return _pow2(d)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: a custom_vjp nondiff arg)."""
  scale: float
  chunk: int
  cps: int  # chunks per split
  splits: int
  bv: int
  bf: int
  bvb: int
  rows: int
  bvg: int
  warps: int
  stages: int
  warps_gram: int
  stages_gram: int
  warps_bwd: int
  stages_bwd: int
  has_gate: bool
  has_seg: bool
  has_s0: bool
  interpret: bool
  upcast: bool  # interpret mode on CPU: matmuls in float32
  rep: int  # query heads per key/value head
  # The gate's gradient is wanted (the backward pass sets it from whether
  # log_gate is perturbed, e.g. False for a fixed decay that is not learned).
  gate_grad: bool = True
  prefetch: bool = False  # KernelConfig.prefetch_weights
  chain_cps: int = 0  # chunks per tile of the chained forward (0: none)
  chain_lookback: bool = True  # KernelConfig.chained_lookback
  tiles_per_split: int = 1  # the chained kernel's tiles a caller's split
  gram_parts: int = 1  # KernelConfig.gram_parts (after reduction)
  packed: bool = False  # KernelConfig.packed_weights

  @property
  def packs(self):
    """The sweeps read gc, wq, wk and the reset counts as one [Tp, 4]
    array (``packed_weights``, where there are per-token weights)."""
    return self.packed and self.has_w

  @property
  def has_w(self):
    return self.has_gate or self.has_seg

  @property
  def needs_dg(self):
    """The backward kernels emit the gate gradient's row terms."""
    return self.has_gate and self.gate_grad

  @property
  def split_len(self):
    return self.cps * self.chunk


def _params(s: _Static, bwd: bool = False, gram: bool = False):
  if s.interpret:
    return None
  if gram:
    return plgpu.CompilerParams(num_warps=s.warps_gram,
                                num_stages=s.stages_gram)
  if bwd:
    return plgpu.CompilerParams(num_warps=s.warps_bwd,
                                num_stages=s.stages_bwd)
  return plgpu.CompilerParams(num_warps=s.warps, num_stages=s.stages)


def _dots(s: "_Static"):
  """(a b, a^T b, a b^T) with float32 accumulation.

  In interpret mode on a CPU backend there is no bf16 x bf16 -> f32 matmul;
  the operands are already rounded, so upcasting gives the same products.
  Compiled, float32 operands use three TF32 passes (split hi/lo operands:
  close to float32 accuracy on the tensor cores); Triton's default for a
  float32 dot is one TF32 pass (~1e-3 relative error, seen on an H100).
  """
  def mm(a, b, dims):
    if s.upcast and a.dtype != _F32:
      a, b = a.astype(_F32), b.astype(_F32)
    prec = None
    if not s.interpret and a.dtype == _F32:
      prec = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.dot_general(a, b, (dims, ((), ())), precision=prec,
                           preferred_element_type=_F32)
  return (lambda a, b: mm(a, b, ((1,), (0,))),
          lambda a, b: mm(a, b, ((0,), (0,))),
          lambda a, b: mm(a, b, ((1,), (1,))))


def _last(x):
  """x[-1] of a 1-D block, as a reduction (no scalar indexing in Triton)."""
  n = x.shape[0]
  return jnp.sum(jnp.where(jnp.arange(n) == n - 1, x, 0.0))


def _chunk_rows(r0, c: int):
  """``pl.ds`` of the ``c`` rows from ``r0`` (traced: marked a multiple
  of ``c``; a Python int as is, since ``pl.multiple_of`` takes traced
  values only)."""
  if isinstance(r0, int):
    return pl.ds(r0, c)
  return pl.ds(pl.multiple_of(r0, c), c)


def sweep_loop(n: int, step, weights, carry, prefetch: bool):
  """``carry = step(i, carry, weights(i))`` for i in [0, n), as a
  ``fori_loop``. With ``prefetch`` the weights of step i + 1 are loaded at
  the top of step i and carried through the loop, so that their loads
  (small per-token vectors, which Triton's pipeliner leaves synchronous)
  overlap step i's work instead of stalling step i + 1; the last step
  loads its own weights again."""
  if not prefetch:
    return lax.fori_loop(0, n, lambda i, x: step(i, x, weights(i)), carry)

  def body(i, x):
    carry, wts = x
    nxt = weights(jnp.minimum(i + 1, n - 1))
    return step(i, carry, wts), nxt

  return lax.fori_loop(0, n, body, (carry, weights(0)))[0]


@dataclasses.dataclass(frozen=True)
class _TokenRefs:
  """A sweep's per-token refs: gc, wq, wk, rc (those present), or with
  ``packed_weights`` the one [Tp, 4] ref ``pk`` of all four."""
  gc: Any = None
  wq: Any = None
  wk: Any = None
  rc: Any = None
  pk: Any = None


def _token_refs(s: _Static, it) -> _TokenRefs:
  """Takes the per-token refs from ``it`` in ``_specs_tokens``' order."""
  if s.packs:
    return _TokenRefs(pk=next(it))
  gc = next(it) if s.has_gate else None
  wq, wk = (next(it), next(it)) if s.has_w else (None, None)
  rc = next(it) if s.has_seg else None
  return _TokenRefs(gc=gc, wq=wq, wk=wk, rc=rc)


def _step_weights(s: _Static, tok: _TokenRefs, base, reverse: bool):
  """``weights(i)`` for ``sweep_loop``: step i's chunk's (wq, wk) rows
  (chunk i of the split from ``base``, or cps - 1 - i when ``reverse``),
  () without per-token weights. With ``packed_weights``: (wq, wk, gc,
  rc) from one [C, 4] tile (gc, rc None where absent; rc as float32)."""
  def weights(i):
    if not s.has_w:
      return ()
    ci = s.cps - 1 - i if reverse else i
    rows = _chunk_rows(base + ci * s.chunk, s.chunk)
    if not s.packs:
      return tok.wq[rows], tok.wk[rows]
    tile = tok.pk[rows, :]
    col = lax.broadcasted_iota(jnp.int32, tile.shape, 1)
    pick = lambda j: jnp.sum(jnp.where(col == j, tile, 0.0), axis=1)  # noqa: E731
    return (pick(1), pick(2), pick(0) if s.has_gate else None,
            pick(3) if s.has_seg else None)
  return weights


def _intra_weights(s: _Static, tok: _TokenRefs, rows, transpose: bool,
                   wts=()):
  """D [C, C]: causal mask * exp(G_i - G_j) * same-segment (or its T);
  G and the reset counts from ``wts`` (the step's weights) where
  ``packed_weights`` put them there, else from their refs."""
  c = s.chunk
  i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  j = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  mask = (j <= i) if not transpose else (i <= j)
  if s.has_seg:
    r = wts[3] if s.packs else tok.rc[rows]
    mask = jnp.logical_and(mask, r[:, None] == r[None, :])
  if not s.has_gate:
    return mask.astype(_F32)
  g = wts[2] if s.packs else tok.gc[rows]
  diff = (g[:, None] - g[None, :]) if not transpose else (
      g[None, :] - g[:, None])
  return jnp.exp(jnp.where(mask, diff, -jnp.inf))


# ----------------------------------------------------------------------------
# Kernels. Grid axes are (value or feature block, head, split, batch): the
# first axis varies fastest in launch order, so programs that read the same
# q/k tiles run side by side and share L2.


def _state_update(s: _Static, state, k, v, wts):
  """The state after one chunk: decayed by the chunk's total decay, plus
  k^T v with k_j's decay to the chunk end applied to the narrower v."""
  _, _dot_tn, _ = _dots(s)
  if s.has_w:
    wq, wk = wts[:2]
    vw = (v.astype(_F32) * wk[:, None]).astype(v.dtype)
    return state * _last(wq) + _dot_tn(k, vw)
  return state + _dot_tn(k, v)


def _fwd_step(s: _Static, q_ref, k_ref, v_ref, tok, o_ref, base):
  """``step(i, state, wts)`` of the forward sweep over the chunks from row
  ``base``: writes chunk i's outputs, returns the state after it."""
  _dot, _, _dot_nt = _dots(s)
  c = s.chunk

  def step(i, state, wts):
    rows = _chunk_rows(base + i * c, c)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    a = _dot_nt(q, k) * _intra_weights(s, tok, rows, False, wts)
    o = _dot((a * s.scale).astype(v.dtype), v)
    qs = _dot(q, state.astype(q.dtype))
    if s.has_w:
      qs = qs * wts[0][:, None]
    o_ref[rows, :] = (o + s.scale * qs).astype(o_ref.dtype)
    return _state_update(s, state, k, v, wts)
  return step


def _fwd_kernel(*refs, s: _Static):
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  tok = _token_refs(s, it)
  s0_ref = next(it) if s.has_s0 else None
  o_ref, st_ref = next(it), next(it)
  base = pl.program_id(2) * s.split_len
  state = (s0_ref[...].astype(_F32) if s.has_s0 else
           jnp.zeros(st_ref.shape, _F32))
  weights = _step_weights(s, tok, base, reverse=False)
  step = _fwd_step(s, q_ref, k_ref, v_ref, tok, o_ref, base)
  st_ref[...] = sweep_loop(s.cps, step, weights, state, s.prefetch)


# The chained forward publishes each tile's leaving state for the tiles
# after it. In interpret mode every earlier tile has published it before a
# tile looks back, so the walk over published sums alone never runs there;
# tests turn this off to run it (each tile then walks back to tile 0).
_PUBLISH_PREFIX = True


def _chained_fwd_kernel(*refs, s: _Static):
  """The single-pass forward over tiles of ``s.split_len`` rows (program
  axis 2), chained by decoupled look-back (``KernelConfig.chained_tile``).

  ``buf`` [tiles, 2, F, bv] holds each tile's published sums: slot 0 its
  own k^T v (decayed to the tile end), slot 1 the state leaving it; the
  tile's flag is raised to 1 and 2 after each (atomic max, acquire /
  release at GPU scope; a CTA barrier first, so that every thread's
  stores precede it). The state entering tile t adds, walking back from
  t - 1, each tile's own sum (decayed by the tiles after it) until one
  has published its leaving state, or ``s0`` before tile 0.
  """
  if not (_PUBLISH_PREFIX or s.chain_lookback):
    raise ValueError("a chained forward that publishes nothing would wait "
                     "forever")
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  tok = _token_refs(s, it)
  s0_ref, dec_ref = next(it), next(it)
  next(it)  # the zeroed flags, aliased to flag_ref
  o_ref, st_ref, starts_ref, buf_ref, flag_ref = (
      next(it), next(it), next(it), next(it), next(it))
  tile = pl.program_id(2)
  base = tile * s.split_len
  weights = _step_weights(s, tok, base, reverse=False)
  k_rows = lambda i: _chunk_rows(base + i * s.chunk, s.chunk)  # noqa: E731

  def local_step(i, state, wts):
    rows = k_rows(i)
    return _state_update(s, state, k_ref[rows, :], v_ref[rows, :], wts)

  zero = jnp.zeros(st_ref.shape, _F32)
  local = sweep_loop(s.cps, local_step, weights, zero, s.prefetch)

  def publish(slot, x):
    buf_ref[tile, slot] = x
    if not s.interpret:
      plgpu.debug_barrier()
    plgpu.atomic_max(flag_ref, (tile,), tile * 0 + slot + 1)

  def decay(u):  # tile u's total decay, as a scalar
    return jnp.sum(dec_ref[pl.ds(u, 1)])

  if s.chain_lookback:
    publish(0, local)

  def poll(u):
    return lax.while_loop(
        lambda f: f < 1,
        lambda f: plgpu.atomic_add(flag_ref, (u,), f * 0), u * 0)

  def back(carry):
    u, acc, d, _ = carry
    full = poll(u) >= 2
    x = buf_ref[u, full.astype(jnp.int32)]
    return u - 1, acc + d * x, d * decay(u), full

  # The carry starts from traced values (a decay of 1, "not found"): a
  # constant in the loop would stop interpret mode's state discharge.
  _, acc, d, found = lax.while_loop(
      lambda c: jnp.logical_and(c[0] >= 0, jnp.logical_not(c[3])), back,
      (tile - 1, zero, decay(0) * 0 + 1.0, tile < 0))
  start = acc + jnp.where(found, 0.0, d) * s0_ref[...].astype(_F32)
  if _PUBLISH_PREFIX:
    # The tile's own sum read back (not kept live through the walk: at
    # F = 128 a third [F, bv] float32 tile in registers spilled).
    own = buf_ref[tile, 0] if s.chain_lookback else local
    publish(1, decay(tile) * start + own)

  @pl.when(tile % s.tiles_per_split == 0)
  def _():
    starts_ref[tile // s.tiles_per_split] = start

  step = _fwd_step(s, q_ref, k_ref, v_ref, tok, o_ref, base)
  final = sweep_loop(s.cps, step, weights, start, s.prefetch)

  @pl.when(tile == s.splits - 1)
  def _():
    st_ref[...] = final


def _gram_kernel(*refs, s: _Static, first: int, weighted: bool,
                 scale: float):
  """o = scale * sum over the split's rows of (w * a)^T b (program ``sp``
  takes split ``first + sp // gram_parts``, its part ``sp %
  gram_parts``). Without per-row weights (``weighted`` False: no gate,
  no resets) both operands go to the matmul as loaded: weighting them
  takes a pass through registers and back to shared memory a step."""
  if weighted:
    a_ref, b_ref, w_ref, o_ref = refs
  else:
    (a_ref, b_ref, o_ref), w_ref = refs, None
  _, _dot_tn, _ = _dots(s)
  r = s.rows
  part_len = s.split_len // s.gram_parts
  sp = pl.program_id(2)
  base = ((sp // s.gram_parts + first) * s.split_len
          + (sp % s.gram_parts) * part_len)

  def body(i, acc):
    rows = pl.ds(pl.multiple_of(base + i * r, r), r)
    a = a_ref[rows, :]
    if weighted:
      a = (a.astype(_F32) * w_ref[rows][:, None]).astype(a.dtype)
    return acc + _dot_tn(a, b_ref[rows, :])

  acc = lax.fori_loop(0, part_len // r, body, jnp.zeros(o_ref.shape, _F32))
  o_ref[...] = acc if scale == 1.0 else acc * scale


def _dq_kernel(*refs, s: _Static):
  _dot, _dot_tn, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref = next(it), next(it), next(it), next(it)
  tok = _token_refs(s, it)
  s0_ref = next(it) if s.has_s0 else None
  dq_ref = next(it)
  dgq_ref, hs_ref = (next(it), next(it)) if s.needs_dg else (None, None)
  c = s.chunk
  base = pl.program_id(2) * s.split_len
  shape = (k_ref.shape[-1], v_ref.shape[-1])
  state = s0_ref[...].astype(_F32) if s.has_s0 else jnp.zeros(shape, _F32)

  weights = _step_weights(s, tok, base, reverse=False)

  def step(i, state, wts):
    rows = _chunk_rows(base + i * c, c)
    k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    da = _dot_nt(do, v) * _intra_weights(s, tok, rows, False, wts)
    dq = _dot((da * s.scale).astype(k.dtype), k)
    state_in = state.astype(do.dtype)
    if s.needs_dg:  # for the gate gradient's chunk-spanning term (dk)
      hs_ref[i] = state_in.astype(hs_ref.dtype)
    dqs = _dot_nt(do, state_in)
    if s.has_w:
      wq, wk = wts[:2]
      dqs = dqs * wq[:, None]
    dq = dq + s.scale * dqs
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    if s.needs_dg:
      dgq_ref[rows] = jnp.sum(q_ref[rows, :].astype(_F32) * dq, axis=1)
    if s.has_w:
      kw = (k.astype(_F32) * wk[:, None]).astype(k.dtype)
      return state * _last(wq) + _dot_tn(kw, v)
    return state + _dot_tn(k, v)

  sweep_loop(s.cps, step, weights, state, s.prefetch)


def _dv_kernel(*refs, s: _Static):
  """dv for one value block, sweeping chunks backwards with dS[:, block]."""
  _dot, _dot_tn, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, do_ref = next(it), next(it), next(it)
  tok = _token_refs(s, it)
  ds_ref = next(it)
  dv_ref, dsout_ref = next(it), next(it)
  c = s.chunk
  base = pl.program_id(2) * s.split_len

  weights = _step_weights(s, tok, base, reverse=True)

  def step(i, dstate, wts):
    rows = _chunk_rows(base + (s.cps - 1 - i) * c, c)
    q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
    # Transposed intra-chunk weights: row j (key), column i (query).
    at = _dot_nt(k, q) * (_intra_weights(s, tok, rows, True, wts)
                          * s.scale)
    # Decays scale the narrow [C, BV] operands and results, never a full
    # [C, F] tile (which would cost registers).
    ks = _dot(k, dstate.astype(k.dtype))
    if s.has_w:  # k_j's decay to the chunk end
      wq, wk = wts[:2]
      ks = ks * wk[:, None]
    dv = _dot(at.astype(do.dtype), do) + ks
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    if s.has_w:
      dow = (do.astype(_F32) * (wq * s.scale)[:, None]).astype(do.dtype)
      return dstate * _last(wq) + _dot_tn(q, dow)
    return dstate + _dot_tn(q, (do * s.scale).astype(do.dtype))

  dsout_ref[...] = sweep_loop(s.cps, step, weights,
                              ds_ref[...].astype(_F32), s.prefetch)


def _dk_kernel(*refs, s: _Static):
  """dk for one key-feature block, sweeping backwards with dS[block, :]."""
  _dot, _dot_tn, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref = next(it), next(it), next(it), next(it)
  tok = _token_refs(s, it)
  hs_ref = next(it) if s.needs_dg else None
  ds_ref = next(it)
  dk_ref = next(it)
  dgk_ref = next(it) if s.needs_dg else None
  c = s.chunk
  base = pl.program_id(2) * s.split_len

  weights = _step_weights(s, tok, base, reverse=True)

  def step(i, dstate, wts):
    ci = s.cps - 1 - i
    rows = _chunk_rows(base + ci * c, c)
    q, v, do = q_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    dat = _dot_nt(v, do) * (_intra_weights(s, tok, rows, True, wts)
                            * s.scale)
    vs = _dot_nt(v, dstate.astype(v.dtype))
    if s.has_w:  # k_j's decay to the chunk end, on the narrow [C, BF]
      wq, wk = wts[:2]
      vs = vs * wk[:, None]
    dk = _dot(dat.astype(q.dtype), q) + vs
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    if s.needs_dg:
      # Row terms k_j.dk_j, minus (on the chunk's last row, so that the
      # chunk-local reverse cumsum in _core_bwd adds it to every row) the
      # chunk's constant E = sum_j k_j.dk_j[inter] + <dS_out, dec S_in>:
      # the pairs (key before the chunk, query after it) and the inter-chunk
      # part of the k rows, the latter exactly the values in the rows.
      # (One axis at a time: a two-axis sum fails in the Triton lowering
      # under a mesh, e.g. the H100 export test.)
      kf = k_ref[rows, :].astype(_F32)
      spans = jnp.sum(jnp.sum(dstate * hs_ref[ci].astype(_F32), axis=1))
      e = jnp.sum(jnp.sum(kf * vs, axis=1)) + _last(wq) * spans
      last = jnp.arange(c) == c - 1
      dgk_ref[rows] = (jnp.sum(kf * dk, axis=1) - jnp.where(last, e, 0.0))
    if s.has_w:
      qw = (q.astype(_F32) * (wq * s.scale)[:, None]).astype(q.dtype)
      return dstate * _last(wq) + _dot_tn(qw, do)
    return dstate + _dot_tn((q * s.scale).astype(q.dtype), do)

  sweep_loop(s.cps, step, weights, ds_ref[...].astype(_F32), s.prefetch)


# ----------------------------------------------------------------------------
# pallas_call wrappers. Layouts: q, dO [B, Tp, N, *], k, v [B, Tp, K, *],
# per-token weights [B, N, Tp] (float32), reset counters [B, Tp] (int32),
# per-split states [B, N, ns, F, V] (float32).


def _seq_spec(width, head_map, col_map):
  """BlockSpec over [B, Tp, heads, D]: all of T, one head, one column block."""
  def index(j, n, sp, b):
    return (b, 0, head_map(n), col_map(j))
  return width, index


def _specs_tokens(tp, s: _Static, where=lambda j, n, sp, b: (b, n)):
  """Specs for gc, wq, wk, rc (in that order, those present), or the one
  packed [Tp, 4] array of them (``packed_weights``); ``where`` maps a
  program's grid indices to its (batch, head)."""
  def per_head(*shape):
    return pl.BlockSpec((None, None) + shape,
                        lambda *g: where(*g) + (0,) * len(shape))
  if s.packs:
    return [per_head(tp, 4)]
  specs = []
  if s.has_gate:
    specs.append(per_head(tp))
  if s.has_w:
    specs += [per_head(tp), per_head(tp)]
  if s.has_seg:
    specs.append(pl.BlockSpec((None, tp), lambda *g: (where(*g)[0], 0)))
  return specs


def _token_args(prep, s: _Static):
  if s.packs:
    return [prep["pk"]]
  args = []
  if s.has_gate:
    args.append(prep["gc"])
  if s.has_w:
    args += [prep["wq"], prep["wk"]]
  if s.has_seg:
    args.append(prep["rc"])
  return args


def _state_spec(f, bv, col_block: bool = True):
  if col_block:
    return pl.BlockSpec((None, None, None, f, bv),
                        lambda j, n, sp, b: (b, n, sp, 0, j))
  return pl.BlockSpec((None, None, None, f, bv),
                      lambda j, n, sp, b: (b, n, sp, j, 0))


def _chunk_state_spec(bf, vp, s: _Static):
  """Per-chunk states [B, N, chunks, F, V]: one split's chunks, a row
  block of F."""
  return pl.BlockSpec((None, None, s.cps, bf, vp),
                      lambda j, n, sp, b: (b, n, sp, j, 0))


def _blk(shape_t, bd, head_fn, col_fn):
  return pl.BlockSpec((None, shape_t, None, bd),
                      lambda j, n, sp, b: (b, 0, head_fn(n), col_fn(j)))


def _fwd_call(q, k, v, prep, starts, s: _Static):
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  bv = min(s.bv, vp)
  kv = lambda x: x // s.rep  # noqa: E731
  same = lambda x: x  # noqa: E731
  zero = lambda j: 0  # noqa: E731
  col = lambda j: j  # noqa: E731
  in_specs = [_blk(tp, f, same, zero), _blk(tp, f, kv, zero),
              _blk(tp, bv, kv, col)] + _specs_tokens(tp, s)
  args = [q, k, v] + _token_args(prep, s)
  if s.has_s0:
    in_specs.append(_state_spec(f, bv))
    args.append(starts)
  grid = (vp // bv, n, s.splits, b)
  return _flat_call(
      functools.partial(_fwd_kernel, s=s),
      grid=grid,
      in_specs=in_specs,
      out_specs=[_blk(tp, bv, same, col), _state_spec(f, bv)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, vp), q.dtype),
                 jax.ShapeDtypeStruct((b, n, s.splits, f, vp), _F32)],
      compiler_params=_params(s),
      interpret=s.interpret,
      name="linear_scan_fwd",
  )(*args)


def _chained_call(q, k, v, prep, s0, s: _Static):
  """``_chained_fwd_kernel`` over ``s.splits`` tiles of ``s.split_len``
  rows, ``s.tiles_per_split`` a split of the caller; returns (o, the state
  leaving the last tile, the states entering the splits). The grid is (value
  block, batch x head, tile): tiles last, so that every program starts
  after the earlier tiles of its head (in launch order on a GPU, in grid
  order in interpret mode), which it may wait on."""
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  bv = min(s.bv, vp)
  nvb, tiles = vp // bv, s.splits
  hb = lambda x: (x // n, x % n)  # noqa: E731  (batch, head)

  def seq(width, head_fn, col):
    return pl.BlockSpec((None, tp, None, width), lambda j, x, t: (
        hb(x)[0], 0, head_fn(hb(x)[1]), j if col else 0))

  per_head = lambda *shape: pl.BlockSpec(  # noqa: E731
      (None, None) + shape, lambda j, x, t: hb(x) + (0,) * len(shape))
  kv = lambda m: m // s.rep  # noqa: E731
  in_specs = [seq(f, lambda m: m, False), seq(f, kv, False),
              seq(bv, kv, True)]
  args = [q, k, v]
  in_specs += _specs_tokens(tp, s, lambda j, x, t: hb(x))
  args += _token_args(prep, s)
  state = pl.BlockSpec((None, None, f, bv), lambda j, x, t: hb(x) + (0, j))
  flags = pl.BlockSpec((None, None, None, tiles),
                       lambda j, x, t: hb(x) + (j, 0))
  in_specs += [state, per_head(tiles), flags]
  args += [s0, prep["sdec"], jnp.zeros((b, n, nvb, tiles), jnp.int32)]
  splits = tiles // s.tiles_per_split
  out_specs = [seq(bv, lambda m: m, True), state,
               pl.BlockSpec((None, None, splits, f, bv),
                            lambda j, x, t: hb(x) + (0, 0, j)),
               pl.BlockSpec((None, None, tiles, 2, f, bv),
                            lambda j, x, t: hb(x) + (0, 0, 0, j)),
               flags]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, vp), q.dtype),
               jax.ShapeDtypeStruct((b, n, f, vp), _F32),
               jax.ShapeDtypeStruct((b, n, splits, f, vp), _F32),
               jax.ShapeDtypeStruct((b, n, tiles, 2, f, vp), _F32),
               jax.ShapeDtypeStruct((b, n, nvb, tiles), jnp.int32)]
  o, final, starts, _, _ = pl.pallas_call(
      functools.partial(_chained_fwd_kernel, s=s),
      grid=(nvb, b * n, tiles),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={len(args) - 1: 4},
      # At most 3 stages: with 4 (the ungated default) the kernel spilled
      # 96 bytes for an H100 at F = V = 128, with 3 or 2 none.
      compiler_params=_params(dataclasses.replace(
          s, stages=min(s.stages, 3))), interpret=s.interpret,
      name="linear_scan_chained_fwd",
  )(*args)
  return o, final, starts


def _gram_call(a, bmat, w, s: _Static, a_rep: int, reverse: bool = False,
               scale: float = 1.0):
  """Per-split sum of scale (w * a)^T b; a [B,Tp,Na,F], b [B,Tp,Nb,V], w
  [B,N,Tp] or None (no weights), with N = Na * a_rep query heads.

  Only the splits whose sums the chain over splits reads (``_chain_splits``):
  all but the last one (forward) or all but the first (``reverse``), so
  [B, N, splits - 1, F, V]; the one left out would cost a pass over a
  split's a and b (half the Gram pass at two splits).
  """
  bsz, tp, na, f = a.shape
  vp = bmat.shape[-1]
  n = na * a_rep
  bv = min(s.bvg, vp)
  b_rep = n // bmat.shape[2]
  parts = s.gram_parts
  in_specs = [
      _blk(tp, f, lambda x: x // a_rep, lambda j: 0),
      _blk(tp, bv, lambda x: x // b_rep, lambda j: j),
  ]
  args = [a, bmat]
  if w is not None:
    in_specs.append(pl.BlockSpec((None, None, tp),
                                 lambda j, n_, sp, b: (b, n_, 0)))
    args.append(w)
  out = _flat_call(
      functools.partial(_gram_kernel, s=s, first=int(reverse),
                        weighted=w is not None, scale=float(scale)),
      grid=(vp // bv, n, (s.splits - 1) * parts, bsz),
      in_specs=in_specs,
      out_specs=_state_spec(f, bv),
      out_shape=jax.ShapeDtypeStruct(
          (bsz, n, (s.splits - 1) * parts, f, vp), _F32),
      compiler_params=_params(s, gram=True),
      interpret=s.interpret,
      name="linear_scan_split_state",
  )(*args)
  if parts > 1:
    out = out.reshape(bsz, n, s.splits - 1, parts, f, vp).sum(axis=3)
  return out


def _key_column_inputs(q, k, v, do, prep, bf, s: _Static):
  """Specs and arguments shared by the dQ and dK kernels (grid over blocks
  of ``bf`` key-feature columns): q and k column blocks, whole v and dO rows,
  then the per-token weights."""
  tp, vp = q.shape[1], v.shape[-1]
  kv = lambda x: x // s.rep  # noqa: E731
  same = lambda x: x  # noqa: E731
  zero = lambda j: 0  # noqa: E731
  col = lambda j: j  # noqa: E731
  in_specs = [_blk(tp, bf, same, col), _blk(tp, bf, kv, col),
              _blk(tp, vp, kv, zero), _blk(tp, vp, same, zero)]
  in_specs += _specs_tokens(tp, s)
  return in_specs, [q, k, v, do] + _token_args(prep, s)


def _dq_call(q, k, v, do, prep, starts, s: _Static):
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  bf = min(s.bf, f)
  in_specs, args = _key_column_inputs(q, k, v, do, prep, bf, s)
  out_block = _blk(tp, bf, lambda x: x, lambda j: j)
  if s.has_s0:
    in_specs.append(_state_spec(bf, vp, col_block=False))
    args.append(starts)
  out_specs = [out_block]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, f), q.dtype)]
  if s.needs_dg:
    out_specs += [pl.BlockSpec((None, None, None, tp),
                               lambda j, n_, sp, b_: (j, b_, n_, 0)),
                  _chunk_state_spec(bf, vp, s)]
    out_shape += [jax.ShapeDtypeStruct((f // bf, b, n, tp), _F32),
                  jax.ShapeDtypeStruct((b, n, s.splits * s.cps, f, vp),
                                       q.dtype)]
  return _flat_call(
      functools.partial(_dq_kernel, s=s),
      grid=(f // bf, n, s.splits, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_dq",
  )(*args)


def _dv_call(q, k, do, prep, ds_end, s: _Static):
  b, tp, n, f = q.shape
  vp = do.shape[-1]
  bv = min(s.bvb, vp)
  kv = lambda x: x // s.rep  # noqa: E731
  same = lambda x: x  # noqa: E731
  zero = lambda j: 0  # noqa: E731
  col = lambda j: j  # noqa: E731
  in_specs = [_blk(tp, f, same, zero), _blk(tp, f, kv, zero),
              _blk(tp, bv, same, col)] + _specs_tokens(tp, s)
  in_specs.append(_state_spec(f, bv))
  args = [q, k, do] + _token_args(prep, s) + [ds_end]
  return _flat_call(
      functools.partial(_dv_kernel, s=s),
      grid=(vp // bv, n, s.splits, b),
      in_specs=in_specs,
      out_specs=[_blk(tp, bv, same, col), _state_spec(f, bv)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, vp), do.dtype),
                 jax.ShapeDtypeStruct((b, n, s.splits, f, vp), _F32)],
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_dv",
  )(*args)


def _dk_call(q, k, v, do, prep, chunk_states, ds_end, s: _Static):
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  bf = min(s.bf, f)
  in_specs, args = _key_column_inputs(q, k, v, do, prep, bf, s)
  out_block = _blk(tp, bf, lambda x: x, lambda j: j)
  if s.needs_dg:
    in_specs.append(_chunk_state_spec(bf, vp, s))
    args.append(chunk_states)
  in_specs.append(_state_spec(bf, vp, col_block=False))
  args.append(ds_end)
  out_specs = [out_block]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, f), k.dtype)]
  if s.needs_dg:
    out_specs.append(pl.BlockSpec((None, None, None, tp),
                                  lambda j, n_, sp, b_: (j, b_, n_, 0)))
    out_shape.append(jax.ShapeDtypeStruct((f // bf, b, n, tp), _F32))
  return _flat_call(
      functools.partial(_dk_kernel, s=s),
      grid=(f // bf, n, s.splits, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, bwd=True),
      interpret=s.interpret,
      name="linear_scan_dk",
  )(*args)


# ----------------------------------------------------------------------------
# Per-token weights (jnp, float32, cheap: [B, N, Tp]).


def _rev_excl_cumsum(x, axis):
  """sum_{u > t} x_u along axis, without subtracting large sums."""
  x = jnp.moveaxis(x, axis, -1)
  shifted = jnp.concatenate([x[..., 1:], jnp.zeros_like(x[..., :1])], -1)
  out = jnp.flip(jnp.cumsum(jnp.flip(shifted, -1), -1), -1)
  return jnp.moveaxis(out, -1, axis)


def _block_weights(g, resets, block):
  """Weights relative to blocks of ``block`` tokens along the last axis.

  g [B, N, Tp] float32 (or None), resets [B, Tp] bool (or None). Returns
  (gc, wq, wk, dec): gc the block-local inclusive cumulative log gate, wq
  ``exp(gc) * [no reset in [block start, i]]``, wk ``exp(sum_{u in (j, block
  end]} g_u) * [no reset in (j, block end]]``, dec [B, N, nblocks] the whole
  block's decay.
  """
  if g is None:  # resets only: every decay is 1
    b, tp = resets.shape
    n, nb = 1, tp // block
    gc = jnp.zeros((b, n, nb, block), _F32)
    wq = wk = jnp.ones((b, n, nb, block), _F32)
    dec = jnp.ones((b, n, nb), _F32)
  else:
    b, n, tp = g.shape
    nb = tp // block
    gb = g.reshape(b, n, nb, block)
    gc = jnp.cumsum(gb, -1)
    wq = jnp.exp(gc)
    wk = jnp.exp(_rev_excl_cumsum(gb, -1))
    dec = jnp.exp(gc[..., -1])
  if resets is not None:
    rb = resets.reshape(b, 1, nb, block).astype(jnp.int32)
    cnt = jnp.cumsum(rb, -1)
    wq = wq * (cnt == 0)
    wk = wk * (cnt == cnt[..., -1:])
    dec = dec * (cnt[..., -1] == 0)
  return (gc.reshape(b, n, tp), wq.reshape(b, n, tp), wk.reshape(b, n, tp),
          dec)


def _prep(g, resets, s: _Static, num_heads: int, batch: int):
  """Chunk-level (and split-level) weights for the kernels."""
  prep = {}
  if s.has_w:
    gc, wq, wk, _ = _block_weights(g, resets, s.chunk)
    if not s.has_gate:  # resets only: the weights are shared by all heads
      wq = jnp.broadcast_to(wq, (batch, num_heads, wq.shape[-1]))
      wk = jnp.broadcast_to(wk, (batch, num_heads, wk.shape[-1]))
    prep.update(gc=gc, wq=wq, wk=wk)
    if s.has_seg:
      prep["rc"] = jnp.cumsum(resets.astype(jnp.int32), axis=-1)
    if s.packs:  # [B, N, Tp, 4]: gc, wq, wk, reset counts (float32)
      shape = wq.shape
      rc = (jnp.broadcast_to(prep["rc"][:, None, :].astype(_F32), shape)
            if s.has_seg else jnp.zeros(shape, _F32))
      prep["pk"] = jnp.stack([jnp.broadcast_to(gc, shape), wq, wk, rc],
                             axis=-1)
  if s.splits > 1:
    if s.has_w:
      _, sq, sk, sdec = _block_weights(g, resets, s.split_len)
      shape = (batch, num_heads)
      sq = jnp.broadcast_to(sq, shape + sq.shape[2:])
      sk = jnp.broadcast_to(sk, shape + sk.shape[2:])
      sdec = jnp.broadcast_to(sdec, shape + sdec.shape[2:])
    else:  # no per-row weights: the Gram pass takes none
      sq = sk = None
      if not _UNWEIGHTED_GRAM:
        tp = s.splits * s.split_len
        sq = sk = jnp.ones((batch, num_heads, tp), _F32)
      sdec = jnp.ones((batch, num_heads, s.splits), _F32)
    prep.update(sq=sq, sk=sk, sdec=sdec)
  return prep


def _chain_kernel(local_ref, dec_ref, s0_ref, out_ref, *, splits: int,
                  reverse: bool):
  """Chains split states, elementwise over one [bf, bv] tile (see
  ``_chain_splits``); the loop over splits runs in registers."""
  def body(i, acc):
    sp = (splits - 1 - i) if reverse else i
    out_ref[sp] = acc
    # local_ref holds splits 1.. (reverse) or ..splits - 2 (forward).
    return dec_ref[sp] * acc + local_ref[sp - 1 if reverse else sp]

  out_ref[0 if reverse else splits - 1] = lax.fori_loop(
      0, splits - 1, body, s0_ref[...])


def _chain_splits(local, sdec, s0, s: _Static, reverse: bool):
  """Chains per-split states: out[s] = state entering (or leaving) split s.

  Forward: out[0] = s0, out[s] = sdec[s-1] * out[s-1] + local[s-1].
  Reverse (state gradients at split ends): out[-1] = s0 and
  out[s-1] = sdec[s] * out[s] + local[s - 1] (``local`` of splits 1..).
  local [B, N, ns - 1, F, V] float32 (``_gram_call``: the splits the
  chain reads), sdec [B, N, ns], s0 [B, N, F, V]; out [B, N, ns, F, V]. A
  Pallas kernel, parallel over (batch, head, F, V tiles): a lax.scan over
  splits would cost a loop iteration (~10 us) per split on a GPU.
  """
  b, n, nl, f, v = local.shape
  ns = nl + 1
  bf, bv = min(32, f), min(64, v)
  tile = lambda j, n_, i, b_: (b_, n_, 0, i, j)  # noqa: E731
  return pl.pallas_call(
      functools.partial(_chain_kernel, splits=ns, reverse=reverse),
      grid=(v // bv, n, f // bf, b),
      in_specs=[pl.BlockSpec((None, None, nl, bf, bv), tile),
                pl.BlockSpec((None, None, ns), lambda j, n_, i, b_: (
                    b_, n_, 0)),
                pl.BlockSpec((None, None, bf, bv), lambda j, n_, i, b_: (
                    b_, n_, i, j))],
      out_specs=pl.BlockSpec((None, None, ns, bf, bv), tile),
      out_shape=jax.ShapeDtypeStruct((b, n, ns, f, v), _F32),
      compiler_params=(None if s.interpret else plgpu.CompilerParams(
          num_warps=4, num_stages=2)),
      interpret=s.interpret,
      name="linear_scan_chain_splits",
  )(local, sdec, s0)


# ----------------------------------------------------------------------------
# custom_vjp core on padded arrays.


def _forward(q, k, v, g, resets, s0, s: _Static):
  """(o, final state, states entering the splits): through the chained
  single-pass kernel where the sequence is split and ``s.chain_cps`` asks
  for it, else the split-state (Gram) pass, the chain over splits and the
  forward sweeps."""
  b, _, n, f = q.shape
  vp = v.shape[-1]
  if s.splits > 1 and s.chain_cps:
    ratio = s.cps // s.chain_cps  # tiles a split
    sc = dataclasses.replace(s, cps=s.chain_cps, splits=s.splits * ratio,
                             tiles_per_split=ratio)
    return _chained_call(q, k, v, _prep(g, resets, sc, n, b), s0, sc)
  prep = _prep(g, resets, s, n, b)
  if s.splits > 1:
    local = _gram_call(k, v, prep["sk"], s, a_rep=s.rep)
    init = (jnp.zeros((b, n, f, vp), _F32) if s0 is None else s0)
    starts = _chain_splits(local, prep["sdec"], init, s, reverse=False)
  else:
    starts = None if s0 is None else s0[:, :, None]
  o, st = _fwd_call(q, k, v, prep, starts, s)
  return o, st[:, :, -1], starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, g, resets, s0, s: _Static):
  o, final, _ = _forward(q, k, v, g, resets, s0, s)
  return o, final


def _core_fwd(q, k, v, g, resets, s0, s: _Static):
  # symbolic_zeros: the primals come wrapped, saying which are perturbed.
  # An unperturbed gate (a fixed decay that is not learned) needs no
  # gradient: its kernels' outputs and the per-chunk states they store are
  # skipped (the residual's last entry, () or None, carries the choice).
  gate_grad = g is not None and g.perturbed
  q, k, v, g, resets, s0 = (None if x is None else x.value
                            for x in (q, k, v, g, resets, s0))
  o, final, starts = _forward(q, k, v, g, resets, s0, s)
  return (o, final), (q, k, v, g, resets, starts, () if gate_grad else None)


def _materialize(ct):
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(ct.shape, ct.dtype)
  return ct


def _core_bwd(s: _Static, res, cts):
  q, k, v, g, resets, starts, gate_grad = res
  s = dataclasses.replace(s, gate_grad=gate_grad is not None)
  do, dfinal = (_materialize(ct) for ct in cts)
  b, tp, n, f = q.shape
  kh = k.shape[2]
  vp = v.shape[-1]
  prep = _prep(g, resets, s, n, b)
  do = do.astype(q.dtype)
  dfinal = dfinal.astype(_F32)
  outs = _dq_call(q, k, v, do, prep, starts, s)
  dq = outs[0]
  if s.splits > 1:
    if prep["sq"] is not None:
      dlocal = _gram_call(q, do, prep["sq"] * s.scale, s, a_rep=1,
                          reverse=True)
    else:
      dlocal = _gram_call(q, do, None, s, a_rep=1, reverse=True,
                          scale=s.scale)
    ds_end = _chain_splits(dlocal, prep["sdec"], dfinal, s, reverse=True)
  else:
    ds_end = dfinal[:, :, None]
  dv, ds_start = _dv_call(q, k, do, prep, ds_end, s)
  outs2 = _dk_call(q, k, v, do, prep, outs[2] if s.needs_dg else None,
                   ds_end, s)
  dk = outs2[0]
  # Sum per-query-head gradients over each key/value head's group.
  if s.rep > 1:
    dk = dk.astype(_F32).reshape(b, tp, kh, s.rep, f).sum(3).astype(k.dtype)
    dv = dv.astype(_F32).reshape(b, tp, kh, s.rep, vp).sum(3).astype(
        v.dtype)
  dg = None  # None: a zero cotangent (no gate, or not perturbed)
  if s.needs_dg:
    # Reverse cumsum of the row terms within each chunk (each chunk's last
    # row carries the chunk's constant, see _dk_kernel).
    rows = jnp.sum(outs[1], 0) - jnp.sum(outs2[1], 0)  # [B, N, Tp]
    rows = rows.reshape(b, n, tp // s.chunk, s.chunk)
    dg = jnp.flip(jnp.cumsum(jnp.flip(rows, -1), -1), -1).reshape(b, n, tp)
  ds0 = ds_start[:, :, 0] if s.has_s0 else None
  return dq, dk, dv, dg, None, ds0


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------
# Public entry point.


def _pad_axis(x, axis, size):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _flat_call(kernel, *, grid, in_specs, out_specs, **kwargs):
  """``pl.pallas_call`` over a (g0, heads, [splits,] batch) ``grid``; when
  heads or batch is 1, launched as (g0, heads * batch[, splits]).

  Pallas' Triton lowering makes the program id of a grid axis of size 1 a
  constant 0, and the kernels compiled that way took many more registers:
  compiled for an H100 at batch 1, the GLA scores kernel used 255
  registers against 168 at any larger batch (and took 1.08 against 0.87
  ms on an H200 for the same work, run38), the GLA forward sweep 248
  against 184, the delta rule's forward sweep 254 against 184 and its
  reverse sweep 255 (spilling) against 198, the scalar-gate forward 255
  (spilling) against 254 and its dk kernel 254 against 238. With heads and
  batch on one axis the batch is not a constant, and at batch 1 they
  compile about as at batch 2 (GLA scores 168, its forward sweep 212
  against 184, the delta forward 184, its reverse 200 against 198; table
  in docs/linear/index.md). Larger grids keep their axes (the form
  the measured kernels were compiled in: merging there changed the
  registers by a few either way). One flat axis for the whole grid
  compiled worse at every batch (the scores kernel at 255). The index
  maps take the original indices either way, and the splits stay grid
  axis 2 (``pl.program_id(2)``); kernels must not read the other program
  ids.
  """
  g0, n, *mid, b = (int(x) for x in grid)
  if n > 1 and b > 1:
    return pl.pallas_call(kernel, grid=tuple(grid), in_specs=in_specs,
                          out_specs=out_specs, **kwargs)

  def flat(spec):
    return dataclasses.replace(
        spec, index_map=lambda i, j, *rest, m=spec.index_map: m(
            i, j % n, *rest, j // n))

  return pl.pallas_call(kernel, grid=(g0, n * b, *mid),
                        in_specs=jax.tree.map(flat, in_specs),
                        out_specs=jax.tree.map(flat, out_specs), **kwargs)


def _num_sms() -> int:
  try:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 0)
  except (RuntimeError, ValueError):
    return 0


def _auto_splits(heads: int, chunks: int, sms: int,
                 per_sm: float = 0.5, blocks: int = 1) -> int:
  """Sequence splits so that the kernels fill the GPU.

  With the forward's B * N * ``blocks`` programs (``blocks`` value blocks
  per head) filling whole waves of SMs (>= 90%) there is work enough: one
  split, no split-state pass. Otherwise aim at ``per_sm`` programs per SM
  for the kernel with one program per (batch, head, split).
  The extra cost of splitting is the Gram pass over k^T v, which covers
  all splits but the last ((splits - 1) / splits of the sequence, since
  2026-12-06: before, all of it), and the chain over splits (float32
  states), which grows with the number of splits.
  The default 0.5 (one forward program per SM with two value blocks) was
  the fastest on an H100 against 1, 2 and 4, forward and forward+backward
  at T = 16k and 64k (scripts/gpu/linear_profile.py --sweep: e.g. the
  forward at T = 64k, B = 1, N = 16: 0.75 ms at 0.5, 0.88 ms at 4; timed
  with the Gram pass over every split). Counting the value blocks (since
  run49) leaves T = 16k, B = 4, N = 16 (128 programs on 132 SMs) unsplit:
  one split against two, M tokens/s forward / forward+backward, no decay
  116 / 22.2 against 110 / 20.7, scalar gate 89 / 13.6 against 91 / 13.1
  (H100, docs/dev/gpu-runs/run49-linear-fwd-sweeps.log). Prefers a split
  count dividing the chunk count (no padding), keeps >= 2 chunks per
  split.
  """
  programs = heads * max(1, blocks)
  waves = -(-programs // sms)
  if programs >= 4 * sms or (programs >= 0.9 * sms
                             and programs >= 0.9 * waves * sms):
    return 1
  want = max(2, math.ceil(per_sm * sms / heads))
  cap = max(1, chunks // 2)
  for s in range(want, 2 * want + 1):
    if s > cap:
      break
    if chunks % s == 0:
      return s
  return max(1, min(want, cap))


def chunked_linear_attention(q, k, v, log_gate=None, resets=None, *,
                             scale: float, initial_state=None,
                             config: KernelConfig | None = None,
                             interpret: bool | None = None):
  """Gated linear attention through the chunked-scan Pallas kernels.

  Args:
    q: [B, T, N, F] feature-mapped queries (float32, bfloat16 or float16).
    k: [B, T, K, F] (N % K == 0), same dtype.
    v: [B, T, K, V], same dtype.
    log_gate: None or float [B, T, N]: log of the scalar per-step decay of
      each head (fold a fixed per-head decay in before calling). Per-channel
      gates are not supported here (NotImplementedError).
    resets: None or bool [B, T]: the state is zeroed before token t.
    scale: output scale.
    initial_state: None or float32 [B, N, F, V].
    config: tiling (default: ``default_config(q.dtype, F, V,
      gated=log_gate is not None)``).
    interpret: run in Pallas interpret mode (default: unless on a GPU).

  Returns:
    ``(out [B, T, N, V] in q.dtype, final_state float32 [B, N, F, V])``;
    differentiable in q, k, v, log_gate and initial_state.

  Raises:
    NotImplementedError: per-channel gates, feature dims above 256, a chunk
      that is not a power of two >= 16.

  >>> import jax, jax.numpy as jnp
  >>> x = jnp.ones((1, 32, 1, 16))
  >>> o, s = chunked_linear_attention(x, x, x, scale=1.0, interpret=True)
  >>> float(o[0, 0, 0, 0]), float(o[0, 31, 0, 0])
  (16.0, 512.0)
  """
  if log_gate is not None and log_gate.ndim != 3:
    raise NotImplementedError("the Pallas linear-scan kernels take scalar "
                              "gates [B, T, N] only")
  b, t, n, f = q.shape
  kh, vd = k.shape[2], v.shape[-1]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  cfg = config or default_config(q.dtype, f, vd,
                                 gated=log_gate is not None)
  c = cfg.chunk
  if c < 16 or c & (c - 1):
    raise NotImplementedError(f"chunk {c} is not a power of two >= 16")
  fp, vp = _padded_dim(f), _padded_dim(vd)
  if fp > 256:
    raise NotImplementedError(f"feature dim {f} > 256 is not supported by "
                              "the Pallas linear-scan kernels")
  nc = -(-t // c)
  if cfg.num_splits is not None:
    splits = max(1, min(int(cfg.num_splits), nc))
  else:
    sms = cfg.num_sms or (0 if interpret else _num_sms()) or 132
    splits = _auto_splits(b * n, nc, sms, cfg.split_programs_per_sm,
                          blocks=-(-_padded_dim(vd) // cfg.block_v))
  cps = -(-nc // splits)
  splits = -(-nc // cps)
  chain_cps = 0
  if cfg.chained_tile > 0 and splits > 1:
    # The largest divisor of the split's chunks within the tile asked for.
    want = max(1, min(cps, cfg.chained_tile // c))
    chain_cps = max(d for d in range(1, want + 1) if cps % d == 0)
  # Rows per Gram step: a power of two (Triton) dividing the split length.
  rows = c
  while rows * 2 <= cfg.block_rows and (cps * c) % (rows * 2) == 0:
    rows *= 2
  gram_parts = _pow2(cfg.gram_parts, lo=1)
  while gram_parts > 1 and (cps * c) % (gram_parts * rows):
    gram_parts //= 2
  tp = splits * cps * c
  bvb = cfg.block_v_bwd
  s = _Static(scale=float(scale), chunk=c, cps=cps, splits=splits,
              bv=min(cfg.block_v, vp), bf=min(cfg.block_f, fp), bvb=bvb,
              rows=rows, bvg=min(_pow2(cfg.block_v_gram), vp),
              warps=cfg.num_warps, stages=cfg.num_stages,
              warps_gram=cfg.num_warps_gram,
              stages_gram=cfg.num_stages_gram,
              warps_bwd=cfg.num_warps_bwd, stages_bwd=cfg.num_stages_bwd,
              has_gate=log_gate is not None, has_seg=resets is not None,
              has_s0=initial_state is not None or splits > 1,
              interpret=bool(interpret),
              upcast=bool(interpret) and jax.default_backend() == "cpu",
              rep=n // kh, prefetch=cfg.prefetch_weights,
              chain_cps=chain_cps, chain_lookback=cfg.chained_lookback,
              gram_parts=gram_parts, packed=cfg.packed_weights)
  qp = _pad_axis(_pad_axis(q, 3, fp), 1, tp)
  kp = _pad_axis(_pad_axis(k, 3, fp), 1, tp)
  vpd = _pad_axis(_pad_axis(v, 3, vp), 1, tp)
  g = None
  if log_gate is not None:
    g = _pad_axis(jnp.moveaxis(log_gate.astype(_F32), 1, 2), 2, tp)
  r = None if resets is None else _pad_axis(resets.astype(bool), 1, tp)
  s0 = None
  if initial_state is not None:
    s0 = _pad_axis(_pad_axis(initial_state.astype(_F32), 2, fp), 3, vp)
  elif splits > 1:
    s0 = jnp.zeros((b, n, fp, vp), _F32)
  o, final = _core(qp, kp, vpd, g, r, s0, s)
  return o[:, :t, :, :vd], final[:, :, :f, :vd]


def flops(batch, length, heads, f, v, chunk=64) -> float:
  """Forward matmul FLOPs of the chunked form (for benchmarks)."""
  per_token = 2 * chunk * (f + v) / 2 + 4 * f * v
  return float(batch * length * heads * per_token)

