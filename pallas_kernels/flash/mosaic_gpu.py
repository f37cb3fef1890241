"""Flash attention forward for Hopper (sm_90) with Pallas Mosaic GPU.

The structure follows FlashAttention-3 (Shah et al., 2024,
https://arxiv.org/abs/2407.08608), written from scratch against
``jax.experimental.pallas.mosaic_gpu``:

* **Persistent CTAs.** With ``persistent`` (the default) the grid is one CTA
  per SM; each walks a static list of work items (batch, head, query tile)
  made on the host by list scheduling on the tiles' key-block counts (the
  longest first within a head, so causal tails balance, and in head order, so
  CTAs running at the same time share K/V tiles in L2). The producer runs
  ahead across item boundaries: the K/V ring never drains between tiles, the
  next tile's Q is loaded into a second buffer while the current one runs,
  and the output store of one tile overlaps the next tile's matmuls.
* **Warp specialisation.** Each CTA runs ``num_compute_wgs`` consumer
  warpgroups, each owning ``block_q`` query rows, and one producer warpgroup
  that streams K and V tiles with TMA into a ``num_stages``-deep shared-memory
  ring. Full/empty handshakes use mbarriers: TMA completion (``k_ready``,
  ``v_ready``, ``q_ready``) and one arrival per consumer (``k_free``,
  ``v_free``, ``q_free``). The producer gives its registers to the consumers
  (``setmaxnreg``).
* **Intra-warpgroup overlap** (FA3 section 3.2). In iteration ``j`` a consumer
  issues ``S_{j+1} = Q K_{j+1}^T`` and ``O += P_j V_j`` back to back, waits
  for the first only (``wgmma.wait_group 1``) and computes the softmax of
  ``S_{j+1}`` while the tensor cores run ``P_j V_j``. ``O`` lives in a WGMMA
  accumulator for the whole tile (``pl.run_state`` would wait for every
  matmul in flight, which is what serialised the first version).
* **Ping-pong scheduling** (FA3 section 3.1). Two named barriers order the
  consumers' matmul issue so one warpgroup's softmax runs while the other's
  matmuls occupy the tensor cores.
* **Block skipping.** A static table gives, per query tile, the key-block
  range ``[lo, hi)`` to visit and the sub-range ``[a, c)`` of blocks that need
  no elementwise masking. Blocks outside ``[a, c)`` run a masked variant of
  the loop body (mask predicate, key length, segment ids); dynamic key lengths
  shrink ``hi`` and ``c`` at run time.

Softmax runs in base 2 on logits pre-multiplied by ``scale * log2(e)`` (one
FMA per element); the running max of a row that has seen nothing is ``-inf``
and every exponent is arranged so that such rows give ``0``, never ``NaN``.

Only jax and numpy are imported (the attnjax wrapper adapts masks).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["FwdConfig", "default_fwd_config", "flash_forward",
           "kv_block_ranges", "work_schedule", "num_sms",
           "SUPPORTED_HEAD_DIMS"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SMEM_BYTES = 227 * 1024
# Mosaic GPU uses named barrier 0 and 1 + warpgroup index; ours start here.
_SCHED_BARRIER_BASE = 8
# Timing diagnostics only (scripts/gpu/mosaic_check.py variant "qdiv"): the
# form of _opaque_zero, read when tracing: "shift" or "div" (before
# 2026-12-06).
_ZERO_FORM = "shift"


def _opaque_zero(i, bound):
  """0 for loop index ``0 <= i < bound``, in a form LLVM cannot fold
  (``i >> 31``).

  Indexing a loop-invariant SMEM operand with it keeps the wgmma descriptors
  (one 64-bit value per 16-element k-step) inside the loop: hoisted, those
  of Q (forward), K and V or Q and dO (backward) take 32-64 registers for
  the whole loop and ptxas spills. One shift a step; the former ``i //
  (bound + 1)`` cost an integer division (a MUFU.RCP and about 25 integer
  instructions), and with it in the forward's step ptxas zeroed the
  logits' accumulator (32 CS2R) instead of issuing the first wgmma with
  scale-d = 0: 453 against 513 instructions a step at H = 64, 496 against
  556 at H = 128 (SASS for an H100; no spills either way).
  """
  if _ZERO_FORM == "div":
    return lax.div(i, jnp.maximum(bound, 0) + 1)
  return lax.shift_right_logical(i, 31)
# Profiling diagnostics only (scripts/gpu/mosaic_profile.py --kernel fwd):
# (events, dir) turns on Mosaic GPU's in-kernel profiler, read when
# tracing: each consumer warpgroup records its named regions ("first" and
# "last" block of a tile, "epilogue"; "step" per middle block, inside it
# "wait_kv" (the producer's K/V), "wait_turn" (the ping-pong turn),
# "wait_s" (this block's Q K^T), "softmax", "wait_pv" (the previous P V)
# and "rescale" (O by alpha)), and a trace JSON lands in dir.
_PROFILE: tuple[int, str] | None = None


# Read when tracing: True compiles every forward as if its config had
# no_auto_barriers=True (a timing switch over the default tilings of every
# shape; mosaic_check variant "nabdef", scripts/gpu/force_forms.py).
_NO_AUTO_BARRIERS = False


def _fwd_params(cfg):
  nab = cfg.no_auto_barriers or _NO_AUTO_BARRIERS
  if _PROFILE is None:
    return plgpu.CompilerParams(approx_math=True,
                                unsafe_no_auto_barriers=nab)
  space, path = _PROFILE
  return plgpu.CompilerParams(
      approx_math=True, unsafe_no_auto_barriers=nab,
      profile_space=space, profile_dir=path, profile_bounds_check=True)


# How the forward keeps each row's running sum l, read when tracing: True
# keeps every thread's share in its own 8-column group of the WGMMA layout
# ([block_q, 8]; the lanes' shares are added once per tile; 453 -> 443
# instructions a step at H = 64), False reduces P's rows across lanes every
# block (two shuffles and adds per row). True since run77 (2026-12-06, one
# H100, beside False in one process; mosaic_check variant "lshuffle" times
# False now):
# forward TFLOP/s 649 / 637 at H = 128 4k full MHA, 676 / 662 16k causal
# GQA, 454 / 444 at H = 64 16k causal MHA; within noise or 1-2% slower at
# H = 64 4k full (421 / 425) and H = 128 1k full (624 / 635). The Mosaic
# GPU suite passed with it (102/102, run77 and run79); False stays tested
# by test_former_step_forms (CPU interpreter and GPU).
_L_PARTIAL = True
_L_GROUP = 8

# The order of a forward step, read when tracing. False (the default): in
# its turn a consumer issues Q K_{j+1}^T and P_j V_j together and hands
# the turn on; it then waits for S, runs the softmax and waits for P_j V_j
# (in the H = 64 SASS that wait lands before the first exponential).
# True (opt-in; mosaic_check variant "serialturn"): tokamax's sm90 order,
# in its turn a consumer issues P_j V_j, waits for it, issues Q K_{j+1}^T
# and only then hands the turn on; then waits for S and runs the softmax
# with no matmul of its own in flight. Forward TFLOP/s on an H100 (run88,
# one process): +0-2% at H = 64 (4k full 403 -> 409), -5% at H = 128,
# 16k causal GQA (638 -> 605); so not the default.
_SERIAL_TURN = False

# Where P_j, the A operand of P_j V_j, lives, read when tracing. False (the
# default): in registers (the softmax's 16-bit output). True (opt-in;
# mosaic_check variant "psmem"): in a two-slot SMEM ring per consumer
# ([2, wgs, block_q, block_kv], 64 KB with two consumers), block j in slot
# j % 2, and the LSE leaves from registers (H <= 128, where it fits:
# _use_p_smem). In the H = 64 SASS the default's wait for P_j V_j lands
# before the first exponential of block j + 1: ptxas gives the new P the
# registers the in-flight wgmma reads. With P_j in SMEM no register of the
# softmax is a wgmma operand, so only the O rescale has to wait for P_j
# V_j, and the exponentials may run under it (FlashAttention-3's intra-
# warpgroup overlap); the price is a 16 KB SMEM store and a fence a block.
# Slot (j + 1) % 2 was last read by P_{j-1} V_{j-1}, waited for in step
# j - 1.
_P_SMEM = False


def _column_group_sum(p):
  """[rows, 8]: the sum of p's 8-column groups, a pairwise tree (each
  thread adds its own registers; no lane exchange)."""
  parts = [p[:, c:c + _L_GROUP] for c in range(0, p.shape[1], _L_GROUP)]
  while len(parts) > 1:
    parts = [a + b for a, b in zip(parts[::2], parts[1::2])] + (
        parts[-1:] if len(parts) % 2 else [])
  return parts[0]


# Columns of the per-CTA schedule table.
_ITEM_COLS = 8  # b, h, qt, lo, a, c, hi, (pad)
# Host-side list scheduling handles up to this many work items; beyond it
# items are dealt round-robin (still correct, less well balanced).
_MAX_SCHEDULED_ITEMS = 1 << 18

_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)


@dataclasses.dataclass(frozen=True)
class FwdConfig:
  """Tiling of the forward kernel.

  Attributes:
    block_q: query rows per consumer warpgroup (multiple of 64).
    block_kv: keys per pipeline stage (multiple of 64). 192 at H = 64
      (11% fewer instructions per key in the unmasked step) was slower on
      an H100 (run74, forward TFLOP/s against 128: T = 4k full MHA 395.8 /
      425.8, causal 267.7 / 387.5, T = 1k full 278.3 / 388.7).
    num_stages: depth of the K/V shared-memory ring.
    num_compute_wgs: consumer warpgroups per CTA (1 to 4). Four (opt-in,
      H = 64, 64-key blocks, 112 registers each: mosaic_check variant
      "wg4") keep four warps a sub-partition, three of them in the
      softmax while one issues its matmuls.
    pingpong: order the consumers' matmuls with named barriers.
    consumer_regs, producer_regs: ``setmaxnreg`` targets. The consumers'
      increase is served from what the producer's decrease frees of the
      launch's equal share (65536 registers over all warpgroups' threads,
      a multiple of 8 each); a request beyond that pool would block for
      ever, so it is refused.
    no_auto_barriers: let Pallas skip its conservative SMEM barriers.
    persistent: one CTA per SM walking a static list of tiles (else one CTA
      per tile, scheduled by the hardware).
    q_buffers: Q tiles in shared memory (2 lets the next tile's Q load while
      the current one runs; 0 picks 2 when it fits, else 1).
    num_ctas: persistent grid size; 0 means the device's SM count.
    overlap_epilogue: with two Q buffers, each consumer issues the next
      tile's first ``Q K^T`` beside its last ``P V`` and runs this tile's
      epilogue (normalise, store O and the log-sum-exp) while it computes,
      as FlashAttention-3 overlaps a tile's epilogue with the next one's
      first matmul (with one Q buffer it has no effect). Opt-in: no faster
      on an H100 (run74, H = 64, B T = 16k, forward TFLOP/s against the
      default in one process: T = 4k full MHA 411.7 / 425.8, GQA 4:1
      421.1 / 419.6, causal MHA 384.4 / 387.5, T = 1k full 385.4 / 388.7).
      Its GPU test passes.
    early_q_release: with one Q buffer (H = 256, where two do not fit),
      each consumer hands the buffer back as soon as its last ``Q K^T`` is
      done, before its last ``P V`` and its epilogue, and the producer
      loads the next tile's Q under them (after an L2 prefetch of it
      issued before the wait); O then leaves through two small SMEM slots
      per consumer (``[block_q, 64]``, as tokamax's epilogue) instead of
      the Q buffer, and the log-sum-exp from registers. Without it the
      next tile's Q is loaded only once this tile's output has been read
      out of the Q buffer. Where it does not fit (H = 256 with segment
      ids) the kernel runs without it. The default at H = 256 up to
      ``EARLY_Q_MAX_LEN`` keys and at H = 64 (two consumers) up to
      ``EARLY_Q_MAX_LEN_H64``.
  """
  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  num_compute_wgs: int = 2
  pingpong: bool = True
  consumer_regs: int = 240
  producer_regs: int = 24
  no_auto_barriers: bool = False
  persistent: bool = True
  q_buffers: int = 0
  num_ctas: int = 0
  overlap_epilogue: bool = False
  early_q_release: bool = False

  def __post_init__(self):
    if self.block_q % 64 or self.block_kv % 64:
      raise ValueError(f"block_q={self.block_q} and block_kv={self.block_kv} "
                       "must be multiples of 64")
    if self.num_stages < 2:
      raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
    if self.num_compute_wgs not in (1, 2, 3, 4):
      raise ValueError(f"num_compute_wgs must be 1, 2, 3 or 4, got "
                       f"{self.num_compute_wgs}")
    if self.q_buffers not in (0, 1, 2):
      raise ValueError(f"q_buffers must be 0, 1 or 2, got {self.q_buffers}")
    if self.early_q_release and (self.q_buffers == 2
                                 or self.overlap_epilogue):
      raise ValueError("early_q_release needs one Q buffer (q_buffers 0 or "
                       "1, overlap_epilogue off)")
    wgs = self.num_compute_wgs
    share = 65536 // (128 * (wgs + 1)) // 8 * 8  # per thread at launch
    regs = wgs * self.consumer_regs + self.producer_regs
    if regs > share * (wgs + 1):
      raise ValueError(
          f"consumer_regs={self.consumer_regs} x {wgs} warpgroups + "
          f"producer_regs={self.producer_regs} = {regs} exceeds the "
          f"{share} x {wgs + 1} = {share * (wgs + 1)} registers per "
          "thread slot the launch gives (setmaxnreg would wait for ever)")

  @property
  def tile_q(self) -> int:
    return self.block_q * self.num_compute_wgs


# H <= 64 without a logits soft cap: three consumer warpgroups from this
# many query and key rows without a mask, and from WG3_MIN_LEN_MASKED under
# one (see default_fwd_config).
WG3_MIN_LEN = 4096
WG3_MIN_LEN_MASKED = 8192


# H = 256: FwdConfig.early_q_release from this many keys down (short rows,
# where a tile's fixed cost weighs most). Forward TFLOP/s on an H100, one
# process, early / not (run119-run121, 2026-12-07): T = 1k full MHA 615.0 /
# 591.0, GQA 4:1 630.9 / 592.7; 1k causal 476.6 / 449.6, GQA 499.9 /
# 477.3; 2k full 666.8 / 659.5; 4k causal 648.1 / 626.7, GQA 717.7 /
# 684.2; 4k full GQA 690.2 / 672.9, MHA 643.4 / 673.8, 647.7 / 666.2 and
# 694.1 / 654.2 in three runs (noise); 16k full 668.1 / 681.9, GQA
# 675.4 / 682.3 (so not there).
EARLY_Q_MAX_LEN = 4096
# H = 64 with two consumers: the same from this many keys down. Forward
# TFLOP/s on an H100, one process, early / not (run123, 2026-12-07): T = 1k
# full MHA 399.5 / 382.8 (cuDNN 400.1), GQA 4:1 390.7 / 380.7 (tokamax
# 415.9); 4k causal MHA 386.5 / 388.4 and 4k full (three consumers the
# default there: 451.5) 435.7, so not from 4k.
EARLY_Q_MAX_LEN_H64 = 1024


def default_fwd_config(head_dim: int, causal: bool = False, *,
                       q_len: int | None = None,
                       kv_len: int | None = None,
                       soft_cap: bool = False,
                       long_rows: bool = True) -> FwdConfig:
  """The tiling used when the caller gives none.

  Args:
    head_dim: H.
    causal: whether a mask (causal, window, ...) skips blocks.
    soft_cap: whether a logits soft cap applies (more live registers).
    q_len, kv_len: T and S, where known. At H <= 64 without a soft cap
      and with both at least ``WG3_MIN_LEN`` (4k; ``WG3_MIN_LEN_MASKED``,
      8k, under a mask), three consumer warpgroups of 64 rows (FA3's
      192-row tile, 160 registers each, 3 stages). Measured on an H100
      (B T = 16k, N = 32, forward TFLOP/s, three against two consumers;
      run43): T = 16k full 475 / 420 (cuDNN 464, tokamax 492); 2026-12-07
      (run102/run104, after the step forms of run77): T = 4k full MHA
      444.5 / 413.6 and 449.9 / 410.4, GQA 4:1 442.8 / 413.6, T = 16k
      causal MHA 468.1 / 445.3; T = 8k causal (run108) MHA 432.2 / 419.4,
      GQA 4:1 454.6 / 427.4 (cuDNN 423.6 / 426.2), its GPU test at 8k
      passing (run114); but T = 4k causal 373.4 / 388.2 (GQA
      376.2 / 401.9) and T = 1k full 302.9 / 383.0 (a 192-row tile pads 1k
      to 1152 rows). Through the default path (run105): 4k full MHA
      440.7 (cuDNN 449.5), GQA 450.9 (tokamax 462.0), 16k causal MHA
      470.1 (tokamax 485.9), GQA 480.5 (tokamax 444.6); forward+backward
      408.7 / 426.4 / 448.3 / 456.9 (the backward pays for the padding to
      384 rows only in copies: its all-padding query blocks are skipped).
      Its correctness on the GPU: ``test_default_three_consumer_forward``
      (run106: the Mosaic GPU suite 115/115) and the same maximum
      difference from cuDNN as two consumers at every timed shape. It
      spills 148 / 220 bytes full at H = 64 (scripts/aot/ptxas_report.py)
      and was the faster all the same.
    long_rows: under a mask, whether it leaves a query row keys in
      proportion to T (causal) rather than a bounded number (a local
      window, a block-sparse pattern): only then may the three-consumer
      tile above serve it (short rows favour the smaller tile, as at 4k
      causal and 1k full).
  """
  if head_dim <= 64:
    least = WG3_MIN_LEN_MASKED if causal else WG3_MIN_LEN
    if (not soft_cap and (long_rows or not causal) and q_len is not None
        and kv_len is not None and min(q_len, kv_len) >= least):
      return FwdConfig(block_q=64, block_kv=128, num_stages=3,
                       num_compute_wgs=3, consumer_regs=160,
                       producer_regs=32)
    return FwdConfig(block_q=64, block_kv=128, num_stages=3,
                     early_q_release=(kv_len is not None
                                      and kv_len <= EARLY_Q_MAX_LEN_H64))
  if head_dim <= 128:
    return FwdConfig(block_q=64, block_kv=128, num_stages=2)
  return FwdConfig(block_q=64, block_kv=64, num_stages=2,
                   early_q_release=(kv_len is not None
                                    and kv_len <= EARLY_Q_MAX_LEN))


# FwdConfig.early_q_release: O leaves through this many SMEM slots per
# consumer, each [block_q, _EPI_COLS] (128 bytes a row in 16 bits).
_EPI_SLOTS = 2
_EPI_COLS = 64


def _rnd(n):
  return -(-n // 1024) * 1024


def smem_bytes(cfg: FwdConfig, head_dim: int, head_dim_v: int,
               itemsize: int = 2, segments: bool = False,
               q_buffers: int | None = None, p_smem: bool = False) -> int:
  """Shared memory the forward kernel allocates (rounded as Mosaic does;
  ``p_smem``: with the two-slot P ring of ``_P_SMEM``)."""
  early = cfg.early_q_release
  qb = 1 if early else (q_buffers or cfg.q_buffers or 1)
  wgs, bq = cfg.num_compute_wgs, cfg.block_q
  total = _rnd(qb * wgs * bq * max(head_dim, head_dim_v) * itemsize)
  total += cfg.num_stages * _rnd(cfg.block_kv * head_dim * itemsize)
  total += cfg.num_stages * _rnd(cfg.block_kv * head_dim_v * itemsize)
  if early:  # O's slots; the LSE from registers
    total += _rnd(wgs * _EPI_SLOTS * bq * _EPI_COLS * itemsize)
  elif not p_smem:  # with the P ring the LSE goes out from registers
    total += _rnd(wgs * bq * 4)
  if segments:
    total += _rnd(cfg.num_stages * cfg.block_kv * 4)
    total += _rnd(qb * wgs * bq * 4)
  if p_smem:
    total += _rnd(2 * wgs * bq * cfg.block_kv * itemsize)
  return total + 1024  # barriers


def _q_buffers(cfg, h, hv, itemsize, segments, p_smem=False):
  if cfg.early_q_release:
    return 1
  if cfg.q_buffers:
    return cfg.q_buffers
  two = smem_bytes(cfg, h, hv, itemsize, segments, q_buffers=2,
                   p_smem=p_smem)
  return 2 if two <= SMEM_BYTES else 1


# What Mosaic GPU allocates beyond smem_bytes' sum (barriers, alignment),
# at most: 2640 bytes for the H = 128 forward with the P ring, one Q buffer
# and the 512-byte LSE buffer (232528 against the H100's 232448: it did not
# fit), about 1100 without that buffer (it compiles; H100, 2026-12-07). So
# with the ring the LSE goes out from registers. The same margin decides
# where FwdConfig.early_q_release's O slots fit (1104 bytes over with
# segment ids at H = 256, run119).
_SMEM_SLACK = 2048


def _use_p_smem(cfg, h, hv, itemsize, segments):
  """Whether ``_P_SMEM`` applies: H <= 128 (at H = 256 the forward then
  spills 36 / 44 bytes), where the ring fits beside the Q buffers the
  config needs (one unless it asks for two or for ``overlap_epilogue``):
  H = 64 and 128 at the default tiling; not H = 128 with segment ids, nor
  H = 64's three consumers with two Q buffers."""
  qb = cfg.q_buffers or (2 if cfg.overlap_epilogue else 1)
  return _P_SMEM and max(h, hv) <= 128 and (
      smem_bytes(cfg, h, hv, itemsize, segments, q_buffers=qb, p_smem=True)
      + _SMEM_SLACK <= SMEM_BYTES)


def num_sms() -> int:
  """SMs of the first device (132, an H100 SXM, when there is no GPU)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return 132
  if dev.platform != "gpu":
    return 132
  return int(getattr(dev, "core_count", 132) or 132)


def kv_block_ranges(kinds: np.ndarray) -> np.ndarray:
  """Per query tile, the key blocks to visit: int32 [4, nq] of lo, a, c, hi.

  Args:
    kinds: int [nq, nk] tile kinds (0 EMPTY, 1 PARTIAL, 2 FULL).

  Blocks ``[lo, hi)`` are visited; ``[a, c)`` (the longest run of FULL tiles
  inside) skip elementwise masking; the rest (EMPTY tiles inside the range
  included) are masked elementwise, which is always correct.
  """
  kinds = np.asarray(kinds)
  nq, _ = kinds.shape
  out = np.zeros((4, nq), np.int32)
  for i in range(nq):
    nz = np.nonzero(kinds[i] > 0)[0]
    if not len(nz):
      continue
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    best, cur_start = (lo, lo), None
    for j in range(lo, hi + 1):
      is_full = j < hi and kinds[i, j] == 2
      if is_full and cur_start is None:
        cur_start = j
      elif not is_full and cur_start is not None:
        if j - cur_start > best[1] - best[0]:
          best = (cur_start, j)
        cur_start = None
    out[:, i] = (lo, best[0], best[1], hi)
  return out


@functools.lru_cache(maxsize=256)
def _schedule_cached(ranges_bytes, nqt, b, n, kh, num_ctas, overhead,
                     lpt=False):
  ranges = np.frombuffer(ranges_bytes, np.int32).reshape(4, nqt)
  groups = n // kh
  work = (ranges[3] - ranges[0]).astype(np.int64)
  # Heaviest query tiles first inside a head (causal tail balance); the query
  # heads of one K/V head next to each other (they read the same K/V tiles).
  q_order = np.argsort(-work, kind="stable")
  bb, kvh, qq, gg = np.meshgrid(np.arange(b), np.arange(kh), q_order,
                                np.arange(groups), indexing="ij")
  bb, qq = bb.ravel(), qq.ravel()
  hh = (kvh * groups + gg).ravel()
  items = np.stack([bb, hh, qq, ranges[0, qq], ranges[1, qq], ranges[2, qq],
                    ranges[3, qq], np.zeros_like(qq)], axis=1).astype(np.int32)
  total = len(items)
  g = max(1, min(num_ctas, total)) if num_ctas else total
  if g == total:
    return items[:, None, :], np.ones((total,), np.int32)
  cost = work[qq] + overhead
  if lpt:
    # Heaviest first over all heads (stable: equal costs keep head order).
    perm = np.argsort(-cost, kind="stable")
    items, cost = items[perm], cost[perm]
  owner = np.empty((total,), np.int64)
  if total <= _MAX_SCHEDULED_ITEMS:
    # List scheduling in list order: each item goes to the CTA that frees up
    # first, which is what a dynamic tile scheduler would do with these costs.
    heap = [(0, c) for c in range(g)]
    for i in range(total):
      load, c = heapq.heappop(heap)
      owner[i] = c
      heapq.heappush(heap, (load + int(cost[i]), c))
  else:
    owner[:] = np.arange(total) % g
  counts = np.bincount(owner, minlength=g).astype(np.int32)
  table = np.zeros((g, int(counts.max()), _ITEM_COLS), np.int32)
  fill = np.zeros((g,), np.int64)
  for i in range(total):
    c = owner[i]
    table[c, fill[c]] = items[i]
    fill[c] += 1
  return table, counts


def work_schedule(ranges: np.ndarray, b: int, n: int, kh: int,
                  num_ctas: int, overhead: int = 2, lpt: bool = False):
  """Static work lists of a persistent grid.

  Args:
    ranges: int32 [4, nq] from :func:`kv_block_ranges`.
    b, n, kh: batch, query heads, key/value heads.
    num_ctas: grid size; 0 gives one CTA per work item.
    overhead: per-item cost, in key blocks, added to the block count.
    lpt: list-schedule the items heaviest first over all heads (longest
      processing time first) instead of head by head (heaviest first
      within a head, so that CTAs running together share K/V in L2).
      Under a causal mask with few items a CTA the head-by-head list
      balances worse: for causal GQA 4:1 at T = 4k (B = 4, 4 K/V heads,
      128-key tiles, 64-row query blocks, 132 CTAs) its longest CTA has
      172 cost units (blocks + overhead) against 138 for this order and
      a bound of 136 (total / CTAs).

  Returns:
    ``(table int32 [G, max_items, 8], counts int32 [G])``: CTA ``c`` runs
    items ``table[c, :counts[c]]``, each ``(b, h, qt, lo, a, c, hi, 0)``.
  """
  ranges = np.ascontiguousarray(ranges, np.int32)
  return _schedule_cached(ranges.tobytes(), ranges.shape[1], b, n, kh,
                          num_ctas, overhead, bool(lpt))


def cut_item(raw, s_limit, bk, kvlen_ref, qlen_ref=None, tq=None):
  """A work item ``(b, head, query tile, lo, a, c, hi)`` of ``bk``-key
  blocks cut by the key length (and, with ``qlen_ref``, emptied past the
  query length, ``tq`` rows a tile): ``(b, head, qt, lo, a, c, hi,
  kv_limit)``, ``kv_limit`` the keys that exist."""
  bb, hh, qt, lo, a, c, hi = raw
  kv_limit = jnp.int32(s_limit)
  if kvlen_ref is not None:
    kvl = kvlen_ref[bb]
    kv_limit = jnp.minimum(kv_limit, kvl)
    hi = jnp.minimum(hi, lax.div(kvl + (bk - 1), jnp.int32(bk)))
    c = jnp.minimum(c, lax.div(kvl, jnp.int32(bk)))
  if qlen_ref is not None:
    hi = jnp.where(qt * tq >= qlen_ref[bb], lo, hi)
  hi = jnp.maximum(hi, lo)
  a = jnp.clip(a, lo, hi)
  c = jnp.clip(c, a, hi)
  return bb, hh, qt, lo, a, c, hi, kv_limit


def _sched_barrier(op: str, other: bool, num_wgs: int):
  """``bar.sync``/``bar.arrive`` on a consumer's scheduling barrier.

  Consumer ``w`` waits on barrier ``BASE + w``; ``other`` addresses the next
  consumer's barrier ``BASE + (w + 1) % num_wgs``. Each barrier counts the
  waiting warpgroup and the one arriving: 256 threads.
  """
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir.dialects import arith  # pylint: disable=g-import-not-at-top

  @plgpu.inline_mgpu()
  def emit(_):
    i32 = ir.IntegerType.get_signless(32)
    wg = mgpu.utils.warpgroup_idx(sync=False)
    if other:
      wg = arith.remui(arith.addi(wg, mgpu.utils.c(1, i32)),
                       mgpu.utils.c(num_wgs, i32))
    idx = arith.addi(wg, mgpu.utils.c(_SCHED_BARRIER_BASE, i32))
    # convergent: without it LLVM may move the barrier across divergent
    # control flow, and ptxas then serialises every wgmma of the kernel.
    mgpu.utils.inline_ptx(f"bar.{op} $0, 256;", idx, has_side_effects=True,
                          convergent=True)

  emit()


def _tiled_smem(shape, dtype, swizzle=128):
  """SMEM with the (128-byte by default) swizzle wgmma and TMA both like.

  A wgmma contracts in groups of ``swizzle / itemsize`` elements, so a
  32-row B operand (16-bit) needs the 64-byte swizzle.
  """
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    ranges: np.ndarray,
    predicate: Callable | None = None,
    kv_len_static: int | None = None,
    soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    sinks: jax.Array | None = None,
    config: FwdConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Forward pass on whole tiles.

  Args:
    q: [B, Tp, N, H] with Tp a multiple of ``config.tile_q``.
    k, v: [B, Sp, K, H] and [B, Sp, K, Hv], Sp a multiple of ``block_kv``.
    scale: logit scale.
    ranges: int32 [4, Tp / tile_q] from :func:`kv_block_ranges`.
    predicate: ``(q_idx, kv_idx) -> bool`` evaluated in masked blocks
      (int32 arrays); None means no static mask.
    kv_len_static: keys at or past this position are masked (the true S when
      k was padded); None means Sp.
    soft_cap: ``c * tanh(logits / c)`` when set.
    q_segment_ids, kv_segment_ids: int32 [B, Tp] / [B, Sp] or None.
    q_lengths, kv_lengths: int32 [B] or None.
    sinks: float32 [N] or None.
    config: tiling; default from :func:`default_fwd_config`.

  Returns:
    ``out`` [B, Tp, N, Hv] in q's dtype and ``lse`` float32 [B, N, Tp]
    (natural log, ``-inf`` where nothing is visible).

  Raises:
    NotImplementedError: shapes or dtypes the kernel does not handle.
  """
  b, tp, n, h = q.shape
  _, sp, kh, hv = v.shape
  dtype = q.dtype
  if dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"dtype {dtype} (need bfloat16 or float16)")
  if h not in SUPPORTED_HEAD_DIMS or hv != h:
    raise NotImplementedError(f"head dims H={h}, Hv={hv}")
  cfg = config or default_fwd_config(h)
  bq, bk, stages, wgs = (cfg.block_q, cfg.block_kv, cfg.num_stages,
                         cfg.num_compute_wgs)
  tq = cfg.tile_q
  if tp % tq or sp % bk:
    raise ValueError(f"padded lengths Tp={tp}, Sp={sp} must be multiples of "
                     f"{tq} and {bk}")
  nqt, nkb = tp // tq, sp // bk
  ranges = np.asarray(ranges, np.int32)
  if ranges.shape != (4, nqt):
    raise ValueError(f"ranges must have shape (4, {nqt}), got {ranges.shape}")
  if ranges.max(initial=0) > nkb:
    raise ValueError("ranges point past the last key block")
  segments = q_segment_ids is not None
  itemsize = jnp.dtype(dtype).itemsize
  if cfg.early_q_release and (
      smem_bytes(cfg, h, hv, itemsize, segments) + _SMEM_SLACK
      > SMEM_BYTES):
    # Does not fit (H = 256 with segment ids): the output through Q.
    cfg = dataclasses.replace(cfg, early_q_release=False)
  p_in_smem = _use_p_smem(cfg, h, hv, itemsize, segments)
  qbufs = _q_buffers(cfg, h, hv, itemsize, segments, p_in_smem)
  overlap = cfg.overlap_epilogue and qbufs == 2
  early = cfg.early_q_release
  need = smem_bytes(cfg, h, hv, itemsize, segments, q_buffers=qbufs,
                    p_smem=p_in_smem)
  if need > SMEM_BYTES:
    raise NotImplementedError(f"config {cfg} needs {need} bytes of SMEM")
  groups = n // kh
  s_limit = sp if kv_len_static is None else int(kv_len_static)
  grid_size = (cfg.num_ctas or num_sms()) if cfg.persistent else 0
  table, counts = work_schedule(ranges, b, n, kh, grid_size)
  grid_size = table.shape[0]
  table, counts = jnp.asarray(table), jnp.asarray(counts)
  log2_scale = scale * LOG2E
  if sinks is not None:
    sinks = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None] * LOG2E,
                             (n, bq))
  pingpong = cfg.pingpong and wgs > 1

  def kernel(q_ref, k_ref, v_ref, tab_ref, cnt_ref, sink_ref, qseg_ref,
             kvseg_ref, qlen_ref, kvlen_ref, out_ref, lse_ref, q_smem, k_smem,
             v_smem, lse_smem, qseg_smem, kseg_smem, q_ready, q_free, k_ready,
             v_ready, k_free, v_free, p_smem, o_smem):
    cta = lax.axis_index("c")
    wg = lax.axis_index("wg")
    n_items = cnt_ref[cta]

    def raw_item(i):
      """Work item i of this CTA as stored: b, h, qt, lo, a, c, hi."""
      return tuple(tab_ref[cta, i, r] for r in range(7))

    def item(i, raw=None):
      """Work item i of this CTA, its block range cut by the lengths."""
      return cut_item(raw_item(i) if raw is None else raw, s_limit, bk,
                      kvlen_ref, qlen_ref, tq)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(cfg.producer_regs, action="decrease")

      def tile(i, step):
        bb, hh, qt, lo, _, _, hi, _ = item(i)
        kvh = lax.div(hh, jnp.int32(groups))
        num_kv = hi - lo
        buf = lax.rem(i, jnp.int32(qbufs))

        def load_q():
          if early:
            # Into L2 while the consumers finish the previous item.
            plgpu.async_prefetch(q_ref.at[bb, pl.ds(qt * tq, tq), hh])
          # Buffer buf was last used by item i - qbufs; its consumers free it.
          @pl.when(i >= qbufs)
          def _():
            plgpu.barrier_wait(q_free.at[buf])

          for w in range(wgs):
            rows = pl.ds(qt * tq + w * bq, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[bb, rows, hh], q_smem.at[buf, w],
                                    q_ready.at[buf])
            if segments:
              plgpu.copy_gmem_to_smem(qseg_ref.at[bb, rows],
                                      qseg_smem.at[buf, w], q_ready.at[buf])

        @pl.loop(0, num_kv)
        def _(j):
          s = step + j
          slot = lax.rem(s, jnp.int32(stages))
          kslice = pl.ds((lo + j) * bk, bk)

          @pl.when(s >= stages)
          def _():
            plgpu.barrier_wait(k_free.at[slot])

          plgpu.copy_gmem_to_smem(k_ref.at[bb, kslice, kvh], k_smem.at[slot],
                                  k_ready.at[slot])
          if segments:
            plgpu.copy_gmem_to_smem(kvseg_ref.at[bb, kslice],
                                    kseg_smem.at[slot], k_ready.at[slot])
          # Q after the first K: the ring keeps streaming while Q waits for
          # its buffer.
          pl.when(j == 0)(load_q)

          @pl.when(s >= stages)
          def _():
            plgpu.barrier_wait(v_free.at[slot])

          plgpu.copy_gmem_to_smem(v_ref.at[bb, kslice, kvh], v_smem.at[slot],
                                  v_ready.at[slot])

        pl.when(num_kv == 0)(load_q)
        return step + num_kv

      total = lax.fori_loop(0, n_items, tile, jnp.int32(0))
      # Observe the last release of every buffer, so that no barrier phase
      # completes unobserved (harmless on the GPU; the interpreter checks).
      for x in range(stages):
        @pl.when(total > x)
        def _():
          plgpu.barrier_wait(k_free.at[x])
          plgpu.barrier_wait(v_free.at[x])
      if qbufs == 2:
        @pl.when(n_items >= 2)
        def _():
          plgpu.barrier_wait(q_free.at[lax.rem(n_items, 2)])
      else:
        plgpu.barrier_wait(q_free.at[0])

    def _consumer_body():
      row = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])

      def sched_wait():
        if pingpong:
          _sched_barrier("sync", other=False, num_wgs=wgs)

      def sched_signal():
        if pingpong:
          _sched_barrier("arrive", other=True, num_wgs=wgs)

      def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=_WGMMA)

      def tile(i, carry):
        if overlap:
          # s_pre: this item's first raw logits, issued by the previous
          # item's last block (when have_pre).
          step, raw, s_pre, have_pre = carry
        else:
          step, raw = carry
        # The next item's table row loads while this one runs.
        raw_next = raw_item(jnp.minimum(i + 1, n_items - 1))
        bb, hh, qt, lo, a, c, hi, kv_limit = item(i, raw)
        num_kv = hi - lo
        buf = lax.rem(i, jnp.int32(qbufs))
        if overlap:
          nxt = item(i + 1, raw_next)
          lo_n, hi_n = nxt[3], nxt[6]
          # Whether the last block issues the next item's first Q K^T.
          has_next = (i + 1 < n_items) & (hi_n > lo_n)
          buf_n = 1 - buf
          nslot = lax.rem(step + num_kv, jnp.int32(stages))
        q_base = qt * tq + wg * bq
        qs = pl.ds(q_base, bq)
        q_w = q_smem.at[buf, wg]
        epilogue = functools.partial(epilogue_fn, bb, hh, q_base, qs, q_w)
        if sinks is not None:
          m0 = plgpu.load(sink_ref.at[hh], layout=_ROW, optimized=False)
          l0 = jnp.ones((bq,), jnp.float32)
        else:
          m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
          l0 = jnp.zeros((bq,), jnp.float32)
        m0 = plgpu.layout_cast(m0, _ROW)
        if _L_PARTIAL:
          # Each thread's share of a row's sum, in its 8-column group: the
          # lanes' shares are added once, in the epilogue, not every block.
          l0 = plgpu.layout_cast(
              jnp.full((bq, _L_GROUP), 1.0 / _L_GROUP if sinks is not None
                       else 0.0, jnp.float32), _WGMMA)
        else:
          l0 = plgpu.layout_cast(l0, _ROW)
        if p_in_smem:  # P lives in p_smem; the carry holds none
          p0 = None
        else:
          p0 = plgpu.layout_cast(jnp.zeros((bq, bk), dtype), _WGMMA)
        if overlap:  # the previous item's last block waited for it
          pl.when(jnp.logical_not(have_pre))(
              lambda: plgpu.barrier_wait(q_ready.at[buf]))
        else:
          plgpu.barrier_wait(q_ready.at[buf])
        qseg = None
        if segments:
          qseg = plgpu.load(qseg_smem.at[buf, wg], layout=_ROW)

        def release_previous_q():
          # Two Q buffers: the previous item's buffer held its output until
          # the TMA store read it; hand it back to the producer now.
          if qbufs == 2:
            @pl.when(i > 0)
            def _():
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              plgpu.barrier_arrive(q_free.at[1 - buf])

        def p_slot(j):
          return p_smem.at[lax.rem(j, jnp.int32(2)), wg]

        def keep_p(p, j):
          """Block j's probabilities as the A operand of its P V: in
          registers, or stored in its SMEM slot (then None)."""
          if not p_in_smem:
            return p.astype(dtype)
          p_slot(j)[...] = p.astype(dtype)
          # Generic-proxy stores, then the wgmma's async-proxy reads (the
          # fence includes the warpgroup barrier).
          plgpu.commit_smem()
          return None

        def p_operand(p, j):
          return p_slot(j) if p_in_smem else p

        def softmax(s, j, kvseg, m, l, masked):
          """Online softmax of block j's raw logits s (FA2 lines 8-10)."""
          if soft_cap is not None:
            s = jnp.tanh(s * (scale / soft_cap))
            mult = soft_cap * LOG2E
          else:
            mult = log2_scale
          if masked:
            qi = q_base + iota(0)
            ki = j * bk + iota(1)
            vis = ki < kv_limit
            if predicate is not None:
              vis = vis & predicate(qi, ki)
            if segments:
              vis = vis & (row(qseg, s.shape)
                           == lax.broadcast_in_dim(kvseg, s.shape, [1]))
            s = jnp.where(vis, s, -jnp.inf)
          m_new = jnp.maximum(m, s.max(axis=1) * mult)
          if masked or sinks is None:
            # A row with nothing visible yet keeps m = -inf; shift by 0.
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
          else:
            m_use = m_new
          p = jnp.exp2(s * mult - row(m_use, s.shape))
          alpha = jnp.exp2(m - m_use)
          if _L_PARTIAL:
            l_new = l * row(alpha, l.shape) + _column_group_sum(p)
          else:
            l_new = l * alpha + p.sum(axis=1)
          return m_new, l_new, p, alpha

        def kv_segments(slot, masked):
          # Read before k_free is signalled: the producer refills the slot
          # (segment ids included) as soon as both consumers release it.
          if masked and segments:
            return plgpu.load(kseg_smem.at[slot], layout=_COL)
          return None

        def blocks(o_ref, sn_ref=None):
          def first_block(masked):
            def run(carry):
              m, l, _ = carry
              slot = lax.rem(step, jnp.int32(stages))

              def fresh():
                plgpu.barrier_wait(k_ready.at[slot])
                sched_wait()

                def scope(s_ref):
                  plgpu.wgmma(s_ref, q_w, k_smem.at[slot].T)
                  sched_signal()
                  return s_ref[...]

                return pl.run_scoped(scope, plgpu.ACC((bq, bk), jnp.float32))

              if overlap:  # K's slot and its turn were taken already
                s = lax.cond(have_pre, lambda: s_pre, fresh)
              else:
                s = fresh()
              kvseg = kv_segments(slot, masked)
              plgpu.barrier_arrive(k_free.at[slot])
              release_previous_q()
              # O is still zero: its rescale by alpha is skipped.
              m, l, p, _ = softmax(s, lo, kvseg, m, l, masked)
              return m, l, keep_p(p, lo)
            return run

          def middle_block(j, carry, masked):
            """S_{j+1} = Q K_{j+1}^T and O += P_j V_j, then softmax(S_{j+1}).

            Only the wait for S precedes the softmax; P_j V_j may retire
            under it. O is rescaled and P converted to 16 bits after the
            final wait: ptxas serialises every wgmma of a kernel that writes
            a register an in-flight wgmma reads.
            """
            m, l, p = carry
            slot = lax.rem(step + (j - lo), jnp.int32(stages))
            nslot = lax.rem(step + (j + 1 - lo), jnp.int32(stages))
            with jax.named_scope("wait_kv"):
              plgpu.barrier_wait(k_ready.at[nslot])
              plgpu.barrier_wait(v_ready.at[slot])
            with jax.named_scope("wait_turn"):
              sched_wait()

            def scope(s_ref):
              # Q's descriptors formed here, not hoisted out of the loop
              # (_opaque_zero): 8 fewer 64-bit values live across the loop
              # (fewer spills at H <= 128; at H = 256 ptxas spills more
              # with it).
              q_j = (q_smem.at[buf + _opaque_zero(j, hi + 1), wg]
                     if h <= 128 else q_w)
              pv_a = p_operand(p, j)
              if _SERIAL_TURN:  # P_j V_j done within the turn
                plgpu.wgmma(o_ref, pv_a, v_smem.at[slot])
                with jax.named_scope("wait_pv"):
                  plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(v_free.at[slot])
              plgpu.wgmma(s_ref, q_j, k_smem.at[nslot].T)
              if not _SERIAL_TURN:
                plgpu.wgmma(o_ref, pv_a, v_smem.at[slot])
              sched_signal()
              with jax.named_scope("wait_s"):
                s = plgpu.wgmma_accumulator_load(
                    s_ref, wait_n=0 if _SERIAL_TURN else 1)
              kvseg = kv_segments(nslot, masked)
              plgpu.barrier_arrive(k_free.at[nslot])
              with jax.named_scope("softmax"):
                m_new, l_new, p_new, alpha = softmax(s, j + 1, kvseg, m, l,
                                                     masked)
              if _SERIAL_TURN:
                return m_new, l_new, keep_p(p_new, j + 1), alpha
              if p_in_smem:
                # Slot (j + 1) % 2 is free (P_{j-1} V_{j-1} was waited for
                # in the previous step): store P_{j+1} while P_j V_j runs.
                p_new = keep_p(p_new, j + 1)
              # Keep the softmax above the wait in LLVM's schedule. (ptxas,
              # 13.0, still moves the exponentials below the wait; the row
              # max overlaps P_j V_j, and the other consumer's matmuls cover
              # the rest: see docs/pallas_mosaic_gpu.md.)
              m_new, l_new, p_new, alpha = lax.optimization_barrier(
                  (m_new, l_new, p_new, alpha))
              with jax.named_scope("wait_pv"):
                plgpu.wgmma_wait(0)
              plgpu.barrier_arrive(v_free.at[slot])
              if not p_in_smem:  # (stored already otherwise)
                p_new = p_new.astype(dtype)
              return m_new, l_new, p_new, alpha

            m, l, p, alpha = pl.run_scoped(
                scope, plgpu.ACC((bq, bk), jnp.float32))
            with jax.named_scope("rescale"):
              o = plgpu.wgmma_accumulator_load(o_ref, wait_n=None)
              o_ref[...] = o * row(alpha, o.shape)
            return m, l, p

          def last_block(carry):
            if early:  # every Q K^T of this item is done
              plgpu.barrier_arrive(q_free.at[0])
            slot = lax.rem(step + (hi - 1 - lo), jnp.int32(stages))
            plgpu.barrier_wait(v_ready.at[slot])

            pv_a = p_operand(carry[2], hi - 1)

            def alone():
              plgpu.wgmma(o_ref, pv_a, v_smem.at[slot])
              plgpu.wgmma_wait(0)

            def with_next():
              # The next item's first Q K^T beside this P V, in this
              # block's turn; it runs on under the epilogue.
              plgpu.barrier_wait(k_ready.at[nslot])
              plgpu.barrier_wait(q_ready.at[buf_n])
              sched_wait()
              plgpu.wgmma(o_ref, pv_a, v_smem.at[slot])
              plgpu.wgmma(sn_ref, q_smem.at[buf_n, wg], k_smem.at[nslot].T)
              sched_signal()
              plgpu.wgmma_wait(1)

            if overlap:
              lax.cond(has_next, with_next, alone)
            else:
              alone()
            plgpu.barrier_arrive(v_free.at[slot])
            return carry

          def nothing(carry):
            release_previous_q()
            if early:
              plgpu.barrier_arrive(q_free.at[0])
            return carry

          def scoped(name, fn):
            # A named region (recorded only under _PROFILE).
            def run(*args):
              with jax.named_scope(name):
                return fn(*args)
            return run

          carry = (m0, l0, p0)
          first_full = (a == lo) & (c > lo)
          carry = lax.cond(
              num_kv > 0,
              lambda x: lax.cond(first_full, scoped("first", first_block(False)),
                                 scoped("first", first_block(True)), x),
              nothing, carry)
          # Block j+1 is masked unless it lies in [a, c).
          masked_body = scoped("step", functools.partial(middle_block,
                                                         masked=True))
          full_body = scoped("step", functools.partial(middle_block,
                                                       masked=False))
          a1 = jnp.maximum(a - 1, lo)
          c1 = jnp.maximum(c - 1, lo)
          carry = lax.fori_loop(lo, a1, masked_body, carry)
          carry = lax.fori_loop(a1, c1, full_body, carry)
          carry = lax.fori_loop(c1, hi - 1, masked_body, carry)
          carry = lax.cond(num_kv > 0, scoped("last", last_block),
                           lambda x: x, carry)
          m, l, _ = carry
          if not overlap:
            return o_ref[...], m, l
          # P V is done; the next item's Q K^T may still run.
          with jax.named_scope("epilogue"):
            epilogue(plgpu.wgmma_accumulator_load(o_ref, wait_n=None), m, l)
          s_next = plgpu.wgmma_accumulator_load(sn_ref, wait_n=0)
          return s_next, has_next & (num_kv > 0)

        if overlap:
          return (step + num_kv, raw_next) + pl.run_scoped(
              blocks, plgpu.ACC((bq, hv), jnp.float32),
              plgpu.ACC((bq, bk), jnp.float32))
        acc, m, l = pl.run_scoped(blocks, plgpu.ACC((bq, hv), jnp.float32))
        with jax.named_scope("epilogue"):
          epilogue(acc, m, l)
        return step + num_kv, raw_next

      def epilogue_fn(bb, hh, q_base, qs, q_w, acc, m, l):
        if _L_PARTIAL:
          l = l.sum(axis=1)
        # Epilogue: normalise, write O through this item's Q buffer (idle
        # now: this consumer's matmuls are done and the other consumer only
        # reads its own rows).
        l_safe = jnp.where(l == 0.0, 1.0, l)
        out = acc * row(1.0 / l_safe, acc.shape)
        lse = jnp.where(l == 0.0, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
        if qlen_ref is not None:
          valid = (q_base + plgpu.broadcasted_iota(
              jnp.int32, (bq,), 0, layout=_ROW)) < qlen_ref[bb]
          lse = jnp.where(valid, lse, -jnp.inf)
          out = jnp.where(row(valid, out.shape), out, 0.0)
        if early:
          # The Q buffer went back to the producer after the last Q K^T:
          # O leaves through this consumer's slots, 64 columns at a time.
          lse_ref.at[bb, hh, qs][...] = lse
          out = out.astype(dtype)
          for c in range(hv // _EPI_COLS):
            slot = o_smem.at[wg, c % _EPI_SLOTS]
            # The store that last read this slot (this item's or the
            # previous one's) is done.
            plgpu.wait_smem_to_gmem(_EPI_SLOTS - 1, wait_read_only=True)
            slot[...] = out[:, c * _EPI_COLS:(c + 1) * _EPI_COLS]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                slot, out_ref.at[bb, qs, hh, pl.ds(c * _EPI_COLS, _EPI_COLS)])
          return
        # The previous item's lse store must have read lse_smem.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        q_w[...] = out.astype(dtype)
        if lse_smem is None:
          # With the P ring (no SMEM left for the LSE buffer at H = 128):
          # each row's LSE straight from registers.
          lse_ref.at[bb, hh, qs][...] = lse
        else:
          lse_smem.at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_w, out_ref.at[bb, qs, hh],
                                commit_group=False)
        if lse_smem is not None:
          plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bb, hh, qs],
                                  commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        if qbufs == 1:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.barrier_arrive(q_free.at[0])

      if pingpong:
        # Turns pass around the ring 0 -> 1 -> ... -> wgs-1 -> 0 over all
        # blocks of all items (every consumer visits the same blocks); the
        # last consumer hands consumer 0 the first turn. Per-item hand-offs
        # could let one consumer arrive twice on a barrier before the other
        # waits on it.
        pl.when(wg == wgs - 1)(sched_signal)
      init = (jnp.int32(0), raw_item(0))
      if overlap:
        init += (plgpu.layout_cast(jnp.zeros((bq, bk), jnp.float32), _WGMMA),
                 jnp.bool_(False))
      lax.fori_loop(0, n_items, tile, init)
      if pingpong:
        # Consume the turn the last consumer handed to consumer 0.
        pl.when(wg == 0)(sched_wait)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_regs, action="increase")
      _consumer_body()

  scratch = [
      _tiled_smem((qbufs, wgs, bq, max(h, hv)), dtype),
      _tiled_smem((stages, bk, h), dtype),
      _tiled_smem((stages, bk, hv), dtype),
      (None if p_in_smem or early
       else plgpu.SMEM((wgs, bq), jnp.float32)),
      plgpu.SMEM((qbufs, wgs, bq), jnp.int32) if segments else None,
      plgpu.SMEM((stages, bk), jnp.int32) if segments else None,
      plgpu.Barrier(num_arrivals=wgs * (2 if segments else 1),
                    num_barriers=qbufs),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=qbufs),
      plgpu.Barrier(num_arrivals=2 if segments else 1, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      _tiled_smem((2, wgs, bq, bk), dtype) if p_in_smem else None,
      (_tiled_smem((wgs, _EPI_SLOTS, bq, _EPI_COLS), dtype) if early
       else None),
  ]
  out_shape = (jax.ShapeDtypeStruct((b, tp, n, hv), dtype),
               jax.ShapeDtypeStruct((b, n, tp), jnp.float32))
  call = plgpu.kernel(
      kernel,
      out_type=out_shape,
      scratch_types=scratch,
      grid=(grid_size,),
      grid_names=("c",),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=_fwd_params(cfg),
  )
  return call(q, k, v, table, counts, sinks, q_segment_ids, kv_segment_ids,
              q_lengths, kv_lengths)
