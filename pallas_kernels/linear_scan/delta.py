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
  accuracy), then ``U``, ``W`` and, under differentiation, the scores
  ``A = scale (q k^T o D)`` and ``T`` (float32). In the forward alone
  the kernel that uses ``A`` forms it (``DeltaConfig.output_scores``),
  and the transform runs as two kernels instead (``ut_split``):
  ``_t_kernel`` forms and stores ``T`` alone, ``_wu_kernel`` reads it
  back and forms ``U`` and ``W`` as whole ``[C, C] x [C, .]`` matmuls.
* ``_fwd_kernel``: one program per (value block, head, batch) sweeping the
  chunks with the state in float32 registers, reading ``W``, ``U`` (and
  ``A``); or, where the grid is latency-bound (``separate_output``), only
  the states, the outputs then from ``_out_kernel``, chunk-parallel.
* backward (custom_vjp): the states entering each chunk and the new
  values, stored by the forward sweep (``forward_states``, the default)
  or recomputed by a storing sweep, then ``_bwd_kernel`` sweeping
  backwards with ``Lam``, the gradient of the state leaving the chunk:

    Gv  = (q k^T o D)^T dO scale + g_out o (k Lam)     (gradient of v_c)
    Lam <- scale q^T (g_in o dO) + exp(G_C) Lam - W^T Gv,

  storing ``Lam`` and ``Gv``; then ``_grad_kernel``, one program per
  chunk, takes the products with the stored states and pulls them back
  through the UT transform (``dL = -tril(T^T dT T^T, -1)``) to every
  input: q, k, v, beta, the log gates and the initial state.

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
    _block_weights, _chunk_rows, _dots, _flat_call, _last, _num_sms,
    _pad_axis, _padded_dim, env_overrides, sweep_loop)

__all__ = ["DeltaConfig", "delta_rule"]

_F32 = jnp.float32
_SUB = 16  # rows per block of the triangular inverse
# DeltaConfig.inverse_dots: the dot algorithm of each choice.
_INVERSE_DOTS = {"tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
                 "ieee": lax.DotAlgorithmPreset.F32_F32_F32,
                 "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
  """Tiling of the delta-rule kernels.

  Attributes:
    chunk: C, tokens per chunk (a multiple of 16, power of two).
    block_v: value columns per forward-sweep program (None: 64, halved
      down to 16 while the batch * heads * value blocks programs would not
      fill the GPU's multiprocessors once, but to 16 only where 32 would
      fill less than 0.9 of them; ``_auto_block_v_fwd``).
    block_v_bwd: the same for the reverse sweep (None: halved only while
      the programs would not fill half the multiprocessors;
      ``_BWD_FILL``).
    num_warps, num_stages: Triton launch parameters of the forward sweep
      (4 stages: on an H100, run115, against 3 the forward at T = 64k
      +1.2%, at 4k even; at 16k with 32 value columns +4% (run113,
      run114), forward+backward +1%).
    num_warps_bwd, num_stages_bwd: the same for the backward sweep.
    num_warps_ut: warps of the UT-transform kernel.
    num_warps_grad, num_stages_grad: the same for the backward's
      chunk-parallel gradient kernel(s); num_warps_grad None: 8 for the
      fused kernel, 4 for the split ones (the fastest on an H200 at F = V =
      128: 4.77 ms fused at 8 warps, 6.75 at 4; split at 64 key columns
      4.43 ms at 8 warps, 3.65 at 4, 3.44 with 2 stages;
      docs/dev/gpu-runs/run24-h200-delta-grad-sweep.log). bfloat16 only:
      float32 tiles always use one stage.
    num_warps_grad_ut: warps of the split backward's second kernel (the
      UT pull-back per chunk); None: the same as the gradient kernels'.
    block_v_grad: value columns per step of the gradient kernel's loop
      over the value dimension (its [F, V] state tiles are read in
      [F, block_v_grad] slices).
    grad_block_k: None (one fused gradient kernel per chunk) or a power of
      two >= 16: below F the backward splits it in two, the state products
      per [C, grad_block_k] key columns (more, lighter programs) and then
      the UT pull-back per chunk; at F <= grad_block_k it stays fused.
    diag_inverse: how the UT kernel inverts the [16, 16] diagonal blocks
      of I + L: "substitution" (row by row) or "doubling" (blocks of 1, 2,
      4, 8 rows combined by 16 x 16 matmuls; see ``tril_inverse``).
    inverse_dots: the UT kernel's float32 [16, 16] matmuls of the
      inverse: "tf32x3" (three TF32 tensor-core passes), "ieee" (FMA on
      the CUDA cores, as fla's solve_tril by default) or "tf32" (one TF32
      pass: about 1e-3 relative error per product, against the 4e-3 of
      the bf16 rounding the forward applies to T before its U and W
      products; the stored float32 T of the backward carries it too).
      "tf32x3" and "ieee" are about float32-accurate; on an H100 the UT
      kernel took 0.88 ms with "tf32x3" and 1.78 with "ieee" (T = 4k,
      B = 16, no scores, run43). "tf32" gained nothing measurable (run73:
      UT kernel 0.878 against 0.882 ms; gated forward+backward at 32k
      9.64 against 9.71 ms), so it stays opt-in. It applies to 16-bit
      inputs only: float32 inputs keep "tf32x3", since one pass left
      them float16-accurate (TF32 keeps float16's 10-bit mantissa; on an
      H100 at T = 300, dK was 1.2e-3 off the scan's where float32's
      tolerance is 6.8e-4, run72).
    grad_ut_block_k: None, or a power of two >= 16: with the split
      backward (``grad_block_k`` below F), its second kernel (the UT
      pull-back per chunk) works by blocks of this many key columns, so
      no [C, F] float32 tile is whole (two loops over the blocks; T^T dW
      formed twice). Compiled for an H100 (C = 64, F = V = 128, bf16, 4
      warps) the kernel spills 884 / 1068 bytes as a whole, 720 / 704 by
      64 columns (scripts/aot/ptxas_report.py, 2026-12-07). Opt-in: slower on an H100 (run124,
      the gradient kernels at T = 32k, B = 2: 3.99 ms by default, 4.15 by
      64 columns; at 8 warps whole 4.55, by 64 / 32 / 16 columns 4.68 /
      5.65 / 7.20). At 8 warps only 16 columns are allowed (64 missed the
      bf16 gate gradients' tolerance there).
    ut_block_v: None, or a power of two >= 16: the UT kernel forms U and
      W by blocks of this many columns, re-reading the keys and values
      block by block, instead of holding [C, F] and [C, V] tiles of
      beta-weighted keys and values whole. Compiled for an H100 (T = 4k,
      C = 64, F = V = 128, bf16, gated; scripts/aot/ptxas_report.py)
      the kernel spills 264 bytes as a whole in the forward alone and
      none at 64 or 32 (at 16: 564); under differentiation (T stored,
      scores formed) 696 / 760 bytes as a whole, 20 at 64, none at 32.
      All use 255 registers, so occupancy does not change. Slower on an
      H100 (run82, T = 32k, B = 2, gated: the UT kernel alone 0.877 ->
      1.226 ms at 32, forward 2.50 -> 2.83 ms, forward+backward 9.72 ->
      9.76; GPU test passed in bf16), so it stays opt-in.
    forward_states: under differentiation, the forward sweep also writes
      the state entering each chunk and the chunk's new values (bf16
      [B, N, T / C, F, V] and [B, T, N, V]) as residuals, so the backward
      skips its state-storing sweep (a sequential pass over every chunk).
      Costs the residuals' memory (the states: 2 F V / C bytes a token and
      head, 512 bytes at F = V = 128, C = 64; twice q's) and their writes
      in the forward. On by default: forward+backward took 6.75 ms
      against 7.13 at T = 4k (B = 16, H200, run40) and 10.52 against
      11.01 at T = 32k (B = 2, H100, run39). False trades that time back
      for the memory.
    separate_output: the forward sweep stores the states entering each
      chunk and the new values only, and a chunk-parallel kernel forms the
      outputs q S + A v_new from them, as fla's forward does: the
      sequential sweep does half the matmuls (the state chain only), at
      the cost of writing and reading the states. With ``forward_states``
      the backward takes them as residuals. None (the default) turns it
      on where the grid is latency-bound: where too few (batch, head)
      programs make the automatic value block shrink below 64 columns
      (``_auto_separate_output``). At T = 32k (B = 2, gated, H100) the
      forward took 2.88 ms against 3.45 and forward+backward 9.56 against
      10.52 (run39); at T = 16k (B = 4, H100: value block 32) 2.66 against
      2.58 and 8.43 against 8.64 (run41); at T = 4k (B = 16, H200), where
      the value block stays 64, the forward took 2.27 ms against 1.95
      (run40): off there.
    prefetch_weights: the sequential sweeps (forward and reverse) load
      each chunk's per-token weights (the gate products wq, wk and the
      chunk decay) one chunk ahead, carried through the loop. Triton's
      pipeliner leaves two of these [C] float32 loads synchronous inside
      the loop (the compiled TTGIR of ``delta_rule_fwd``, read without a
      GPU), so each sequential step waits on memory for them; the
      ungated rule, whose three weight arrays XLA folds into one buffer,
      ran 0.66 ms faster at T = 32k (run40). Off by default: on an H100
      (run42, gated, T = 32k, B = 2) it changed nothing measurable (the
      forward 2.976 ms against 2.988, forward+backward 9.70 against 9.62).
    output_scores: the kernels that use the chunk scores scale (q k^T o
      D) (D the causal decays, zero across resets) form them from the q
      and k tiles they already read, as fla's output kernel does: the
      output kernel (``separate_output``) or the fused forward sweep, and
      the backward's reverse sweep. The UT kernel, the largest part of the
      forward at every T (1.45 ms of 2.18 at T = 4k, B = 16 on an H100),
      then skips a third of its matmuls, its q reads and the [B, T, N, C]
      score writes (0.89 ms instead of 1.45), and the scores are no
      residual. The sweeps do one more [C, F] x [F, C] matmul a chunk (off
      the chain carried from chunk to chunk) per value block. True: in
      every pass; False: in none; None (the default): in the forward
      without differentiation only. Measured on an H100 (run42, gated,
      B T = 64k): the forward took 1.89 ms against 2.18 at T = 4k and 2.67
      against 2.99 at 32k, but forward+backward 7.92 against 7.86 at 4k
      (the reverse sweep's extra matmuls outweigh the UT kernel's saving),
      so under differentiation the UT kernel stores the scores for the
      backward by default.
    sweep_splits: the sequential sweeps, the states-only forward one
      (``separate_output``; a value above 1 turns that on) and the
      backward's reverse one, run over this many sequence splits in
      parallel, each in two passes (``_states_sweep``, ``_lam_sweep``):
      the first carries each split's chunk-to-chunk transition (F more
      state columns) and its state (or Lam) from zero, a float32 scan
      over the splits links them, the second reruns every split from its
      true entering state. For long T at small batches, where one
      sequential sweep has too few programs: 1 (the default) is the
      single sweep. Lowered to the largest divisor of the chunk count.
      Opt-in and slower on an H100 (run69, T = 32k, B = 2: gated forward
      2.49 ms at 1, 3.34 at 8, 3.57 at 16; forward+backward 9.69 at 1,
      11.02 at 16), so the default stays 1.
    packed_weights: the sequential sweeps read each chunk's per-token
      weights (wq, wk, the chunk decay and the log-gate sums) as one
      [C, 4] tile of one array (``_pack_weights``) instead of from three
      or four arrays. Where a sweep has about one program per SM (T = 64k,
      B = 1, N = 16 on an H100) these loads are on the chain from chunk to
      chunk, and separate arrays made the gated states-only sweep take
      1.78 ms against 1.43 with the same values in one buffer
      (``delta_profile.py --prefetch``, run108); ``prefetch_weights`` did
      not recover it. Triton's pipeliner turns the [C, 4] tile load into
      an asynchronous copy like the q, k, w and u tiles' (compiled for an
      H100 at T = 64k: no synchronous load left in the sweeps' loops,
      ``scripts/aot/ptxas_report.py --case delta --loads``), where it had
      left the separate [C] loads synchronous. Through the whole path
      (H100, runs 109-111) the gated forward went from 19.8 to 25.8 M
      tokens/s at T = 64k and 26.6 to 28.6 at 32k, forward+backward up
      3-18% for both rules.
    ut_split: the UT transform in two kernels, as fla's forward does:
      the first forms T = (I + L)^{-1} per chunk and stores it (in the
      inputs' dtype, float32 where the backward keeps it), the second
      reads it back whole and forms U and W as two [C, C] x [C, .]
      matmuls, where the fused kernel sums 16-row blocks of T times
      16-row blocks of the weighted keys and values (ten [16, 16] x
      [16, .] matmuls each) with T's blocks, the keys and the weighted
      keys and values live at once (255 registers and spills at two
      warps). Costs T's write and read (C / F of a k tensor's traffic
      each way). True: in every pass; False: never; None (the default):
      in the forward without differentiation. Ignored with
      ``ut_block_v``. On an H100 (run113, gated, B T = 64k, forward
      alone) with its first kernel at one warp and one TF32 pass
      (``num_warps_t``, ``split_inverse_dots``) the forward took 2.060
      against 2.193 ms at T = 16k and 2.176 against 2.304 at 32k; with
      two warps and three passes (184 bytes of spills) 2.686 / 2.791.
    num_warps_t: warps of ``ut_split``'s first kernel (its [16, 16]
      blocks take the same registers a thread at 1, 2 or 4 warps: one
      warp gives the most programs an SM).
    split_inverse_dots: ``inverse_dots`` of ``ut_split``'s first kernel:
      "tf32" by default (three passes spill there; the products round T
      to 16 bits anyway); float32 inputs keep "tf32x3".
    num_warps_wu: warps of ``ut_split``'s second kernel.
    ut_split_block_k: key columns per step of ``ut_split``'s first
      kernel's k k^T (a power of two >= 16): the kernel never holds the
      chunk's keys whole.
  """
  chunk: int = 64
  block_v: int | None = None
  block_v_bwd: int | None = None
  num_warps: int = 4
  num_stages: int = 4
  num_warps_bwd: int = 4
  num_stages_bwd: int = 3
  num_warps_ut: int = 2
  num_warps_grad: int | None = None
  num_stages_grad: int = 2
  num_warps_grad_ut: int | None = None
  block_v_grad: int = 64
  grad_block_k: int | None = 64
  diag_inverse: str = "doubling"
  inverse_dots: str = "tf32x3"
  grad_ut_block_k: int | None = None
  ut_block_v: int | None = None
  forward_states: bool = True
  separate_output: bool | None = None
  prefetch_weights: bool = False
  output_scores: bool | None = None
  sweep_splits: int = 1
  packed_weights: bool = True
  ut_split: bool | None = None
  num_warps_t: int = 1
  split_inverse_dots: str = "tf32"
  num_warps_wu: int = 4
  ut_split_block_k: int = 64

  def __post_init__(self):
    if self.diag_inverse not in ("substitution", "doubling"):
      raise ValueError(f"config.diag_inverse={self.diag_inverse!r} is not "
                       "'substitution' or 'doubling'")
    for name in ("inverse_dots", "split_inverse_dots"):
      if getattr(self, name) not in _INVERSE_DOTS:
        raise ValueError(f"config.{name}={getattr(self, name)!r} is not "
                         "one of " + ", ".join(map(repr, _INVERSE_DOTS)))
    if int(self.sweep_splits) < 1:
      raise ValueError(f"config.sweep_splits={self.sweep_splits} is not a "
                       "positive integer")
    for name in ("grad_block_k", "grad_ut_block_k", "ut_block_v",
                 "ut_split_block_k"):
      bk = getattr(self, name)
      if bk is not None and (bk < _SUB or bk & (bk - 1)):
        raise ValueError(f"config.{name}={bk} is not a power of two >= 16")
    # The UT pull-back by 64-column blocks at 8 warps missed the scan's
    # bf16 gate gradients on an H100 (run124: 6 of 1200 entries off by 4.6
    # where 3.4 was allowed; float32, 16 columns at 8 warps and 64 at 4
    # passed, and no 8-warp form was faster): refused until understood.
    if (self.num_warps_grad_ut or 0) >= 8 and (self.grad_ut_block_k
                                                or 0) >= 32:
      raise ValueError(
          f"config.grad_ut_block_k={self.grad_ut_block_k} with "
          f"num_warps_grad_ut={self.num_warps_grad_ut}: the blocked UT "
          "pull-back at 8 or more warps is only checked at 16 columns")

  def grad_warps(self, f: int) -> int:
    """Warps of the gradient kernel(s) at padded feature dim ``f``."""
    if self.num_warps_grad is not None:
      return self.num_warps_grad
    return 4 if self.grad_block_k and self.grad_block_k < f else 8


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
  warps_grad: int
  stages_grad: int
  warps_gut: int
  bvg: int
  bkg: int
  doubling: bool
  has_s0: bool
  has_seg: bool
  interpret: bool
  upcast: bool
  rep: int
  inverse_dots: str = "tf32x3"
  bku: int = 0  # grad_ut_block_k (0: whole F)
  buv: int = 0  # ut_block_v (0: whole F and V)
  fwd_states: bool = False  # forward_states
  sep_out: bool = False  # separate_output
  prefetch: bool = False  # prefetch_weights
  packed: bool = False  # packed_weights
  out_scores: bool = False  # output_scores, under differentiation
  out_scores_fwd: bool = False  # output_scores, forward alone
  splits: int = 1  # sweep_splits (both sequential sweeps' splits)
  bva: int = 64  # value block of a split sweep's first pass
  aug: int = 0  # leading transition columns of a split sweep's first pass
  ut_split: bool = False  # ut_split, under differentiation
  ut_split_fwd: bool = False  # ut_split, forward alone
  warps_t: int = 1  # num_warps_t
  split_dots: str = "tf32"  # split_inverse_dots
  warps_wu: int = 4  # num_warps_wu
  bkt: int = 64  # ut_split_block_k


def _params(s: _S, warps: int, stages: int):
  if s.interpret:
    return None
  return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------
# UT transform.


def _scores(s: _S, q, k, g, rc, gk=None, rck=None, row0: int = 0):
  """Scaled scores scale (q k^T o D) of a chunk, float32 [R, C], for the
  R query rows from chunk row ``row0`` (q [R, F]) against the chunk's C
  keys (k [C, F]): D the causal decays exp(g_i - g_j) for j <= i (g, gk
  the chunk-local cumulative log gates of the rows and of the keys; gk
  defaults to g, for R = C), zero across resets (rc, rck the rows' and
  keys' reset counts, or None)."""
  _, _, _dot_nt = _dots(s)
  gk = g if gk is None else gk
  rck = rc if rck is None else rck
  shape = (q.shape[0], k.shape[0])
  rows = lax.broadcasted_iota(jnp.int32, shape, 0) + row0
  cols = lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = cols <= rows
  if rc is not None:
    mask = jnp.logical_and(mask, rc[:, None] == rck[None, :])
  d = jnp.exp(jnp.where(mask, g[:, None] - gk[None, :], -jnp.inf))
  return (_dot_nt(q, k) * d) * s.scale


def _blk(i):  # rows [16 i, 16 i + 16) of a chunk
  return pl.ds(i * _SUB, _SUB)


def _ut_inverse(s: _S, gram, beta, g, rc, iotas=None):
  """T = (I + L)^{-1} of a chunk as {(i, j): [16, 16] float32 block} for
  j <= i, from ``gram(i, m)``, block (i, m) of k k^T, and the write
  strengths, cumulative log gates and reset counts as lists of 16-row
  blocks (rc None without resets)."""
  prec = None if s.interpret else _INVERSE_DOTS[s.inverse_dots]
  mm = lambda a, b: lax.dot_general(  # noqa: E731
      a, b, (((1,), (0,)), ((), ())), precision=prec,
      preferred_element_type=_F32)
  nb = len(beta)
  rows, cols = iotas or _sub_iotas()

  def lower(i, m):  # block (i, m), m <= i, of L
    mask = (cols < rows) if m == i else (rows >= 0)
    if s.has_seg:
      mask = jnp.logical_and(mask, rc[i][:, None] == rc[m][None, :])
    d = jnp.exp(jnp.where(mask, g[i][:, None] - g[m][None, :], -jnp.inf))
    return beta[i][:, None] * gram(i, m) * d

  t = {}
  for i in range(nb):
    low = [lower(i, m) for m in range(i)]
    if s.doubling:
      t[i, i] = tril_inverse._diag_inverse_doubling(lower(i, i), mm)
    else:
      t[i, i] = tril_inverse._diag_inverse(lower(i, i))
    for j in range(i - 1, -1, -1):
      acc = jnp.zeros((_SUB, _SUB), _F32)
      for m in range(j, i):
        acc = acc + mm(low[m], t[m, j])
      t[i, j] = -mm(t[i, i], acc)
  return t


def _sub_iotas():
  """The row and column indices of a [16, 16] block."""
  return (lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 0),
          lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 1))


def _store_inverse(t_ref, t, nb):
  """Writes T's blocks (zeros above the diagonal) into t_ref [C, C]."""
  for i in range(nb):
    for j in range(nb):
      t_ref[_blk(i), _blk(j)] = (
          t[i, j] if j <= i else jnp.zeros((_SUB, _SUB), _F32)
      ).astype(t_ref.dtype)


def _block_rows(ref, nb):
  """A per-token ref's chunk as a list of its nb 16-row blocks."""
  return [ref[_blk(i)] for i in range(nb)]


def _ut_scores(s: _S, q_ref, k_ref, gc_ref, rc_ref, a_ref, g, rc):
  """The chunk's scores for the sweep, by blocks of 16 rows (a whole
  [C, C] tile spills registers); g, rc: the log-gate sums and reset
  counts already loaded as 16-row blocks (rc None without resets)."""
  k_all, g_all = k_ref[...], gc_ref[...]
  rc_all = rc_ref[...] if s.has_seg else None
  for i in range(len(g)):
    a = _scores(s, q_ref[_blk(i), :], k_all, g[i],
                rc[i] if s.has_seg else None, g_all, rc_all, i * _SUB)
    a_ref[_blk(i), :] = a.astype(a_ref.dtype)


def _ut_kernel(*refs, s: _S, store_t: bool, scores: bool):
  _dot, _, _dot_nt = _dots(s)
  it = iter(refs)
  q_ref, k_ref, v_ref, beta_ref, gc_ref, wq_ref = (next(it) for _ in range(6))
  rc_ref = next(it) if s.has_seg else None
  w_ref, u_ref = next(it), next(it)
  a_ref = next(it) if scores else None
  t_ref = next(it) if store_t else None
  dt = k_ref.dtype
  nb = s.chunk // _SUB
  # The block indices before the key loads: formed after them, the kernel
  # compiled for an H100 spilled 16 bytes more under differentiation
  # (712 / 768 against 696 / 760; scripts/aot/ptxas_report.py, T = 4k).
  iotas = _sub_iotas()
  k = [k_ref[_blk(i), :] for i in range(nb)]
  beta, g = _block_rows(beta_ref, nb), _block_rows(gc_ref, nb)
  rc = _block_rows(rc_ref, nb) if s.has_seg else None
  t = _ut_inverse(s, lambda i, m: _dot_nt(k[i], k[m]), beta, g, rc, iotas)
  if store_t:  # for the backward pass (float32)
    _store_inverse(t_ref, t, nb)
  if s.buv:
    # By column blocks of U and W, the keys and values re-read from their
    # refs block by block: no [C, F] or [C, V] tile stays live.
    tb = {ij: x.astype(dt) for ij, x in t.items()}
    wk = [beta[j] * wq_ref[_blk(j)] for j in range(nb)]
    for src, dst, wts in ((v_ref, u_ref, beta), (k_ref, w_ref, wk)):
      width = src.shape[-1]
      step = min(s.buv, width)
      for c0 in range(0, width, step):
        cs = pl.ds(c0, step)
        r = [(src[_blk(j), cs].astype(_F32) * wts[j][:, None]).astype(dt)
             for j in range(nb)]
        for i in range(nb):
          acc = sum(_dot(tb[i, j], r[j]) for j in range(i + 1))
          dst[_blk(i), cs] = acc.astype(dst.dtype)
  else:
    rv = [(v_ref[_blk(j), :].astype(_F32) * beta[j][:, None]).astype(dt)
          for j in range(nb)]
    rk = [(k[j].astype(_F32) * (beta[j] * wq_ref[_blk(j)])[:, None]
           ).astype(dt) for j in range(nb)]
    for i in range(nb):
      u = sum(_dot(t[i, j].astype(dt), rv[j]) for j in range(i + 1))
      w = sum(_dot(t[i, j].astype(dt), rk[j]) for j in range(i + 1))
      u_ref[_blk(i), :] = u.astype(u_ref.dtype)
      w_ref[_blk(i), :] = w.astype(w_ref.dtype)
  if scores:  # else the kernels that use them form them (output_scores)
    _ut_scores(s, q_ref, k_ref, gc_ref, rc_ref, a_ref, g, rc)


def _t_kernel(*refs, s: _S):
  """``ut_split``'s first kernel: a chunk's T = (I + L)^{-1} alone (as
  ``_ut_kernel`` forms it), stored [C, C] in the output's dtype."""
  it = iter(refs)
  k_ref, beta_ref, gc_ref = next(it), next(it), next(it)
  rc_ref = next(it) if s.has_seg else None
  t_ref = next(it)
  nb = s.chunk // _SUB
  rows = [_blk(i) for i in range(nb)]
  rc = _block_rows(rc_ref, nb) if s.has_seg else None
  # k k^T's blocks summed over slabs of key columns, so that the keys are
  # never live whole beside the inverse's blocks.
  _dot_nt = _dots(s)[2]
  f = k_ref.shape[-1]
  slab = min(s.bkt, f)
  gram = {}
  for c0 in range(0, f, slab):
    k = [k_ref[r, pl.ds(c0, slab)] for r in rows]
    for i in range(nb):
      for m in range(i + 1):
        x = _dot_nt(k[i], k[m])
        gram[i, m] = x if c0 == 0 else gram[i, m] + x
  t = _ut_inverse(s, lambda i, m: gram[i, m], _block_rows(beta_ref, nb),
                  _block_rows(gc_ref, nb), rc)
  _store_inverse(t_ref, t, nb)


def _wu_kernel(*refs, s: _S, scores: bool):
  """``ut_split``'s second kernel: U = T (beta o v) and W = T (beta wq o k)
  of a chunk as two whole [C, C] x [C, .] matmuls (T rounded to the
  inputs' dtype first, as ``_ut_kernel`` rounds its blocks), and the
  scores where ``scores``."""
  _dot = _dots(s)[0]
  it = iter(refs)
  q_ref, k_ref, v_ref, beta_ref, gc_ref, wq_ref = (next(it) for _ in range(6))
  rc_ref = next(it) if s.has_seg else None
  t_ref, w_ref, u_ref = next(it), next(it), next(it)
  a_ref = next(it) if scores else None
  dt = k_ref.dtype
  t = t_ref[...].astype(dt)
  beta = beta_ref[...]
  rv = (v_ref[...].astype(_F32) * beta[:, None]).astype(dt)
  u_ref[...] = _dot(t, rv).astype(u_ref.dtype)
  rk = (k_ref[...].astype(_F32) * (beta * wq_ref[...])[:, None]).astype(dt)
  w_ref[...] = _dot(t, rk).astype(w_ref.dtype)
  if scores:
    nb = s.chunk // _SUB
    _ut_scores(s, q_ref, k_ref, gc_ref, rc_ref, a_ref,
               _block_rows(gc_ref, nb),
               _block_rows(rc_ref, nb) if s.has_seg else None)


def _chunk_specs(s: _S):
  """BlockSpecs over grid (chunk, head, batch): a query head's own
  [C, D] rows, its key/value head's, its per-token [C] weights, the
  reset counters [C], and its chunk state [F, V] of a [B, N, nc, F, V]
  array."""
  c = s.chunk
  own = lambda d: pl.BlockSpec(  # noqa: E731
      (None, c, None, d), lambda ci, n_, b_: (b_, ci, n_, 0))
  kv = lambda d: pl.BlockSpec(  # noqa: E731
      (None, c, None, d), lambda ci, n_, b_: (b_, ci, n_ // s.rep, 0))
  tok = pl.BlockSpec((None, None, c), lambda ci, n_, b_: (b_, n_, ci))
  seg = pl.BlockSpec((None, c), lambda ci, n_, b_: (b_, ci))
  state = lambda f, v: pl.BlockSpec(  # noqa: E731
      (None, None, None, f, v), lambda ci, n_, b_: (b_, n_, ci, 0, 0))
  return own, kv, tok, seg, state


def _ut_call(q, k, v, beta, gc, wq, rc, s: _S, store_t: bool = False,
             scores: bool = True):
  """W, U, A (and T, float32, when ``store_t``), each [B, Tp, N, .]; A
  is None without ``scores``."""
  b, tp, kh, f = k.shape
  n = beta.shape[1]
  vp = v.shape[-1]
  c = s.chunk
  own, kv, tok, seg, _ = _chunk_specs(s)
  in_specs = [own(f), kv(f), kv(vp), tok, tok, tok]
  args = [q, k, v, beta, gc, wq]
  if s.has_seg:
    in_specs.append(seg)
    args.append(rc)
  out_specs = [own(f), own(vp)]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, f), k.dtype),
               jax.ShapeDtypeStruct((b, tp, n, vp), k.dtype)]
  if scores:
    out_specs.append(own(c))
    out_shape.append(jax.ShapeDtypeStruct((b, tp, n, c), k.dtype))
  if s.ut_split:
    t_specs = [kv(f), tok, tok] + ([seg] if s.has_seg else [])
    t_args = [k, beta, gc] + ([rc] if s.has_seg else [])
    return _ut_split_call(t_args, t_specs, args, in_specs, out_specs,
                          out_shape, s, store_t, scores)
  if store_t:
    out_specs.append(own(c))
    out_shape.append(jax.ShapeDtypeStruct((b, tp, n, c), _F32))
  res = _flat_call(
      functools.partial(_ut_kernel, s=s, store_t=store_t, scores=scores),
      grid=(s.nc, n, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, s.warps_ut, 1),
      interpret=s.interpret,
      name="delta_rule_ut",
  )(*args)
  res = list(res)
  if not scores:
    res.insert(2, None)
  return tuple(res)


def _ut_split_call(t_args, t_specs, args, in_specs, out_specs, out_shape,
                   s: _S, store_t: bool, scores: bool):
  """``_ut_call`` in two kernels (``ut_split``): T per chunk from
  ``t_args`` (k, beta, the log-gate sums and any reset counts; float32
  where the backward keeps it, else in the inputs' dtype, to which the
  products round it anyway), then U, W (and the scores) from ``args``
  and T."""
  b, tp, n, _ = out_shape[0].shape
  own = _chunk_specs(s)[0]
  t = _flat_call(
      functools.partial(_t_kernel,
                        s=dataclasses.replace(s, inverse_dots=s.split_dots)),
      grid=(s.nc, n, b),
      in_specs=t_specs,
      out_specs=own(s.chunk),
      out_shape=jax.ShapeDtypeStruct((b, tp, n, s.chunk),
                                     _F32 if store_t else t_args[0].dtype),
      compiler_params=_params(s, s.warps_t, 1),
      interpret=s.interpret,
      name="delta_rule_ut_inverse",
  )(*t_args)
  res = list(_flat_call(
      functools.partial(_wu_kernel, s=s, scores=scores),
      grid=(s.nc, n, b),
      in_specs=in_specs + [own(s.chunk)],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, s.warps_wu, 1),
      interpret=s.interpret,
      name="delta_rule_wu",
  )(*args, t))
  if not scores:
    res.append(None)
  if store_t:
    res.append(t)
  return tuple(res)


# ----------------------------------------------------------------------------
# Chunk-to-chunk sweeps. Layouts: q, w [B, Tp, N, F], k [B, Tp, K, F],
# u, dO [B, Tp, N, V]; per-token weights [B, N, Tp]; reset counters
# [B, Tp]; states [B, N, F, V].


def _fwd_kernel(*refs, s: _S, store: bool, out: bool, final: bool):
  """Forward sweep. ``store``: write the state entering each chunk and the
  new values (the backward's residuals); ``out``: the outputs and the
  final state; ``final``: the final state. The backward's recomputation
  stores only; the forward of ``forward_states`` does both."""
  _dot, _dot_tn, _ = _dots(s)
  it = iter(refs)
  q_ref, k_ref, a_ref, w_ref, u_ref = (next(it) for _ in range(5))
  load_weights = _weight_refs(s, it)
  s0_ref = next(it) if s.has_s0 else None
  if out:
    o_ref = next(it)
  if out or final:
    st_ref = next(it)
  if store:
    h_ref, vn_ref = next(it), next(it)
  c = s.chunk
  dt = w_ref.dtype
  shape = (w_ref.shape[-1], u_ref.shape[-1])
  state = s0_ref[...].astype(_F32) if s.has_s0 else jnp.zeros(shape, _F32)
  # A split sweep's first pass (s.aug): the value blocks below s.aug
  # columns carry the transition (their U is zero), the others the state.
  keep = ((pl.program_id(0) * shape[1] >= s.aug).astype(_F32) if s.aug
          else None)

  def weights(i):  # chunk i's (wq * scale, wk, decay, score weights)
    return load_weights(_chunk_rows(i * c, c), out)

  def step(i, state, wts):
    wq, wk, dec, sw = wts
    rows = _chunk_rows(i * c, c)
    sb = state.astype(dt)
    u = u_ref[rows, :].astype(_F32)
    if keep is not None:
      u = u * keep
    vn = u - _dot(w_ref[rows, :], sb)
    vb = vn.astype(dt)
    if store:
      h_ref[i] = sb
      vn_ref[rows, :] = vb
    if out:
      q = q_ref[rows, :]
      if s.out_scores:
        a = _scores(s, q, k_ref[rows, :], *sw).astype(dt)
      else:
        a = a_ref[rows, :]
      o = _dot(q, sb) * wq[:, None] + _dot(a, vb)
      o_ref[rows, :] = o.astype(o_ref.dtype)
    vw = (vn * wk[:, None]).astype(dt)
    return state * dec + _dot_tn(k_ref[rows, :], vw)

  last = sweep_loop(s.nc, step, weights, state, s.prefetch)
  if out or final:
    st_ref[...] = last


def _bwd_kernel(*refs, s: _S, store: bool = True):
  """Reverse sweep: Gv and Lam per chunk (see the module docstring);
  without ``store`` only the final Lam (a split sweep's first pass, whose
  value blocks below ``s.aug`` columns carry the transition: dO zero)."""
  _dot, _dot_tn, _ = _dots(s)
  it = iter(refs)
  q_ref, k_ref, a_ref, w_ref = (next(it) for _ in range(4))
  load_weights = _weight_refs(s, it)
  do_ref, dfin_ref = next(it), next(it)
  gv_ref, lam_ref = (next(it), next(it)) if store else (None, None)
  ds0_ref = next(it)
  c = s.chunk
  dt = w_ref.dtype
  keep = ((pl.program_id(0) * do_ref.shape[-1] >= s.aug).astype(dt)
          if s.aug else None)

  def weights(i):  # chunk nc - 1 - i's (wq * scale, wk, decay, scores')
    return load_weights(_chunk_rows((s.nc - 1 - i) * c, c), True)

  def step(i, lam, wts):
    wq, wk, dec, sw = wts
    ci = s.nc - 1 - i
    rows = _chunk_rows(ci * c, c)
    do = do_ref[rows, :]
    if keep is not None:
      do = do * keep
    lb = lam.astype(dt)
    if store:
      lam_ref[ci] = lb
    if s.out_scores:
      a = _scores(s, q_ref[rows, :], k_ref[rows, :], *sw).astype(dt)
    else:
      a = a_ref[rows, :]
    gv = (_dot_tn(a, do)
          + _dot(k_ref[rows, :], lb) * wk[:, None])
    gb = gv.astype(dt)
    if store:
      gv_ref[rows, :] = gb
    dow = (do.astype(_F32) * wq[:, None]).astype(dt)
    return (_dot_tn(q_ref[rows, :], dow) + dec * lam
            - _dot_tn(w_ref[rows, :], gb))

  ds0_ref[...] = sweep_loop(s.nc, step, weights,
                            dfin_ref[...].astype(_F32), s.prefetch)


def _seq(tp, d, head, col, splits: int = 1):
  """[B, Tp, heads, d] operands; with ``splits`` the grid's batch axis
  runs over B * splits and program ``b`` takes split ``b % splits`` (Tp /
  splits rows) of batch ``b // splits``."""
  if splits == 1:
    return pl.BlockSpec((None, tp, None, d),
                        lambda j, n, b: (b, 0, head(n), col(j)))
  return pl.BlockSpec((None, tp // splits, None, d),
                      lambda j, n, b: (b // splits, b % splits, head(n),
                                       col(j)))


def _sweep_stages(s: _S, stages: int) -> int:
  """Pipeline stages of a sweep: at most 2 where it forms the scores
  (``output_scores``), whose q k^T operands took the forward sweep at 3
  stages (T = 4k, B = 16, F = V = 128, bf16) to 247,296 bytes of shared
  memory against the H100's 232,448 (compiled without a GPU). The
  states-only sweeps keep their stages (``_fwd_call``): capped as well,
  the forward at T = 64k, B = 1 (where that sequential sweep is most of
  the time) took 3.35 ms against 2.99 (H100, run41 / run42)."""
  return min(stages, 2) if s.out_scores else stages


def _score_refs(s: _S, it):
  """(gc_ref, rc_ref) of a sweep: the log-gate sums and reset counts it
  forms the scores from (``output_scores``), else None."""
  gc_ref = next(it) if s.out_scores else None
  rc_ref = next(it) if s.out_scores and s.has_seg else None
  return gc_ref, rc_ref


def _score_weights(s: _S, gc_ref, rc_ref, rows):
  """A chunk's (g, rc) for ``_scores`` (None without output_scores)."""
  if not s.out_scores:
    return None
  return gc_ref[rows], (rc_ref[rows] if rc_ref is not None else None)


def _weight_refs(s: _S, it):
  """Takes a sweep's per-token weight refs from ``it`` and returns
  ``load(rows, full) -> (wq * scale, wk, chunk decay, score weights)``
  for one chunk's ``rows``; without ``full`` (a sweep that forms no
  outputs) wq and the score weights are None.

  With ``packed_weights`` the four per-token columns (wq, wk, the chunk
  decay and the log-gate sums the scores are formed from) come as one
  [Tp, 4] ref (``_pack_weights``) read as one [C, 4] tile a chunk, and
  the columns are picked out of it in registers."""
  if not s.packed:
    wq_ref, wk_ref, dec_ref = next(it), next(it), next(it)
    gc_ref, rc_ref = _score_refs(s, it)

    def load(rows, full):
      wq = wq_ref[rows] * s.scale if full else None
      sw = _score_weights(s, gc_ref, rc_ref, rows) if full else None
      return wq, wk_ref[rows], _last(dec_ref[rows]), sw
    return load

  pk_ref = next(it)
  rc_ref = next(it) if s.out_scores and s.has_seg else None

  def load(rows, full):
    tile = pk_ref[rows, :]
    col = lax.broadcasted_iota(jnp.int32, tile.shape, 1)

    def pick(j):
      return jnp.sum(jnp.where(col == j, tile, 0.0), axis=1)

    # Column, then row: a [C, 4] -> scalar sum in one reduction does not
    # trace under an abstract mesh (jax.export's, with sharding specs).
    dec = _last(pick(2))
    wq = pick(0) * s.scale if full else None
    sw = None
    if full and s.out_scores:
      sw = pick(3), (rc_ref[rows] if rc_ref is not None else None)
    return wq, pick(1), dec, sw
  return load


def _pack_weights(wq, wk, dec, gc=None):
  """[B, N, Tp, 4] float32: wq, wk, the chunk decay (per token) and the
  log-gate sums (zeros where None) side by side, so that a sweep's weight
  loads a chunk are one [C, 4] tile load, which Triton's pipeliner makes
  an asynchronous copy (it left the separate [C] loads synchronous, on
  the chain from chunk to chunk: see ``DeltaConfig.packed_weights``)."""
  if gc is None:
    gc = jnp.zeros_like(wq)
  return jnp.stack([wq, wk, dec, gc], axis=-1)


def _sweep_inputs(q, k, a, w, wq, wk, dec, s: _S, gc=None, rc=None):
  """The sweeps' common inputs: q, k, the scores, w, the per-token
  weights, and with ``output_scores`` the log-gate sums and reset counts
  the scores are formed from (``a`` is then None)."""
  tp, f, c, ns = q.shape[1], q.shape[-1], s.chunk, s.splits
  same, kv, zero = (lambda n: n), (lambda n: n // s.rep), (lambda j: 0)
  tok = pl.BlockSpec((None, None, tp // ns),
                     lambda j, n, b: (b // ns, n, b % ns))
  seq = functools.partial(_seq, splits=ns)
  a_spec = seq(tp, c, same, zero)
  if a is None:  # the scores are formed (output_scores) or not used:
    a, a_spec = q, seq(tp, f, same, zero)  # any operand holds the place
  specs = [seq(tp, f, same, zero), seq(tp, f, kv, zero), a_spec,
           seq(tp, f, same, zero)]
  args = [q, k, a, w]
  if s.packed:
    specs.append(pl.BlockSpec((None, None, tp // ns, 4),
                              lambda j, n, b: (b // ns, n, b % ns, 0)))
    args.append(_pack_weights(wq, wk, dec, gc if s.out_scores else None))
  else:
    specs += [tok, tok, tok]
    args += [wq, wk, dec]
    if s.out_scores:
      specs.append(tok)
      args.append(gc)
  if s.out_scores:
    if s.has_seg:
      specs.append(pl.BlockSpec((None, tp // ns),
                                lambda j, n, b: (b // ns, b % ns)))
      args.append(rc)
  return specs, args


def _state_spec(f, bv):
  return pl.BlockSpec((None, None, f, bv), lambda j, n, b: (b, n, 0, j))


def _chunk_states_spec(nc, f, bv, splits: int = 1):
  return pl.BlockSpec((None, None, nc // splits, f, bv),
                      lambda j, n, b: (b // splits, n, b % splits, 0, j))


def _fwd_call(q, k, a, w, u, wq, wk, dec, s0, s: _S, store: bool,
              out: bool | None = None, final: bool = False, gc=None,
              rc=None):
  """(out, final state) without ``store``; (h, vn) with it; (out, final
  state, h, vn) with both ``store`` and ``out``; (final state, h, vn) with
  ``store`` and ``final``."""
  out = not store if out is None else out
  if not out:  # a states-only sweep forms no scores: none of their inputs
    s = dataclasses.replace(s, out_scores=False)  # nor their stage cap
  ns = s.splits
  if ns > 1 and out:
    raise ValueError("a split sweep stores states only")
  if s.aug and store:
    raise ValueError("a split sweep's first pass stores nothing")
  b, tp, n, f = q.shape
  vp = s.aug + u.shape[-1]  # state columns (the transition's first)
  bv = min(s.bv, vp)
  specs, args = _sweep_inputs(q, k, a, w, wq, wk, dec, s, gc, rc)
  col = _seq(tp, bv, lambda n_: n_, lambda j: j, ns)
  ucol = col if not s.aug else _seq(
      tp, bv, lambda n_: n_, lambda j: jnp.maximum(j - s.aug // bv, 0), ns)
  specs = specs[:4] + [ucol] + specs[4:]
  args = args[:4] + [u] + args[4:]
  if s.has_s0:
    specs.append(_state_spec(f, bv))
    args.append(s0)
  out_specs, out_shape = [], []
  if out:
    out_specs.append(col)
    out_shape.append(jax.ShapeDtypeStruct((b, tp, n, vp), q.dtype))
  if out or final:
    out_specs.append(_state_spec(f, bv))
    out_shape.append(jax.ShapeDtypeStruct((b * ns, n, f, vp), _F32))
  if store:
    out_specs += [_chunk_states_spec(s.nc, f, bv, ns), col]
    out_shape += [jax.ShapeDtypeStruct((b, n, s.nc, f, vp), w.dtype),
                  jax.ShapeDtypeStruct((b, tp, n, vp), w.dtype)]
  return _flat_call(
      functools.partial(_fwd_kernel, s=dataclasses.replace(s, nc=s.nc // ns),
                        store=store, out=out, final=final),
      grid=(vp // bv, n, b * ns),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      # The residual sweeps keep 3 stages at 64 value columns: with the
      # outputs too, 4 overflowed an H100's shared memory (run116, T = 4k).
      compiler_params=_params(s, s.warps, _sweep_stages(
          s, s.stages if not store or bv < 64 else min(s.stages, 3))),
      interpret=s.interpret,
      name="delta_rule_fwd" + ("_states" if store else "")
      + ("_out" if store and out else "") + ("_final" if final else ""),
  )(*args)


def _split_starts(b, ns, n, f, vp):
  """[I | 0], float32 [B * ns, N, F, F + V]: what every split's first
  pass starts from (the transition columns first)."""
  return jnp.broadcast_to(jnp.eye(f, f + vp, dtype=_F32),
                          (b * ns, n, f, f + vp))


def _link_splits(ends, start, *, reverse: bool):
  """``(last, starts)`` from the first pass's per-split ends [B * ns, N,
  F, F + V] = [M | L]: a float32 scan over the splits (backwards with
  ``reverse``) from ``start`` [B, N, F, V], each next = M prev + L;
  ``starts`` [B * ns, N, F, V] is what enters each split, ``last`` what
  leaves the final one."""
  b, _, f, vp = start.shape
  ns = ends.shape[0] // b
  ends = jnp.moveaxis(ends.reshape(b, ns, *ends.shape[1:]), 1, 0)

  def link(x, end):
    nxt = jnp.matmul(end[..., :f], x,
                     precision=lax.Precision.HIGHEST) + end[..., f:]
    return nxt, x

  last, starts = lax.scan(link, start, ends, reverse=reverse)
  return last, jnp.moveaxis(starts, 0, 1).reshape(b * ns, *start.shape[1:])


def _states_sweep(q, k, a, w, u, wq, wk, dec, s0, s: _S, final: bool):
  """``(final state or None, h, vn)``: the states-only sweep, over
  ``s.splits`` sequence splits in parallel when that is above 1.

  The sweep is linear in the state: a chunk maps S to A S + B with A =
  exp(G_C) I - (g_out o k)^T W. A first pass runs every split from
  [I | 0] with U = [0 | U] (``s.aug`` = F leading transition columns) and
  returns each split's [M | S0]: M the product of its chunks' A, S0 its
  state from zero. A scan over the splits in float32 then gives the state
  entering each, S_{p+1} = M_p S_p + S0_p, and a second pass runs every
  split from its entering state, storing the states and new values as the
  one long sweep would. The first pass does (F + V) / V of the long
  sweep's work and the second all of it, but with ``splits`` times the
  programs, each ``splits`` times shorter: a trade for grids whose
  sequential sweep is latency-bound (long T, small batch)."""
  ns = s.splits
  if ns == 1:
    res = _fwd_call(q, k, a, w, u, wq, wk, dec, s0, s, store=True,
                    out=False, final=final)
    return (res[0] if final else None,) + tuple(res[-2:])
  b, _, n, f = q.shape
  vp = u.shape[-1]
  first = dataclasses.replace(s, aug=f, has_s0=True, bv=s.bva)
  ends = _fwd_call(q, k, a, w, u, wq, wk, dec, _split_starts(b, ns, n, f, vp),
                   first, store=False, out=False, final=True)[0]
  start = s0 if s0 is not None else jnp.zeros((b, n, f, vp), _F32)
  last, starts = _link_splits(ends, start, reverse=False)
  h, vn = _fwd_call(q, k, a, w, u, wq, wk, dec, starts,
                    dataclasses.replace(s, has_s0=True), store=True,
                    out=False)
  return (last if final else None), h, vn


def _out_kernel(*refs, s: _S, scores: bool):
  """One chunk's outputs from its entering state and new values:
  (q S) * wq * scale + A v_new, A the stored scaled scores or, with
  ``scores``, formed here: scale (q k^T o D), D the causal decays (zero
  across resets), as the UT kernel forms them."""
  _dot, _, _ = _dots(s)
  it = iter(refs)
  q_ref = next(it)
  if scores:
    k_ref, gc_ref = next(it), next(it)
    rc_ref = next(it) if s.has_seg else None
  else:
    a_ref = next(it)
  wq_ref, h_ref, vn_ref, o_ref = next(it), next(it), next(it), next(it)
  q, vn = q_ref[...], vn_ref[...]
  if scores:
    a = _scores(s, q, k_ref[...], gc_ref[...],
                rc_ref[...] if s.has_seg else None).astype(vn.dtype)
  else:
    a = a_ref[...]
  o = (_dot(q, h_ref[...]) * (wq_ref[...] * s.scale)[:, None]
       + _dot(a, vn))
  o_ref[...] = o.astype(o_ref.dtype)


def _out_call(q, a, wq, h, vn, s: _S, k=None, gc=None, rc=None):
  """The outputs [B, Tp, N, V] chunk-parallel (``separate_output``): from
  the stored scores ``a``, or (``a`` None) scores formed from q, k, the
  chunk-local cumulative log gates ``gc`` and the reset counts ``rc``."""
  b, tp, n, f = q.shape
  vp = vn.shape[-1]
  own, kv, tok, seg, state = _chunk_specs(s)
  scores = a is None
  if scores:
    specs, args = [own(f), kv(f), tok], [q, k, gc]
    if s.has_seg:
      specs.append(seg)
      args.append(rc)
  else:
    specs, args = [own(f), own(s.chunk)], [q, a]
  return _flat_call(
      functools.partial(_out_kernel, s=s, scores=scores),
      grid=(s.nc, n, b),
      in_specs=specs + [tok, state(f, vp), own(vp)],
      out_specs=own(vp),
      out_shape=jax.ShapeDtypeStruct((b, tp, n, vp), q.dtype),
      compiler_params=_params(s, s.warps, 1),
      interpret=s.interpret,
      name="delta_rule_out",
  )(*args, wq, h, vn)


def _forward(q, k, a, w, u, wq, wk, dec, s0, s: _S, residuals: bool,
             gc=None, rc=None):
  """(out, final state, h, vn): h and vn only where ``residuals`` or
  ``separate_output`` form them (else None). ``a`` None
  (``output_scores``): the output kernel or the sweep forms the scores
  from q, k, ``gc`` and ``rc``."""
  sc = dict(gc=gc, rc=rc)
  if s.sep_out:
    final, h, vn = _states_sweep(q, k, a, w, u, wq, wk, dec, s0, s, True)
    return (_out_call(q, a, wq, h, vn, s, k=k, **sc), final, h, vn)
  if residuals:
    return tuple(_fwd_call(q, k, a, w, u, wq, wk, dec, s0, s, True,
                           out=True, **sc))
  return tuple(_fwd_call(q, k, a, w, u, wq, wk, dec, s0, s, False,
                         **sc)) + (None, None)


def _bwd_call(q, k, a, w, wq, wk, dec, do, dfin, s: _S, gc=None, rc=None,
              store: bool = True):
  """(Gv, Lam per chunk, final Lam); without ``store`` (a split sweep's
  first pass) the final Lam only. Over ``s.splits`` splits (``dfin`` then
  one [F, V] per split) when that is above 1."""
  b, tp, n, f = q.shape
  ns = s.splits
  if s.aug and store:
    raise ValueError("a split sweep's first pass stores nothing")
  vp = s.aug + do.shape[-1]
  bv = min(s.bvb, vp)
  specs, args = _sweep_inputs(q, k, a, w, wq, wk, dec, s, gc, rc)
  col = _seq(tp, bv, lambda n_: n_, lambda j: j, ns)
  docol = col if not s.aug else _seq(
      tp, bv, lambda n_: n_, lambda j: jnp.maximum(j - s.aug // bv, 0), ns)
  specs += [docol, _state_spec(f, bv)]
  args += [do, dfin]
  out_specs, out_shape = [], []
  if store:
    out_specs += [col, _chunk_states_spec(s.nc, f, bv, ns)]
    out_shape += [jax.ShapeDtypeStruct((b, tp, n, vp), w.dtype),
                  jax.ShapeDtypeStruct((b, n, s.nc, f, vp), w.dtype)]
  out_specs.append(_state_spec(f, bv))
  out_shape.append(jax.ShapeDtypeStruct((b * ns, n, f, vp), _F32))
  return _flat_call(
      functools.partial(_bwd_kernel, s=dataclasses.replace(s, nc=s.nc // ns),
                        store=store),
      grid=(vp // bv, n, b * ns),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(s, s.warps_bwd,
                              _sweep_stages(s, s.stages_bwd)),
      interpret=s.interpret,
      name="delta_rule_bwd" + ("" if store else "_final"),
  )(*args)


def _lam_sweep(q, k, a, w, wq, wk, dec, do, dfin, s: _S, gc=None, rc=None):
  """(Gv, Lam per chunk, final Lam): the reverse sweep, over ``s.splits``
  sequence splits when that is above 1, as ``_states_sweep`` splits the
  forward one. Lam maps linearly too: a chunk takes it to
  exp(G_C) Lam - W^T ((k Lam) o g_out) plus terms of dO. The first pass
  runs every split backwards from [I | 0] with dO = [0 | dO]; a scan
  from the last split links them (the gradient leaving split p is
  M_{p+1} Lam_{p+1} + L_{p+1}, the last split's the final state's); the
  second pass reruns every split from its own, storing Gv and Lam."""
  ns = s.splits
  if ns == 1:
    return _bwd_call(q, k, a, w, wq, wk, dec, do, dfin, s, gc, rc)
  b, _, n, f = q.shape
  first = dataclasses.replace(s, aug=f, bvb=s.bva)
  ends = _bwd_call(q, k, a, w, wq, wk, dec, do,
                   _split_starts(b, ns, n, f, do.shape[-1]), first, gc, rc,
                   store=False)[0]
  ds0, starts = _link_splits(ends, dfin, reverse=True)
  gv, lam, _ = _bwd_call(q, k, a, w, wq, wk, dec, do, starts, s, gc, rc)
  return gv, lam, ds0


def _value_loop(s: _S, refs, beta, tb, *, state: bool, ut: bool):
  """One chunk's loop over [., block_v_grad] value slices.

  ``state``: the sweep's products with the chunk states over this
  program's key rows of h and Lam: dq_raw = dO h^T, dk_raw = v_c Lam^T,
  gh = Gv h^T and <h, Lam> per key row. ``ut``: the value side of the UT
  pull-back: dA = dO v_c^T, Gv rv^T, dv = beta o (T^T Gv) (written slice by
  slice) and dbeta's value part.
  """
  _, _dot_tn, _dot_nt = _dots(s)
  h_ref, lam_ref, do_ref, gv_ref, vn_ref, v_ref, dv_ref = refs
  c, dt = s.chunk, gv_ref.dtype
  bv = min(s.bvg, do_ref.shape[-1])
  z = lambda *shape: jnp.zeros(shape, _F32)  # noqa: E731
  acc = {}
  if state:
    fk = h_ref.shape[0]
    acc.update(dq=z(c, fk), dk=z(c, fk), gh=z(c, fk), dd=z(fk))
  if ut:
    acc.update(da=z(c, c), d_tv=z(c, c), dbeta=z(c))

  def body(j, acc):
    cols = pl.ds(pl.multiple_of(j * bv, bv), bv)
    do, gv, vn = do_ref[:, cols], gv_ref[:, cols], vn_ref[:, cols]
    new = {}
    if state:
      h, lam = h_ref[:, cols], lam_ref[:, cols]
      new.update(dq=acc["dq"] + _dot_nt(do, h),
                 dk=acc["dk"] + _dot_nt(vn, lam),
                 gh=acc["gh"] + _dot_nt(gv, h),
                 dd=acc["dd"] + jnp.sum(h.astype(_F32) * lam.astype(_F32),
                                        axis=1))
    if ut:
      vf = v_ref[:, cols].astype(_F32)
      rv = (vf * beta[:, None]).astype(dt)
      d_rv = _dot_tn(tb, gv)
      dv_ref[:, cols] = (d_rv * beta[:, None]).astype(dv_ref.dtype)
      new.update(da=acc["da"] + _dot_nt(do, vn),
                 d_tv=acc["d_tv"] + _dot_nt(gv, rv),
                 dbeta=acc["dbeta"] + jnp.sum(d_rv * vf, axis=1))
    return new

  return lax.fori_loop(0, do_ref.shape[-1] // bv, body, acc)


def _state_terms(s: _S, acc, qf, kf, wq, wk):
  """dq, dk, their gate-weight gradients, dW = -Gv h^T (float32) and
  d exp(G_C) at the chunk's last row, from ``_value_loop``'s sums."""
  c = s.chunk
  dq = acc["dq"] * (wq * s.scale)[:, None]
  dwq = s.scale * jnp.sum(acc["dq"] * qf, axis=1)
  dk = acc["dk"] * wk[:, None]
  dwk = jnp.sum(acc["dk"] * kf, axis=1)
  ddec = jnp.where(jnp.arange(c) == c - 1, jnp.sum(acc["dd"]), 0.0)
  return dq, dk, dwq, dwk, -acc["gh"], ddec


def _pull_back_scores(s: _S, acc, d_t, sk, tf, kk, qk, g, rc, beta, wq, dt):
  """The [C, C] part of the UT pull-back: from dT (``d_t``), the row sums
  ``sk`` of (T^T dW) o k and the loop's dA and dbeta, through
  dL = -tril(T^T dT T^T, -1), L = beta (k k^T o D) and A = scale
  (q k^T o D). ``kk``, ``qk``: callables giving k k^T and q k^T (float32)
  where they are needed. Returns dbeta, wq's part, dL o D o beta and the
  decayed dA (operand dtype, for the matmuls with k and q) and the
  cumulative log gates' gradient."""
  _, _dot_tn, _dot_nt = _dots(s)
  c = s.chunk
  dbeta = acc["dbeta"] + wq * sk
  dwq = beta * sk
  x = _dot_nt(_dot_tn(tf, d_t), tf)  # T^T dT T^T (float32 operands)
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  strict, incl = cols < rows, cols <= rows
  if rc is not None:
    same = rc[:, None] == rc[None, :]
    strict = jnp.logical_and(strict, same)
    incl = jnp.logical_and(incl, same)
  diff = g[:, None] - g[None, :]
  dl = -x * jnp.exp(jnp.where(strict, diff, -jnp.inf))  # dL o D
  dlk = dl * kk()
  dbeta = dbeta + jnp.sum(dlk, axis=1)
  dkk = (dl * beta[:, None]).astype(dt)
  dqk = acc["da"] * (jnp.exp(jnp.where(incl, diff, -jnp.inf)) * s.scale)
  p = dlk * beta[:, None] + dqk * qk()
  dgc = jnp.sum(p, axis=1) - jnp.sum(p, axis=0)
  return dbeta, dwq, dkk, dqk.astype(dt), dgc


def _ut_key_side(s: _S, acc, q, k, kf, beta, g, wq, tf, tb, rc, dw, dq,
                 dk):
  """The key side of the UT pull-back from dW ([C, F], operand dtype) and
  the loop's dA, Gv rv^T and dbeta (``kf``, ``tb``: k in float32, T in the
  operand dtype): returns dq, dk (added to; None: from zero), dbeta, the
  gate weight wq's part and the cumulative log gates' gradient."""
  _dot, _dot_tn, _dot_nt = _dots(s)
  dt = k.dtype
  bw = beta * wq
  rk = (kf * bw[:, None]).astype(dt)
  d_t = acc["d_tv"] + _dot_nt(dw, rk)
  d_rk = _dot_tn(tb, dw)
  dk = d_rk * bw[:, None] if dk is None else dk + d_rk * bw[:, None]
  sk = jnp.sum(d_rk * kf, axis=1)
  dbeta, dwq, dkk, dqk, dgc = _pull_back_scores(
      s, acc, d_t, sk, tf, lambda: _dot_nt(k, k), lambda: _dot_nt(q, k), g,
      rc, beta, wq, dt)
  dq = _dot(dqk, k) if dq is None else dq + _dot(dqk, k)
  dk = dk + _dot(dkk, k) + _dot_tn(dkk, k) + _dot_tn(dqk, q)
  return dq, dk, dbeta, dwq, dgc


def _grad_kernel(*refs, s: _S):
  """Every gradient of one chunk, from the stored per-chunk states.

  With ``h`` the state entering the chunk, ``Lam`` the gradient of the
  state leaving it, ``Gv`` the gradient of the new values (both from the
  reverse sweep) and ``T`` the chunk's inverse (stored by the forward):

    sweep:  dq = scale g_in o (dO h^T),  dk = g_out o (v_c Lam^T),
            dW = -Gv h^T,  dA = dO v_c^T,  d exp(G_C) = <h, Lam>;
    UT:     dT = Gv rv^T + dW rk^T,  d rv = T^T Gv,  d rk = T^T dW,
            dL = -tril(T^T dT T^T, -1), then through L = beta (k k^T o D)
            and A = scale (q k^T o D) to q, k, beta and the log gates.
  """
  it = iter(refs)
  (q_ref, k_ref, v_ref, beta_ref, gc_ref, wq_ref, wk_ref, t_ref, h_ref,
   lam_ref, do_ref, gv_ref, vn_ref) = (next(it) for _ in range(13))
  rc = next(it)[...] if s.has_seg else None
  (dq_ref, dk_ref, dv_ref, dbeta_ref, dgc_ref, dwq_ref, dwk_ref,
   ddec_ref) = (next(it) for _ in range(8))
  q, k = q_ref[...], k_ref[...]
  kf = k.astype(_F32)
  beta, wq = beta_ref[...], wq_ref[...]
  tf = t_ref[...]
  tb = tf.astype(k.dtype)
  acc = _value_loop(s, (h_ref, lam_ref, do_ref, gv_ref, vn_ref, v_ref,
                        dv_ref), beta, tb, state=True, ut=True)
  dq, dk, dwq, dwk, dw, ddec = _state_terms(
      s, acc, q.astype(_F32), kf, wq, wk_ref[...])
  dq, dk, dbeta, dwq_ut, dgc = _ut_key_side(
      s, acc, q, k, kf, beta, gc_ref[...], wq, tf, tb, rc,
      dw.astype(k.dtype), dq, dk)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dbeta_ref[...] = dbeta
  dgc_ref[...] = dgc
  dwq_ref[...] = dwq + dwq_ut
  dwk_ref[...] = dwk
  ddec_ref[...] = ddec


def _grad_state_kernel(q_ref, k_ref, wq_ref, wk_ref, h_ref, lam_ref, do_ref,
                       gv_ref, vn_ref, dq_ref, dk_ref, dw_ref, dwq_ref,
                       dwk_ref, ddec_ref, *, s: _S):
  """Split backward, first half: the state products of one chunk over
  [C, grad_block_k] key columns (dq, dk in float32, dW in the operand
  dtype; per-token sums partial over key blocks)."""
  acc = _value_loop(s, (h_ref, lam_ref, do_ref, gv_ref, vn_ref, None, None),
                    None, None, state=True, ut=False)
  dq, dk, dwq, dwk, dw, ddec = _state_terms(
      s, acc, q_ref[...].astype(_F32), k_ref[...].astype(_F32), wq_ref[...],
      wk_ref[...])
  dq_ref[...] = dq
  dk_ref[...] = dk
  dw_ref[...] = dw.astype(dw_ref.dtype)
  dwq_ref[...] = dwq
  dwk_ref[...] = dwk
  ddec_ref[...] = ddec


def _grad_ut_kernel(*refs, s: _S):
  """Split backward, second half: the UT pull-back of one chunk, adding
  to the first half's dq and dk (whole, or with ``s.bku`` below F by
  blocks of key columns: ``_ut_key_side_cols``)."""
  it = iter(refs)
  (q_ref, k_ref, v_ref, beta_ref, gc_ref, wq_ref, t_ref, do_ref, gv_ref,
   vn_ref, dqs_ref, dks_ref, dw_ref) = (next(it) for _ in range(13))
  rc = next(it)[...] if s.has_seg else None
  dq_ref, dk_ref, dv_ref, dbeta_ref, dgc_ref, dwq_ref = (
      next(it) for _ in range(6))
  cols = s.bku and s.bku < k_ref.shape[-1]
  if not cols:
    q, k = q_ref[...], k_ref[...]
  beta, wq = beta_ref[...], wq_ref[...]
  tf = t_ref[...]
  tb = tf.astype(k_ref.dtype)
  acc = _value_loop(s, (None, None, do_ref, gv_ref, vn_ref, v_ref, dv_ref),
                    beta, tb, state=False, ut=True)
  if cols:
    dbeta, dwq, dgc = _ut_key_side_cols(
        s, acc, (q_ref, k_ref, dw_ref, dqs_ref, dks_ref, dq_ref, dk_ref,
                 gc_ref), beta, wq, tf, tb, rc)
  else:
    # The first half's dq and dk join at the store (not live through here).
    dq, dk, dbeta, dwq, dgc = _ut_key_side(
        s, acc, q, k, k.astype(_F32), beta, gc_ref[...], wq, tf, tb, rc,
        dw_ref[...], None, None)
    dq_ref[...] = (dq + dqs_ref[...]).astype(dq_ref.dtype)
    dk_ref[...] = (dk + dks_ref[...]).astype(dk_ref.dtype)
  dbeta_ref[...] = dbeta
  dgc_ref[...] = dgc
  dwq_ref[...] = dwq


def _ut_key_side_cols(s: _S, acc, refs, beta, wq, tf, tb, rc):
  """``_ut_key_side`` by blocks of ``s.bku`` key columns
  (``DeltaConfig.grad_ut_block_k``) for the split backward: the same
  products, but no [C, F] float32 tile is ever whole. A first loop over
  the column blocks accumulates dT's key part dW rk^T, the row sums of
  (T^T dW) o k, k k^T and q k^T ([C, C] and [C] float32); the [C, C]
  pull-back follows; a second loop forms each block of dq and dk (T^T dW
  again per block, instead of keeping it), adds the first half's and
  stores it. Returns dbeta, wq's part and the log gates' gradient."""
  q_ref, k_ref, dw_ref, dqs_ref, dks_ref, dq_ref, dk_ref, gc_ref = refs
  _dot, _dot_tn, _dot_nt = _dots(s)
  c, dt, bk = s.chunk, k_ref.dtype, s.bku
  bw = beta * wq

  def col(j):
    return pl.ds(pl.multiple_of(j * bk, bk), bk)

  def first(j, carry):
    d_t, sk, kk, qk = carry
    kc = k_ref[:, col(j)]
    kcf = kc.astype(_F32)
    dwc = dw_ref[:, col(j)]
    d_t = d_t + _dot_nt(dwc, (kcf * bw[:, None]).astype(dt))
    sk = sk + jnp.sum(_dot_tn(tb, dwc) * kcf, axis=1)
    return (d_t, sk, kk + _dot_nt(kc, kc),
            qk + _dot_nt(q_ref[:, col(j)], kc))

  ncol = k_ref.shape[-1] // bk
  zero = jnp.zeros((c, c), _F32)
  d_t, sk, kk, qk = lax.fori_loop(
      0, ncol, first, (acc["d_tv"], jnp.zeros((c,), _F32), zero, zero))
  dbeta, dwq, dkk, dqk, dgc = _pull_back_scores(
      s, acc, d_t, sk, tf, lambda: kk, lambda: qk, gc_ref[...], rc, beta,
      wq, dt)

  def second(j, carry):
    kc, qc = k_ref[:, col(j)], q_ref[:, col(j)]
    dq = dqs_ref[:, col(j)] + _dot(dqk, kc)
    dk = (dks_ref[:, col(j)] + _dot_tn(tb, dw_ref[:, col(j)]) * bw[:, None]
          + _dot(dkk, kc) + _dot_tn(dkk, kc) + _dot_tn(dqk, qc))
    dq_ref[:, col(j)] = dq.astype(dq_ref.dtype)
    dk_ref[:, col(j)] = dk.astype(dk_ref.dtype)
    return carry

  lax.fori_loop(0, ncol, second, 0)
  return dbeta, dwq, dgc


def _grad_state_call(q, k, wq, wk, h, lam, do, gv, vn, s: _S):
  """The split backward's first kernel: the state products per [C, bkg]
  key columns, grid (chunk * key block, head, batch), key blocks fastest.
  Returns the state terms of dq and dk (float32) and dw, each program
  writing its key columns, and per key block the partial sums of dwq, dwk
  and ddec ([B, F / bkg, N, Tp]); the UT pull-back kernel adds the rest."""
  b, tp, n, f = q.shape
  vp = gv.shape[-1]
  c = s.chunk
  bk = s.bkg
  nk = f // bk
  cols = lambda head: pl.BlockSpec(  # noqa: E731
      (None, c, None, bk),
      lambda i, n_, b_: (b_, i // nk, head(n_), i % nk))
  rows = pl.BlockSpec((None, c, None, vp),
                      lambda i, n_, b_: (b_, i // nk, n_, 0))
  tok_k = pl.BlockSpec((None, None, c), lambda i, n_, b_: (b_, n_, i // nk))
  st_k = pl.BlockSpec((None, None, None, bk, vp),
                      lambda i, n_, b_: (b_, n_, i // nk, i % nk, 0))
  part = pl.BlockSpec((None, None, None, c),
                      lambda i, n_, b_: (b_, i % nk, n_, i // nk))
  parts = jax.ShapeDtypeStruct((b, nk, n, tp), _F32)
  return _flat_call(
      functools.partial(_grad_state_kernel, s=s),
      grid=(s.nc * nk, n, b),
      in_specs=[cols(lambda n_: n_), cols(lambda n_: n_ // s.rep), tok_k,
                tok_k, st_k, st_k, rows, rows, rows],
      out_specs=[cols(lambda n_: n_)] * 3 + [part] * 3,
      out_shape=[jax.ShapeDtypeStruct((b, tp, n, f), _F32)] * 2
      + [jax.ShapeDtypeStruct((b, tp, n, f), gv.dtype)] + [parts] * 3,
      compiler_params=_params(s, s.warps_grad, s.stages_grad),
      interpret=s.interpret,
      name="delta_rule_grads_state",
  )(q, k, wq, wk, h, lam, do, gv, vn)


def _grad_call(q, k, v, beta, gc, wq, wk, t, h, lam, do, gv, vn, rc, s: _S):
  """dq, dk, dv (per query head), dbeta, dgc, dwq, dwk, ddec: one fused
  kernel, or with ``s.bkg`` the two-kernel split."""
  b, tp, n, f = q.shape
  vp = v.shape[-1]
  c = s.chunk
  own, kv, tok, seg, state = _chunk_specs(s)
  per_tok = jax.ShapeDtypeStruct((b, n, tp), _F32)
  # Per query head: dk and dv in float32 when GQA sums them over the
  # group afterwards, else every gradient in its input's dtype.
  kv_dt = k.dtype if s.rep == 1 else _F32
  grads = [jax.ShapeDtypeStruct((b, tp, n, f), q.dtype),
           jax.ShapeDtypeStruct((b, tp, n, f), kv_dt),
           jax.ShapeDtypeStruct((b, tp, n, vp), kv_dt)]

  def per_chunk(kernel, name, in_specs, args, n_tok, warps):
    """One program per (chunk, head, batch): dq, dk, dv, n_tok [C] rows."""
    if s.has_seg:
      in_specs, args = in_specs + [seg], args + [rc]
    return _flat_call(
        functools.partial(kernel, s=s),
        grid=(s.nc, n, b),
        in_specs=in_specs,
        out_specs=[own(f), own(f), own(vp)] + [tok] * n_tok,
        out_shape=grads + [per_tok] * n_tok,
        compiler_params=_params(s, warps, s.stages_grad),
        interpret=s.interpret,
        name=name,
    )(*args)

  if not s.bkg or s.bkg >= f:
    return per_chunk(
        _grad_kernel, "delta_rule_grads",
        [own(f), kv(f), kv(vp), tok, tok, tok, tok, own(c), state(f, vp),
         state(f, vp), own(vp), own(vp), own(vp)],
        [q, k, v, beta, gc, wq, wk, t, h, lam, do, gv, vn], 5, s.warps_grad)
  dqs, dks, dw, dwq_s, dwk, ddec = _grad_state_call(
      q, k, wq, wk, h, lam, do, gv, vn, s)
  dq, dk, dv, dbeta, dgc, dwq = per_chunk(
      _grad_ut_kernel, "delta_rule_grads_ut",
      [own(f), kv(f), kv(vp), tok, tok, tok, own(c), own(vp), own(vp),
       own(vp), own(f), own(f), own(f)],
      [q, k, v, beta, gc, wq, t, do, gv, vn, dqs, dks, dw], 3, s.warps_gut)
  return (dq, dk, dv, dbeta, dgc, dwq + dwq_s.sum(1), dwk.sum(1),
          ddec.sum(1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _core(q, k, v, beta, gc, wq, wk, dec, s0, rc, s: _S):
  # The forward alone. output_scores (None or True): the kernels that use
  # the scores form them (a is None).
  s = dataclasses.replace(s, out_scores=s.out_scores_fwd,
                          ut_split=s.ut_split_fwd)
  w, u, a = _ut_call(q, k, v, beta, gc, wq, rc, s, scores=not s.out_scores)
  return _forward(q, k, a, w, u, wq, wk, dec, s0, s, False, gc=gc,
                  rc=rc)[:2]


def _core_fwd(q, k, v, beta, gc, wq, wk, dec, s0, rc, s: _S):
  w, u, a, t = _ut_call(q, k, v, beta, gc, wq, rc, s, store_t=True,
                        scores=not s.out_scores)
  o, final, h, vn = _forward(q, k, a, w, u, wq, wk, dec, s0, s,
                             s.fwd_states, gc=gc, rc=rc)
  if not s.fwd_states:  # the backward recomputes them
    h = vn = None
  return (o, final), (q, k, v, beta, gc, wq, wk, dec, s0, rc, w,
                      u if h is None else None, a, t, h, vn)


def _core_bwd(s: _S, res, cts):
  q, k, v, beta, gc, wq, wk, dec, s0, rc, w, u, a, t, h, vn = res
  do, dfin = cts
  b, tp, n, f = q.shape
  kh, vp = k.shape[2], v.shape[-1]
  dt = w.dtype
  sc = dict(gc=gc, rc=rc)  # output_scores: the reverse sweep forms them
  if h is None:
    _, h, vn = _states_sweep(q, k, a, w, u, wq, wk, dec, s0, s, False)
  do = do.astype(dt)
  gv, lam, ds0 = _lam_sweep(q, k, a, w, wq, wk, dec, do, dfin.astype(_F32),
                            s, **sc)
  dq, dk, dv, dbeta, dgc, dwq, dwk, ddec = _grad_call(
      q, k, v, beta, gc, wq, wk, t, h, lam, do, gv, vn, rc, s)
  if s.rep > 1:  # per query head -> per key/value head
    dk = dk.reshape(b, tp, kh, s.rep, f).sum(3)
    dv = dv.reshape(b, tp, kh, s.rep, vp).sum(3)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbeta,
          dgc, dwq, dwk, ddec, ds0 if s.has_s0 else None, None)


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _f32_tiles(cfg: DeltaConfig, default: bool) -> DeltaConfig:
  """float32 tiles are twice the bytes: narrower value blocks by default,
  and one pipeline stage always (three stages of [C, F] float32 q, k, w
  tiles overflow the H100's 227 KiB of shared memory; so did the gradient
  kernel's whole [F, V] float32 state tiles at F = V = 128)."""
  if default:
    cfg = dataclasses.replace(cfg, block_v=32, block_v_bwd=32,
                              block_v_grad=32)
  # One TF32 pass would leave float32 inputs float16-accurate (TF32 keeps
  # float16's 10-bit mantissa): they keep the three passes.
  dots, sdots = ("tf32x3" if x == "tf32" else x
                 for x in (cfg.inverse_dots, cfg.split_inverse_dots))
  return dataclasses.replace(cfg, num_stages=1, num_stages_bwd=1,
                             num_stages_grad=1, inverse_dots=dots,
                             split_inverse_dots=sdots)


def _auto_block_v(programs: int, vp: int, sms: int, fill: float = 1.0) -> int:
  """64 value columns per sweep program, halved (to 16 at least) while
  ``programs`` (batch * heads) times the value blocks stays below ``fill``
  programs per multiprocessor: the sweep is sequential over chunks, so at
  long T and small batches only more, narrower programs fill the GPU."""
  bv = min(64, vp)
  while bv > 16 and programs * (vp // bv) < fill * sms:
    bv //= 2
  return bv


# The delta rule's reverse sweep (``block_v_bwd=None``) halves its value
# block only while the programs fill less than half the SMs. On an H100
# (B T = 64k, N = 16, F = V = 128, forward+backward), one program per SM
# (value blocks of 32 at T = 16k, 16 at 32k) against half that (64 at 16k,
# 32 at 32k): ungated (run98) 8.19 / 9.08 against 7.93 / 8.44 ms, i.e.
# 8.00 -> 8.27 and 7.22 -> 7.77 M tokens/s; gated (run102) 7.74 -> 8.18
# and 6.86 -> 7.50 M tokens/s. The GPU tests pass at both blocks (run100,
# run102).
_BWD_FILL = 0.5


# The forward sweep (``block_v=None``) narrows its value block to 16
# columns only where 32 would fill less than 0.9 of the SMs: 128 programs
# on an H100's 132 count as full, and 16-column tiles are slow. On an H100
# (B T = 64k, N = 16, F = V = 128, bf16, 3 stages; run114), T = 32k (B N =
# 32 programs) at 32 columns against 16: forward 32.3 / 31.8 against
# 30.5 / 30.1 M tokens/s (delta / gated delta; 33.6 / 33.0 at 4 stages;
# fla chunk_(gated_)delta_rule 25.0 / 28.3 in the same process); T = 64k
# (16 programs) stays at 16 (28.1 / 27.7 against 26.3 / 26.0 at 32), 16k
# at 32 (run107: 64 slower), 4k at 64 (42.1 / 41.3 against 31.9 / 31.4 at
# 32).
_FWD_FILL16 = 0.9


def _auto_block_v_fwd(programs: int, vp: int, sms: int) -> int:
  """The forward sweep's value block: ``_auto_block_v``'s, but 32 columns
  rather than 16 where those programs fill ``_FWD_FILL16`` of the SMs."""
  bv = _auto_block_v(programs, vp, sms)
  if bv < 32 <= vp and programs * (vp // 32) >= _FWD_FILL16 * sms:
    bv = 32
  return bv


def _auto_separate_output(programs: int, vp: int, sms: int) -> bool:
  """``separate_output=None``: on where the automatic value block of the
  sweeps is narrower than 64 columns (or V), i.e. where the (batch, head)
  programs alone do not fill the GPU and the sequential sweep is
  latency-bound; there halving its matmuls pays for storing and reading
  the states (run39/run40, see ``DeltaConfig``)."""
  return _auto_block_v(programs, vp, sms) < min(64, vp)


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
    config: tiling (default ``DeltaConfig()``, with the fields of the
      JSON object in ``ATTNJAX_DELTA_CONFIG`` if that is set: a tuning
      override).
    chunk: overrides ``config.chunk``.
    interpret: Pallas interpret mode (default: unless on a GPU).

  Returns:
    ``(out [B, T, N, V] in q's dtype, final_state float32 [B, N, F, V])``,
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
  # No config: the defaults, with any ATTNJAX_DELTA_CONFIG (JSON) fields.
  cfg = config or env_overrides(DeltaConfig(), "ATTNJAX_DELTA_CONFIG")
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
  sms = _num_sms()
  splits = max(x for x in range(1, min(int(cfg.sweep_splits), nc) + 1)
               if nc % x == 0)
  bv = cfg.block_v or _auto_block_v_fwd(b * n * splits, vp, sms)
  # The split sweep's first pass: F transition columns before the V, in
  # blocks no wider than a given block_v (float32's 32: shared memory).
  wide = cfg.block_v or _auto_block_v(b * n * splits, fp + vp, sms)
  bva = max((x for x in (16, 32, 64)
             if fp % x == 0 and vp % x == 0 and x <= wide), default=16)
  bvb = cfg.block_v_bwd or _auto_block_v(b * n * splits, vp, sms,
                                          fill=_BWD_FILL)
  s = _S(scale=float(scale), chunk=c, nc=nc, bv=min(bv, vp),
         bvb=min(bvb, vp), warps=cfg.num_warps,
         stages=cfg.num_stages, warps_bwd=cfg.num_warps_bwd,
         stages_bwd=cfg.num_stages_bwd, warps_ut=cfg.num_warps_ut,
         warps_grad=cfg.grad_warps(fp), stages_grad=cfg.num_stages_grad,
         warps_gut=cfg.num_warps_grad_ut or cfg.grad_warps(fp),
         bvg=cfg.block_v_grad, bkg=cfg.grad_block_k or 0,
         doubling=cfg.diag_inverse == "doubling",
         inverse_dots=cfg.inverse_dots,
         bku=cfg.grad_ut_block_k or 0, buv=cfg.ut_block_v or 0,
         fwd_states=cfg.forward_states,
         sep_out=splits > 1 or (
             _auto_separate_output(b * n, vp, sms)
             if cfg.separate_output is None else cfg.separate_output),
         splits=splits, bva=bva,
         prefetch=cfg.prefetch_weights,
         packed=cfg.packed_weights,
         ut_split=cfg.ut_split is True and not cfg.ut_block_v,
         ut_split_fwd=cfg.ut_split is not False and not cfg.ut_block_v,
         warps_t=cfg.num_warps_t, split_dots=cfg.split_inverse_dots,
         warps_wu=cfg.num_warps_wu, bkt=cfg.ut_split_block_k,
         out_scores=cfg.output_scores is True,
         out_scores_fwd=cfg.output_scores is not False,
         has_s0=initial_state is not None, has_seg=resets is not None,
         interpret=bool(interpret),
         upcast=bool(interpret) and jax.default_backend() == "cpu",
         rep=n // kh)
  # Padding: beta = 0 and g = 0 leave the state untouched.
  qp = _pad_axis(_pad_axis(q, 3, fp), 1, tp)
  kp = _pad_axis(_pad_axis(k, 3, fp), 1, tp)
  vpd = _pad_axis(_pad_axis(v, 3, vp), 1, tp)
  bp = _pad_axis(jnp.moveaxis(beta.astype(_F32), 1, 2), 2, tp)
  r = None if resets is None else _pad_axis(resets.astype(bool), 1, tp)
  if log_gate is None:
    # No cumulative sums over a constant zero gate: XLA constant-folds
    # those, seconds per compile at B * N * T = 1M.
    if r is None:
      gc = jnp.zeros((b, n, tp), _F32)
      wq = wk = jnp.ones((b, n, tp), _F32)
      dec = jnp.ones((b, n, nc), _F32)
    else:
      gc, wq, wk, dec = (jnp.broadcast_to(x, (b, n) + x.shape[2:]) for x in
                         _block_weights(None, r, c))
  else:
    g = _pad_axis(jnp.moveaxis(log_gate.astype(_F32), 1, 2), 2, tp)
    gc, wq, wk, dec = _block_weights(g, r, c)
  rc = None if r is None else jnp.cumsum(r.astype(jnp.int32), axis=-1)
  dec = jnp.repeat(dec, c, axis=-1)
  s0 = None
  if initial_state is not None:
    s0 = _pad_axis(_pad_axis(initial_state.astype(_F32), 2, fp), 3, vp)
  o, final = _core(qp, kp, vpd, bp, gc, wq, wk, dec, s0, rc, s)
  return o[:, :t, :, :vd], final[:, :, :f, :vd]
