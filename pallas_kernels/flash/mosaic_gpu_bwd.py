"""Flash attention backward for Hopper (sm_90) with Pallas Mosaic GPU.

Two warp-specialised kernels, deterministic (no atomics), after
FlashAttention-2's backward (Dao, 2023, https://arxiv.org/abs/2307.08691,
Algorithm 2) split the way Hopper's register file prefers:

* ``dK/dV``: a CTA owns ``num_compute_wgs * block_kv`` keys (each consumer
  warpgroup ``block_kv`` of them, K and V resident in SMEM) and streams the
  query blocks that can see them (Q, dO, log-sum-exp and ``delta`` in a TMA
  ring fed by a producer warpgroup), for every query head of its key/value
  head (GQA sums in registers). Per block, in transposed form so the
  accumulators stay ``[keys, head_dim]``::

      S^T = K Q^T, P^T = exp2(S^T c - lse), dP^T = V dO^T,
      dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q

  ``dV`` is issued together with ``dP^T`` and overlaps the ``dS`` math.
* ``dQ``: a CTA owns ``num_compute_wgs * block_q`` queries and streams the
  key blocks they see: ``S = Q K^T``, ``dP = dO V^T`` (issued together),
  ``dS = P (dP - delta)``, ``dQ += dS K``.

Both visit only the blocks a static table marks non-empty (causal backward
skips the upper triangle) and mask elementwise only outside its FULL run.
``lse`` comes in base 2 with ``+inf`` for rows that see nothing, so their
probabilities are exactly 0; ``delta`` already includes the log-sum-exp
cotangent (``delta - dlse``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash import mosaic_gpu as fwd_lib

__all__ = ["BwdConfig", "default_bwd_config", "flash_backward_dkv",
           "flash_backward_dq", "SUPPORTED_HEAD_DIMS", "DQ_LAYOUTS"]

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)
_tiled_smem = fwd_lib._tiled_smem  # pylint: disable=protected-access
_opaque_zero = fwd_lib._opaque_zero  # pylint: disable=protected-access


# Layouts of the fused backward's float32 dQ accumulator (BwdConfig.dq_layout).
DQ_LAYOUTS = ("tnh", "nth", "nct")


@dataclasses.dataclass(frozen=True)
class BwdConfig:
  """Tiling of the two backward kernels.

  Attributes:
    block_q_dkv, block_kv_dkv: query block streamed / keys per consumer
      warpgroup in the dK/dV kernel.
    block_q_dq, block_kv_dq: queries per consumer warpgroup / key block
      streamed in the dQ kernel.
    num_stages: depth of the streamed rings.
    num_compute_wgs: consumer warpgroups per CTA.
    consumer_regs, producer_regs: ``setmaxnreg`` targets.
    fused_dq: compute dQ inside the dK/dV kernel (FA3: 5 matmuls per tile
      pair instead of 7) and TMA-reduce-add it into a float32 accumulator.
      Faster, but the order of the additions varies between runs, so dQ is
      not bitwise deterministic.
    split_head: the dK/dV kernel's two consumers share ``block_kv_dkv`` keys
      and split the head dim of dK/dV (and the query columns of S^T, dP^T),
      exchanging P^T and dS^T through shared memory: H = 256, whose dK and
      dV accumulators do not fit one warpgroup's registers.
    stagger_q: with ``fused_dq``, key tile ``kt`` starts its unmasked
      query blocks at offset ``kt mod (their count)`` (then wraps around),
      so the CTAs of one head, which start together, reduce-add into
      different dQ rows instead of the same ones in lockstep. Opt-in; it
      did not help where the fused form loses (H100, run44, forward +
      backward TFLOP/s, T = 4k full MHA 338.8 against 336.0, T = 1k
      275.6 / 275.4): the cost there is the reduce-add itself, not
      contention on the same rows. The producer rotates its step order;
      the consumers' loop over the unmasked blocks runs shifted by the
      offset and wraps with one select (a per-step remainder, as the
      producer's, spilled more).
      Compiled for an H100 (H = 128, T = 4k, B = 4) it spills nothing
      full (like the fused kernel) and 256 / 320 bytes causal (the fused
      kernel 152 / 184; the per-step remainder 304 / 424); none shows
      wgmma serialisation (scripts/aot/ptxas_report.py --case mosaic).
    dq_layout: with ``fused_dq``, the float32 dQ accumulator's layout in
      global memory: "tnh" ([B, Tp, N, H], the layout of dQ itself: a
      consumer's [block, columns] tile is one 256-byte piece per row, rows
      N * H * 4 bytes apart, and the heads a wave of CTAs walks at once
      sit side by side in every row), "nth" ([B, N, Tp, H]: a head's rows
      contiguous) or "nct" ([B, N, H / C, Tp, C] for a consumer's C
      columns: each reduce-add one contiguous block, as FlashAttention-3's
      accumulator). Converted to [B, Tp, N, H] afterwards (one transpose
      fused with the scale and cast). Measured on an H100 (run46, forward
      + backward TFLOP/s, tnh / nth / nct): T = 4k full MHA 330 / 329 /
      330, T = 1k full MHA 274 / 275 / 275, T = 16k full MHA 546 / 545 /
      545, T = 4k full GQA 4:1 521 / 519 / 514, H = 64 T = 4k full MHA
      284 / 284 / 285; T = 4k causal MHA 352 / 336 / 376. So the layout
      is not why the reduce-add costs where a CTA walks few query blocks
      (run45: 6.2 against 4.2 us a step at T = 4k full MHA, equal at
      16k); "nct" gains under a causal mask only.
    dq_evict_last: with ``fused_dq``, the dQ reduce-adds carry the L2
      cache policy ``evict_last`` (FlashAttention-3 gives its dQ
      reduce-adds, and its Q and dO loads, this hint): the accumulator's
      lines, which every key tile's CTA adds into, are kept in L2 over
      other lines. Mosaic GPU's copies take no hint, so the reduce-add is
      emitted through ``plgpu.inline_mgpu`` (``_dq_reduce``), its
      instruction given the policy; in Pallas' CPU interpreter it is the
      plain reduce-add. Not faster (run50, H100, forward + backward
      TFLOP/s: T = 4k full MHA 369.7 against 369.0, 1k 278.3 / 278.0):
      the reduce-adds do not lose lines kept in L2, they miss lines not yet
      there (see ``dq_prefetch``).
    dq_prefetch: with ``fused_dq``, the producer prefetches into L2
      (``plgpu.async_prefetch``, a TMA prefetch of the whole [block, H]
      tile) the dQ accumulator rows that step ``i + dq_prefetch`` will
      reduce-add into when it loads step ``i``'s Q (None: no prefetch).
      run50 (H100, T = 4k full MHA, forward + backward TFLOP/s): every
      head's dQ reduce-added into an accumulator of 8 heads that stays in
      L2 (timing only, "slots") 501.0 against 369.0, dQ copied instead of
      reduce-added 494.5, so the fused kernel's lost time is its
      reduce-adds reading accumulator lines from DRAM: the zeroed
      accumulator (B N T H float32, 128 MB there) is far larger than L2,
      and a step's reduce-add stalls the TMA unit that then loads the next
      Q (run47: 1.9 us a step waiting for Q). The prefetch brings the
      lines in before the adds. Opt-in.
      run51 (H100, forward + backward TFLOP/s, every key tile's CTA
      prefetching): 0 steps ahead T = 4k full MHA 403.2 against 370.1
      (two kernels 468.5), 4k causal 441.7 / 396.4 (421.5), 1k 271.7 /
      278.2, 8k 512.1 / 520.1, 16k 544.5 / 538.9; 2 and 4 steps ahead
      slower everywhere but 16k (4k full: 307.1, 294.9): the prefetches
      of a head's many CTAs, which walk the same rows, crowd the TMA unit
      (see ``dq_prefetch_every``).
    dq_head_group: with ``fused_dq``, run the dK/dV kernel once per group
      of this many K/V heads (over the flattened batch x K/V heads; the
      largest count that divides them evenly, at most this one), each
      launch reduce-adding into its own float32 accumulator of the group's
      heads only, zeroed just before the launch and converted into dQ
      just after (None: one launch, one accumulator of every head).
      run50 (H100, T = 4k full MHA) found the fused kernel's lost time in
      reduce-adds on an accumulator far larger than L2 (128 MB; 8 heads'
      accumulator, 16 MB, that stays in L2: 501 against 369 TFLOP/s
      forward + backward): a group's accumulator is written by the
      zeroing right before the launch and should be in L2 when the adds
      come. dK and dV are written in place into whole-size buffers; the
      launches are one kernel call in a ``lax.fori_loop`` over the groups
      (the group's first pair is an operand). Needs ``dq_layout="tnh"``.
      Measured (run57-run61, H100, forward+backward TFLOP/s, grouped /
      one launch / two kernels): T = 4k full MHA 511 / 362 / 461, 2k
      full 462 / - / 411, H = 64 4k full 391 / 285 / 331; the default
      without determinism flags for MHA from T = 2k
      (:func:`default_bwd_config`).
    dq_prefetch_every: with ``dq_prefetch``, only key tiles ``kt`` with
      ``kt % dq_prefetch_every == 0`` prefetch (a head's CTAs walk the
      same query blocks at about the same time, so one prefetch of a row
      block could serve all of them). Slower (run52, H100, T = 4k causal
      MHA: 310-315 TFLOP/s with every 8th tile's or tile 0's CTA
      prefetching 0-4 steps ahead, against 394 without a prefetch and 431
      with every CTA's; unexplained).
    ds_buffers: with ``fused_dq``, shared-memory buffers for the
      consumers' dS^T (2: a step writes one while the other consumer's dQ
      product may still read the other; 1: 16 KB less, for a third Q/dO
      stage at H = 128, paid with a second consumer join per step, before
      dS^T is overwritten). Not faster (run48, H100, T = 4k full MHA:
      364.5 with 2 stages, 353.7 with 3, against 364.8 forward+backward
      TFLOP/s; 4k causal 327.8 / 315.4 against 389.3).
    early_release: with ``fused_dq``, a consumer releases the step's Q and
      dO slots as soon as its dQ product has completed (every wgmma that
      reads them is done by then), before it stores dQ and issues the
      reduce-add, so that the producer's next loads reach the TMA unit
      ahead of the reduce rather than behind it (run47, H100, T = 4k full
      MHA: the fused steps wait 1.9 us a step for Q, against 0.14 with dQ
      copied instead of reduce-added). Not faster (run48: 358.5 against
      364.8 at 4k full MHA, 384.6 / 389.3 causal): the wait is not for a
      free slot.
    persistent_dkv: the dK/dV kernel (two-kernel form, H <= 128) as a
      persistent grid: ``num_ctas`` CTAs (0: one per SM) each walk a static
      list of (batch, K/V head, key tile) items, heaviest first and
      balanced as the forward's (:func:`mosaic_gpu.work_schedule`). The
      producer's Q / dO ring runs on across items, so the next item's
      first blocks load while the consumers store this item's dK and dV;
      the consumers then load the next K and V tiles (prefetched into L2
      when the item starts). For short sequences, where a CTA's 7.1 of
      54 us went outside its steps (run84, H = 128, T = 1k full MHA: the
      prologue's first Q, K, V loads 4.0 us, the epilogue 2.1). On an
      H100 (run92, forward+backward TFLOP/s at T = 1k full MHA, H = 128):
      378 -> 407, with ``persistent_dq`` too 465. :func:`default_bwd_config`
      sets it for the two-kernel form but for GQA under a mask (causal
      GQA 4k: 487 -> 452 with both persistent, run94; 480 -> 442 with
      this one alone, run96). The
      split-head kernel (H = 256) takes it too, each consumer then loading
      its own halves of K and V (the default there since run97: 1k full
      MHA 309 -> 360, 16k causal 420 -> 443).
    persistent_dq: the dQ kernel the same way (items: (batch, query head,
      query tile); the K / V ring runs on across them, the next item's Q
      and dO rows prefetched into L2). At T = 1k a dQ CTA (H = 128) walks
      only 8 key blocks. The default for every two-kernel backward, GQA
      under a mask included (run96, H = 128 causal GQA 4:1: 4k 480 -> 491,
      16k 534 -> 541).
    num_ctas: with ``persistent_dkv`` / ``persistent_dq``, the grid size
      (0: the SM count).
    lpt_schedule: with ``persistent_dkv`` / ``persistent_dq``, the items
      are list-scheduled heaviest first over all heads, not head by head
      (:func:`mosaic_gpu.work_schedule`'s ``lpt``): under a causal mask
      with GQA, where a dK/dV CTA has about four heavy items, the
      head-by-head list leaves the longest CTA with 27% more work than
      the bound (T = 4k, 4:1, B = 4), this order 2%, at the cost of fewer
      CTAs sharing a head's tiles in L2 at a time. Opt-in, untimed (the
      persistent dK/dV kernel lost for masked GQA, run94 / run96:
      ``pending.sh lpt``).
  """
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64
  num_stages: int = 2
  num_compute_wgs: int = 2
  consumer_regs: int = 240
  producer_regs: int = 24
  fused_dq: bool = False
  split_head: bool = False
  stagger_q: bool = False
  dq_layout: str = "tnh"
  ds_buffers: int = 2
  early_release: bool = False
  dq_evict_last: bool = False
  dq_prefetch: int | None = None
  dq_prefetch_every: int = 1
  dq_head_group: int | None = None
  persistent_dkv: bool = False
  persistent_dq: bool = False
  num_ctas: int = 0
  lpt_schedule: bool = False

  def __post_init__(self):
    if self.lpt_schedule and not (self.persistent_dkv or self.persistent_dq):
      raise ValueError("lpt_schedule needs persistent_dkv or persistent_dq")
    for name in ("block_q_dkv", "block_kv_dkv", "block_q_dq"):
      if getattr(self, name) % 64:
        raise ValueError(f"{name}={getattr(self, name)} must be a multiple "
                         "of 64")
    if self.block_kv_dq % 32:
      raise ValueError(f"block_kv_dq={self.block_kv_dq} must be a multiple "
                       "of 32")
    if self.num_stages < 2:
      raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
    if self.stagger_q and not self.fused_dq:
      raise ValueError("stagger_q needs fused_dq=True")
    if self.early_release and not self.fused_dq:
      raise ValueError("early_release needs fused_dq=True")
    if self.dq_evict_last and not self.fused_dq:
      raise ValueError("dq_evict_last needs fused_dq=True")
    if self.dq_prefetch is not None:
      if not self.fused_dq:
        raise ValueError("dq_prefetch needs fused_dq=True")
      if self.dq_prefetch < 0:
        raise ValueError(f"dq_prefetch must be >= 0, got {self.dq_prefetch}")
    if self.dq_prefetch_every < 1:
      raise ValueError("dq_prefetch_every must be >= 1, got "
                       f"{self.dq_prefetch_every}")
    if self.dq_head_group is not None:
      if not self.fused_dq:
        raise ValueError("dq_head_group needs fused_dq=True")
      if self.dq_head_group < 1:
        raise ValueError("dq_head_group must be >= 1, got "
                         f"{self.dq_head_group}")
      if self.dq_layout != "tnh":
        raise ValueError("dq_head_group needs dq_layout='tnh', got "
                         f"{self.dq_layout!r}")
    if self.num_ctas < 0:
      raise ValueError(f"num_ctas must be >= 0, got {self.num_ctas}")
    if self.ds_buffers not in (1, 2):
      raise ValueError(f"ds_buffers must be 1 or 2, got {self.ds_buffers}")
    if self.dq_layout not in DQ_LAYOUTS:
      raise ValueError(f"dq_layout={self.dq_layout!r}: want one of "
                       f"{DQ_LAYOUTS}")
    regs = (self.num_compute_wgs * self.consumer_regs
            + self.producer_regs) * 128
    if regs > 65536:
      raise ValueError(f"register budget {regs} > 65536")

  @property
  def tile_kv(self) -> int:
    if self.split_head:
      return self.block_kv_dkv
    return self.block_kv_dkv * self.num_compute_wgs

  @property
  def tile_q(self) -> int:
    return self.block_q_dq * self.num_compute_wgs


def _smem_check(tiles, stages_tiles, stages, itemsize, extra=0):
  rnd = lambda x: -(-x // 1024) * 1024
  total = sum(rnd(x * itemsize) for x in tiles)
  total += stages * sum(rnd(x * itemsize) for x in stages_tiles) + extra
  if total > fwd_lib.SMEM_BYTES:
    raise NotImplementedError(f"backward tiling needs {total} bytes of SMEM")


# Timing diagnostics only (scripts/gpu/mosaic_check.py variants "fusednj",
# "fusednr", "fusednodq"): parts of the fused kernel to leave out, read when
# tracing. "join": the final consumer join (brings back the race it fixes:
# a last-block dQ may read dK for K); "reduce": dQ is copied, not
# reduce-added (wrong dQ); "dq": no dQ at all (no dS through SMEM, no pair
# barrier, no dQ product; dQ stays zero); "slots": every (batch, head)
# reduce-adds its dQ into one of _DQ_SLOTS heads of batch 0 (wrong dQ; the
# same reduce-adds and the same contention between a head's CTAs, but an
# accumulator that stays in L2: does the reduce cost where CTAs are short
# come from dQ lines evicted between a head's CTAs?; dq_layout "tnh" only,
# the other layouts ignore it). Each leaves the results wrong or racy:
# never set outside timing.
_FUSED_DROP: frozenset[str] = frozenset()
_DQ_SLOTS = 8

# Profiling diagnostics only (scripts/gpu/mosaic_profile.py): (events, dir)
# turns on Mosaic GPU's in-kernel profiler for the dK/dV kernel (H <= 128),
# read when tracing: each consumer warpgroup records its named regions
# ("prologue", "step" per query block; inside a step "wait_q" and
# "wait_do" (the producer's stages), "wait_mma" (the step's last wgmma),
# in a fused step "dq", inside it "dq_pair" (the consumers' join on dS) and
# "dq_tma_wait" (the previous dQ reduce reading its buffer);
# "epilogue") and a trace JSON lands in dir after the first run.
_PROFILE: tuple[int, str] | None = None


def _dkv_params():
  """The dK/dV kernel's compiler params (with the profiler when asked)."""
  if _PROFILE is None:
    return plgpu.CompilerParams(approx_math=True)
  space, path = _PROFILE
  return plgpu.CompilerParams(approx_math=True, profile_space=space,
                              profile_dir=path, profile_bounds_check=True)

# The fused backward's shapes (without determinism): at least this many
# query rows per dK/dV CTA (GQA group x T), and masked only from this T,
# launched once (H = 128); MHA from GROUPED_MIN_LEN launched per group of
# heads (BwdConfig.dq_head_group, H <= 128).
FUSED_MIN_ROWS = 8192
GROUPED_MIN_LEN = 2048
# H = 64 GQA: the fused backward in one launch from this many query rows a
# dK/dV CTA (run64, GQA 4:1, 4k: full 389 against 349 TFLOP/s for two
# kernels, causal 357 / 339; 16k: full 424 / 391, causal 407 / 381;
# grouped launches no better). Fewer rows unmeasured.
FUSED_MIN_ROWS_H64 = 16384
# A group's float32 dQ accumulator, at most, in bytes (run57, run58: the
# best group sizes at T = 2k-8k, H = 64 and 128, had 16 MB accumulators,
# whose lines stay in the H100's 50 MB L2 between the zeroing and the
# reduce-adds; 20 keeps T a little over a power of two at 16).
GROUP_ACC_BYTES = 20 << 20
# CTAs a launch counted as a wave (an H100 / H200 has 132 SMs; a launch of
# fewer CTAs leaves SMs idle: run58, T = 1k full MHA, 8 key tiles a head: 4
# heads a launch 143 TFLOP/s, 16 heads 368).
WAVE_CTAS = 128


def _group_want(q_len: int, groups: int, head_dim: int, masked: bool,
                tile_kv: int) -> int:
  """(batch, K/V head) pairs a launch of the grouped fused backward.

  The largest power of two whose dQ accumulator fits
  ``GROUP_ACC_BYTES``, but at least a wave of CTAs a
  launch (two under a mask, whose tiles' work differs: run57, T = 4k
  causal MHA, 4 heads a launch 306 TFLOP/s, 8 heads 444); full attention
  one head a launch where its key tiles fill a wave (run58, T = 16k: 575
  against 543 / 551 / 551 for 2 / 4 / 8).
  """
  tiles = -(-q_len // tile_kv)
  if not masked and tiles >= WAVE_CTAS:
    return 1
  waves = 2 if masked else 1
  fit = max(1, GROUP_ACC_BYTES // (q_len * groups * head_dim * 4))
  return max(1 << (fit.bit_length() - 1), -(-waves * WAVE_CTAS // tiles))


def default_bwd_config(head_dim: int, deterministic: bool = True, *,
                       q_len: int | None = None, groups: int = 1,
                       masked: bool = False) -> BwdConfig:
  """The tiling used when the caller gives none.

  The tilings measured fastest among those that compile without register
  spills for an H100 (scripts/aot/ptxas_report.py --case mosaic): H200,
  B*T = 16k, T = 4k, forward+backward,
  docs/dev/gpu-runs/run25-h200-mosaic-tune-h128.log and
  run26-h200-mosaic-tune-h64.log.

  Args:
    head_dim: H.
    deterministic: keep the two-kernel backward, whose results are bitwise
      repeatable. With False, H <= 128 may take the fused backward
      (``fused_dq``), whose dQ sums land in a varying order (under a
      causal mask it spills 152 / 184 bytes of stores / loads at H = 128,
      48 / 84 at H = 64; full attention on whole tiles none at H = 128,
      16 / 16 at H = 64, for an H100, 2026-12-06). H = 256 splits the head,
      which the fused kernel does not.
    q_len, groups, masked: the problem's T, query heads per K/V head and
      whether a mask (causal, window, ...) skips blocks. Unknown
      ``q_len``: two kernels. Without determinism:

      * MHA (``groups == 1``) from ``T >= GROUPED_MIN_LEN`` (masked at
        H = 128: below ``FUSED_MIN_ROWS``): fused, launched
        per group of heads (``dq_head_group``, :func:`_group_want`).
        Measured on an H100 (run57, run58, B*T = 16k, forward+backward
        TFLOP/s, grouped / two kernels): H = 128 T = 2k full 462 / 411,
        causal 364 / 355; 4k full 511 / 461, causal 444 / 416; 8k full
        544 / 514 (one launch 522); 16k full 575 / 535 (one launch).
        H = 64: 2k full 354 / 317; 4k full 391 / 331, causal 350 / 311;
        8k causal 389 / 348; 16k full 439 / 381, causal 410 / 371
        (run61). At T = 1k two kernels (H = 128 full 381 / 381, causal
        254 / 283; H = 64 296 / 299).
      * H = 64 GQA: fused in one launch from ``FUSED_MIN_ROWS_H64`` query
        rows a dK/dV CTA (run64, 4:1, fused / two kernels: 4k full 389 /
        349, causal 357 / 339; 16k full 424 / 391, causal 407 / 381).
      * Otherwise at H = 128: fused in one launch when each dK/dV CTA
        visits at least ``FUSED_MIN_ROWS`` query rows (``groups *
        q_len``), and under a mask only from ``q_len >=
        FUSED_MIN_ROWS`` (GQA in groups: run58, 4:1, 4k 521 against 519
        in one launch, 2k 488 / 479; not taken). Measured on an H100
        (run43, B*T = 16k, fused / two kernels): T = 4k full GQA 4:1
        501 / 480; but causal GQA 417 / 458 (run58: 409 / 444; grouped
        409), and T = 1k full GQA 326 / 436 (run58: grouped 438 / 446).
        T = 16k causal took the fused form (558 MHA, 515 GQA against
        cuDNN's 543 / 537; run58 grouped 531-542 against 546). At 128
        query blocks a CTA (run50, run51, run55): T = 8k causal MHA 506 /
        471, T = 2k full GQA 4:1 479 / 467.
  """
  # The two kernels on persistent grids; under a mask with GQA the dQ
  # kernel only (H100, forward+backward TFLOP/s, persistent / not,
  # run91-run93: H = 128 T = 1k full MHA 465 / 378, causal 356 / 291,
  # full GQA 479 / 458; H = 64 1k causal MHA 270 / 222 (the 4k tiling),
  # 4k full 396 / 342; H = 128 4k full MHA 516 / 486, 16k 552 / 543;
  # H = 256 (the dQ kernel only) 1k full 308 / 298, causal 260 / 244).
  # Causal GQA 4:1 at H = 128 (run96, dQ kernel / dK/dV kernel / neither
  # persistent): 4k 491 / 442 / 480, 16k 541 / 543 / 534; at H = 256 1k
  # (both / dQ only) 292 / 327. The split-head dK/dV kernel at H = 256
  # (run96, run97, both / dQ only): 1k full MHA 360 / 309, GQA 391 / 384,
  # causal MHA 291 / 255; 4k full 421 / 400, causal 375 / 364; 16k full
  # 436 / 419, causal 443 / 420.
  persist_dkv = not (groups > 1 and masked)
  two = functools.partial(BwdConfig, persistent_dkv=persist_dkv,
                          persistent_dq=True)
  if head_dim > 128:
    # dQ: 32-key blocks keep Q, dO and a 2-stage K/V ring in 227 KB.
    return two(block_kv_dq=32, split_head=True)
  if not deterministic and q_len is not None:
    fused = BwdConfig(fused_dq=True)
    if (groups == 1 and q_len >= GROUPED_MIN_LEN
        and not (masked and q_len >= FUSED_MIN_ROWS and head_dim > 64)):
      return dataclasses.replace(fused, dq_head_group=_group_want(
          q_len, groups, head_dim, masked, fused.tile_kv))
    if head_dim > 64 and (
        q_len >= FUSED_MIN_ROWS
        or (not masked and groups * q_len >= FUSED_MIN_ROWS)):
      return fused
    if head_dim <= 64 and groups > 1 and groups * q_len >= FUSED_MIN_ROWS_H64:
      return fused
  if head_dim > 64:
    # 128-key blocks streamed by the dQ kernel: 441 -> 453 TFLOP/s full,
    # 408 -> 417 causal.
    return two(block_kv_dq=128)
  if q_len is not None and q_len < GROUPED_MIN_LEN:
    # Short sequences also take 128-query dQ tiles (an H100, run64, T = 1k
    # MHA, forward+backward: full 291 -> 314 TFLOP/s, causal 218 -> 225).
    return two(block_q_dkv=128, block_q_dq=128)
  # 128-query blocks streamed by the dK/dV kernel: 318 -> 340 TFLOP/s
  # full, 300 -> 327 causal.
  return two(block_q_dkv=128)


def _pair_barrier():
  """``bar.sync`` of the two consumer warpgroups (named barrier 10)."""
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir import ir  # pylint: disable=g-import-not-at-top

  @plgpu.inline_mgpu()
  def emit(_):
    i32 = ir.IntegerType.get_signless(32)
    mgpu.utils.inline_ptx("bar.sync $0, 256;", mgpu.utils.c(10, i32),
                          has_side_effects=True, convergent=True)

  emit()


_POLICY = "attnjax_l2p"


def _hinted_reduce(asm: str) -> str:
  """Mosaic GPU's TMA reduce-add instruction ``asm`` (inline PTX, jax 0.11)
  with an ``L2::evict_last`` cache policy, created in the same block."""
  head = "@$0 cp.reduce.async.bulk.tensor."
  if (not asm.startswith(head) or ".bulk_group " not in asm
      or not asm.endswith(";") or "cache_hint" in asm):
    raise NotImplementedError(f"unexpected TMA reduce-add form: {asm!r}")
  body = asm[:-1].replace(".bulk_group ", ".bulk_group.L2::cache_hint ", 1)
  return (f"{{ .reg .b64 {_POLICY}; "
          f"createpolicy.fractional.L2::evict_last.b64 {_POLICY}, 1.0; "
          f"{body}, {_POLICY}; }}")


class _HintingLLVM:
  """Stands in for Mosaic GPU's ``launch_context.llvm``: while the calling
  thread emits one of our dQ copies (``_HINT.on``), its TMA reduce-add gets
  the cache policy; everything else, and every other thread (the bench
  lowers kernels in 8 threads at once), passes through unchanged."""

  def __init__(self, real):
    self._real = real

  def __getattr__(self, name):
    return getattr(self._real, name)

  def inline_asm(self, res, operands, asm, constraints, *args, **kw):
    if getattr(_HINT, "on", False) and "cp.reduce.async.bulk" in asm:
      asm = _hinted_reduce(asm)
    return self._real.inline_asm(res, operands, asm, constraints, *args, **kw)


_HINT = threading.local()
_HINT_LOCK = threading.Lock()


def _install_hinting(module):
  """Wraps ``module.llvm`` in a _HintingLLVM once (idempotent, locked): a
  wrapper installed and removed around each copy raced when two threads
  lowered at once (one could restore the other's wrapper, or wrap it
  twice)."""
  with _HINT_LOCK:
    if not isinstance(module.llvm, _HintingLLVM):
      module.llvm = _HintingLLVM(module.llvm)


def _interpreting() -> bool:
  """Whether kernels traced now run in Pallas' GPU interpreter."""
  from jax._src import config  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  return isinstance(config.pallas_tpu_interpret_mode_context_manager.value,
                    params.InterpretGPUParams)


def _dq_reduce(src, acc_ref, index, *, evict_last):
  """TMA reduce-add of a consumer's float32 dQ tile ``src`` (SMEM, tiled
  8 x 32, 128-byte swizzle) into ``acc_ref.at[index]`` (scalar indices and
  two ``pl.ds`` slices). ``evict_last``: with the L2 policy (inline Mosaic
  GPU, the same instruction otherwise; the plain reduce-add in Pallas' CPU
  interpreter, which skips inline Mosaic GPU)."""
  if not evict_last or _interpreting():
    plgpu.copy_smem_to_gmem(src, acc_ref.at[index], reduction_op="add")
    return
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic.gpu import launch_context  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir.dialects import arith  # pylint: disable=g-import-not-at-top
  sizes = [x.size if isinstance(x, pl.Slice) else None for x in index]
  starts = [jnp.asarray(x.start if isinstance(x, pl.Slice) else x, jnp.int32)
            for x in index]
  any_layout = plgpu.Layout.WGMMA  # scalars: the layout is not read

  @plgpu.inline_mgpu(arg_types=(
      plgpu.RefType(transforms=(plgpu.TilingTransform((8, 32)),
                                plgpu.SwizzleTransform(128))),
      plgpu.RefType()) + (any_layout,) * len(starts))
  def emit(ctx, smem, gmem, *idx):
    ix = [arith.index_cast(ir.IndexType.get(), v.registers.flat[0])
          for v in idx]
    gmem_slice = tuple(i if n is None else mgpu.ds(i, n)
                       for i, n in zip(ix, sizes))
    _install_hinting(launch_context)
    _HINT.on = True
    try:
      ctx.async_copy(src_ref=smem, dst_ref=gmem, gmem_slice=gmem_slice,
                     gmem_transform=mgpu.TileTransform((8, 32)),
                     swizzle=128, reduction_op="add", arrive=True)
    finally:
      _HINT.on = False

  emit(src, acc_ref, *starts)


# How the backward kernels form dP - Delta (dS = P * (dP - Delta)), read
# when tracing: "delta" starts dP's wgmma accumulator at -Delta, so the
# matmul yields it (its initial registers cost what zeroing them did: ptxas
# zeroes only the first accumulator of a step for free, by scale-d = 0, and
# that is S's; the dK/dV step at H = 64 645 -> 452 instructions); "zero"
# subtracts Delta after the matmul, one FADD per element. "delta" since
# run77 (2026-12-06, one H100, beside "zero" in one process; mosaic_check
# variant "dpzero" times "zero" now): forward+backward TFLOP/s 549 / 515 at H = 128 16k
# causal GQA 4:1, 444 / 426 at H = 64 16k causal MHA, equal elsewhere
# (H = 128 4k full 531 / 530; 1k full 382 / 386, causal 287 / 288). The
# Mosaic GPU suite passed with it (102/102, run77 and run79); "zero" stays
# tested by test_former_step_forms (CPU interpreter and GPU).
_DP_INIT = "delta"


def _kernel_delta(delta):
  """What the kernels read as delta: -delta when dP's accumulator starts
  there (one negation in XLA instead of one in every step)."""
  return -delta if _DP_INIT == "delta" else delta


# How the fused backward at H < 128 (one consumer computes a step's whole
# dQ, the consumers taking turns) picks the consumer, read when tracing:
# "dynamic" (one branch, its buffer a run-time index; 64 -> 32 register
# selects a step) or "static" (one branch per consumer). "dynamic" since
# run77 (2026-12-06, one H100, the fused backward beside "static" in one
# process; mosaic_check variant "dqstatic" times "static" now): forward+backward
# TFLOP/s 424 / 414 at H = 64 4k full GQA 4:1, 448 / 438 16k causal GQA;
# the Mosaic GPU suite passed with it; "static" stays tested like "zero".
_DQ_TURN = "dynamic"

def _drain(steps, stages, *free_barriers):
  """Producer epilogue: wait for the final release of each used slot."""
  for x in range(stages):
    @pl.when(steps > x)
    def _():
      for bar in free_barriers:
        plgpu.barrier_wait(bar.at[x])


def _masked_loops(ranges, *, lead: bool = False, trail: bool = False):
  """(lead, trail): whether a kernel needs its masked loop before the
  unmasked blocks [a, c) (some range has lo < a) and after them (c < hi),
  from the static ranges; ``lead`` / ``trail`` force one on (key lengths
  move the bounds at run time)."""
  rg = np.asarray(ranges)
  return (lead or bool(np.any(rg[0] < rg[1])),
          trail or bool(np.any(rg[2] < rg[3])))


def _dkv_tables(ranges, nkt):
  """Per-key-tile query ranges plus a longest-first tile order, as one table.

  Rows 0-3: ``lo, a, c, hi`` query-block bounds of each key tile; row 4: the
  tile each CTA takes (most work first, so the tail of the grid is short).
  """
  ranges = np.asarray(ranges, np.int32)
  if ranges.shape != (4, nkt):
    raise ValueError(f"ranges must have shape (4, {nkt}), got {ranges.shape}")
  work = ranges[3] - ranges[0]
  order = np.argsort(-work, kind="stable").astype(np.int32)
  return jnp.asarray(np.concatenate([ranges, order[None]], 0))


def _work_table(ranges, b, n, kh, num_ctas, lpt=False):
  """A persistent backward grid's work: int32 [G, 1 + items, 8], CTA
  ``c``'s row 0 ``(count, 0, ...)``, rows ``1 .. count`` its items ``(b,
  head, tile, lo, a, c, hi, 0)``, heaviest tiles first, each to the CTA
  that frees up first (the forward's :func:`mosaic_gpu.work_schedule`;
  cost: blocks + 2). dK/dV: key tiles of the ``n = kh`` K/V heads; dQ:
  query tiles of the ``n`` query heads; ``lpt``: heaviest first over all
  heads (``BwdConfig.lpt_schedule``)."""
  table, counts = fwd_lib.work_schedule(ranges, b, n, kh,
                                        num_ctas or fwd_lib.num_sms(),
                                        lpt=lpt)
  head = np.zeros((table.shape[0], 1, table.shape[2]), np.int32)
  head[:, 0, 0] = counts
  return jnp.asarray(np.concatenate([head, table], axis=1))


def _dkv_schedule(tab_ref, kvlen_ref, s_limit, tile, groups,
                  stagger: bool = False, head=None, item=None):
  """A dK/dV CTA's work: ``(kt, kvh, b, wg, lo, a, c, hi, kv_limit, nq,
  steps, step_coords)``.

  Key tile ``kt`` (of ``tile`` keys) sees query blocks ``[lo, hi)`` (``[a,
  c)`` of them need no element mask), clipped to the key length; it walks
  them once per query head of its group: ``steps`` steps, step ``i`` at
  ``step_coords(i) = (query head, query block)``. Step ``g * nq + j``
  visits the ``j``-th block of ``[lo, hi)`` in order, except that with
  ``stagger`` the unmasked ones ``[a, c)`` are visited from
  ``a + kt mod (c - a)`` on and wrap around: neighbouring key tiles,
  which run at the same time, visit different blocks at each step, and
  the masked and unmasked steps keep their places, so the consumers'
  three loops stay as they are. ``head``: ``(kvh, b)`` of the CTA (None:
  grid axes "h" and "b"). ``item``: ``(kt, kvh, b, lo, a, c, hi)`` of a
  persistent CTA's work item (then ``tab_ref`` and ``head`` are unused).
  """
  if item is not None:
    kt, kvh, bb, lo, a, c, hi = item
  else:
    kt = tab_ref[4, lax.axis_index("kv")]
    if head is None:
      kvh, bb = lax.axis_index("h"), lax.axis_index("b")
    else:
      kvh, bb = head()
    lo, a, c, hi = (tab_ref[r, kt] for r in range(4))
  wg = lax.axis_index("wg")
  lo, a, c, hi, kv_limit = _dkv_bounds((lo, a, c, hi), kt, kvlen_ref, bb,
                                       s_limit, tile)
  nq = hi - lo

  def step_coords(i):
    if groups == 1:  # no division for MHA: i < nq
      g, qb = 0, lo + i
    else:
      g = lax.div(i, jnp.maximum(nq, 1))
      qb = lo + lax.rem(i, jnp.maximum(nq, 1))
    if stagger:
      # The producer's order (the consumers' loop wraps with a select).
      mid = jnp.maximum(c - a, 1)
      rot = a + lax.rem(qb - a + lax.rem(kt, mid), mid)
      qb = jnp.where((qb >= a) & (qb < c), rot, qb)
    return kvh * groups + g, qb

  return (kt, kvh, bb, wg, lo, a, c, hi, kv_limit, nq, nq * groups,
          step_coords)


def _dkv_walk(persistent, tab_ref, kvlen_ref, s_limit, tile, groups,
              **schedule_kw):
  """A dK/dV CTA's work items as ``walk(fn)``: calls ``fn(sched, base,
  nxt)`` for each in turn (``sched`` from :func:`_dkv_schedule`, ``base``
  the rings' count of earlier steps, threaded through as ``fn``'s
  result, which ``walk`` returns) with ``nxt = (valid, kt, kvh, b)`` of
  the next item on a persistent grid (its table from :func:`_work_table`;
  None with one tile a CTA)."""
  if not persistent:
    sched0 = _dkv_schedule(tab_ref, kvlen_ref, s_limit, tile, groups,
                           **schedule_kw)
    return lambda fn: fn(sched0, 0, None)
  cta = lax.axis_index("c")
  n_items = tab_ref[cta, 0, 0]

  def item_of(j):
    """Item j: its row is (b, K/V head, key tile, lo, a, c, hi); row 0
    holds the count."""
    bb, kvh, kt, *bounds = (tab_ref[cta, j + 1, r] for r in range(7))
    return (kt, kvh, bb, *bounds)

  def walk(fn):
    def item(j, base):
      kt_n, kvh_n, bb_n = item_of(jnp.minimum(j + 1, n_items - 1))[:3]
      sched = _dkv_schedule(None, kvlen_ref, s_limit, tile, groups,
                            item=item_of(j))
      return fn(sched, base, (j + 1 < n_items, kt_n, kvh_n, bb_n))

    return lax.fori_loop(0, n_items, item, jnp.int32(0))

  return walk


def _prefetch_if(valid, *refs):
  """TMA prefetches of the GMEM ``refs`` into L2 where ``valid`` holds (a
  persistent CTA's next work item's resident tiles)."""
  @pl.when(valid)
  def _():
    for ref in refs:
      plgpu.async_prefetch(ref)


def _dkv_bounds(bounds, kt, kvlen_ref, bb, s_limit, tile):
  """``bounds = (lo, a, c, hi)`` of key tile ``kt`` clipped to the key
  length (the last item: that length)."""
  lo, a, c, hi = bounds
  kv_limit = jnp.int32(s_limit)
  if kvlen_ref is not None:
    kv_limit = jnp.minimum(kv_limit, kvlen_ref[bb])
    # Key tiles wholly past the length contribute nothing; in a tile the
    # length cuts through, every query block needs the element mask (the
    # tables' unmasked blocks [a, c) know only the static masks).
    hi = jnp.where(kt * tile >= kv_limit, lo, hi)
    a = jnp.where((kt + 1) * tile > kv_limit, hi, a)
  hi = jnp.maximum(hi, lo)
  a = jnp.clip(a, lo, hi)
  c = jnp.clip(c, a, hi)
  return lo, a, c, hi, kv_limit


def _dkv_producer(step_coords, steps, *, bb, bq, stages, refs, smem, bars,
                  prefetch=None, base=0):
  """The producer warpgroup's loads for one dK/dV work item: streams Q (+
  lse, segment ids) and dO (+ delta) blocks of each step into the
  ``stages``-slot rings (the caller sets the registers and observes the
  last releases, :func:`_drain`).

  ``prefetch``: ``(distance, where, enabled)``: with step ``i``'s loads,
  prefetch into L2 the GMEM ref ``where(head, query block)`` of step ``i +
  distance`` (the first ``distance`` steps' before the loop) where the
  scalar ``enabled`` holds. ``base``: the rings' count of earlier steps (a
  persistent CTA's earlier items; their slots and phases run on).
  """
  q_ref, lse_ref, qseg_ref, do_ref, delta_ref = refs
  q_smem, lse_smem, qseg_smem, do_smem, delta_smem = smem
  q_ready, do_ready, q_free, do_free = bars

  def fetch_ahead(j):
    @pl.when((j < steps) & prefetch[2])
    def _():
      plgpu.async_prefetch(prefetch[1](*step_coords(j)))

  if prefetch is not None:
    for j in range(prefetch[0]):
      fetch_ahead(jnp.int32(j))

  @pl.loop(0, steps)
  def _(i):
    if prefetch is not None:
      fetch_ahead(i + prefetch[0])
    g = base + i
    slot = lax.rem(g, jnp.int32(stages))
    hh, qb = step_coords(i)
    qs = pl.ds(qb * bq, bq)

    @pl.when(g >= stages)
    def _():
      plgpu.barrier_wait(q_free.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[bb, qs, hh], q_smem.at[slot],
                            q_ready.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[bb, hh, qs], lse_smem.at[slot],
                            q_ready.at[slot])
    if qseg_ref is not None:
      plgpu.copy_gmem_to_smem(qseg_ref.at[bb, qs], qseg_smem.at[slot],
                              q_ready.at[slot])

    @pl.when(g >= stages)
    def _():
      plgpu.barrier_wait(do_free.at[slot])

    plgpu.copy_gmem_to_smem(do_ref.at[bb, qs, hh], do_smem.at[slot],
                            do_ready.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[bb, hh, qs],
                            delta_smem.at[slot], do_ready.at[slot])


def flash_backward_dkv(
    q, k, v, do, lse2, delta, *, scale: float, ranges: np.ndarray,
    predicate: Callable | None = None, kv_len_static: int | None = None,
    soft_cap: float | None = None, q_segment_ids=None, kv_segment_ids=None,
    kv_lengths=None, config: BwdConfig | None = None):
  """dK and dV on whole tiles.

  Args:
    q, do: [B, Tp, N, H] / [B, Tp, N, Hv]; k, v: [B, Sp, K, H|Hv].
    lse2: float32 [B, N, Tp], log-sum-exp in base 2 (``+inf`` for rows
      with nothing visible).
    delta: float32 [B, N, Tp], ``rowsum(dO * O) - dlse``.
    scale: logit scale.
    ranges: int32 [4, Sp / tile_kv]: per key tile the query blocks (of
      ``block_q_dkv``) to visit, from ``kv_block_ranges`` of the transposed
      tile kinds.
    predicate, kv_len_static, soft_cap, q_segment_ids, kv_segment_ids,
    kv_lengths: as in the forward.
    config: tiling.

  Returns:
    ``(dk, dv)`` in k's dtype ([B, Sp, K, H], [B, Sp, K, Hv]); with
    ``config.fused_dq`` also dQ ([B, Tp, N, H], q's dtype, scaled).
  """
  b, tp, n, h = q.shape
  _, sp, kh, hv = v.shape
  dtype = q.dtype
  if h not in SUPPORTED_HEAD_DIMS or hv != h:
    raise NotImplementedError(f"backward head dims H={h}, Hv={hv}")
  cfg = config or default_bwd_config(h)
  if cfg.split_head:
    if cfg.fused_dq:
      raise NotImplementedError("fused dQ with split_head")
    return _backward_dkv_split(
        q, k, v, do, lse2, delta, scale=scale, ranges=ranges,
        predicate=predicate, kv_len_static=kv_len_static, soft_cap=soft_cap,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        kv_lengths=kv_lengths, cfg=cfg)
  if h > 128:
    raise NotImplementedError(f"H={h} needs BwdConfig(split_head=True)")
  bq, bk, stages, wgs = (cfg.block_q_dkv, cfg.block_kv_dkv, cfg.num_stages,
                         cfg.num_compute_wgs)
  tk = cfg.tile_kv
  if tp % bq or sp % tk:
    raise ValueError(f"Tp={tp}, Sp={sp} must be multiples of {bq}, {tk}")
  nkt = sp // tk
  fused = cfg.fused_dq
  # Fused dQ: both consumers' dS^T go through SMEM (double-buffered); each
  # consumer computes dq_cols columns of dQ for the block (H >= 128: half
  # each; H = 64: the whole block, consumers alternating by step).
  dq_cols = h // 2 if h >= 128 else h
  alternate = h < 128
  if fused and wgs != 2:
    raise NotImplementedError("fused dQ needs 2 consumer warpgroups")
  nds = cfg.ds_buffers
  fused_extra = (nds * wgs * bk * bq * 2 + wgs * bq * dq_cols * 4) if fused else 0
  _smem_check([wgs * bk * h, wgs * bk * hv], [bq * h, bq * hv], stages,
              jnp.dtype(dtype).itemsize,
              extra=stages * 3 * 1024 + 1024 + fused_extra)
  persistent = cfg.persistent_dkv
  if persistent and fused:
    raise NotImplementedError("persistent_dkv with fused_dq")
  tables = (_work_table(ranges, b, kh, kh, cfg.num_ctas,
                          cfg.lpt_schedule) if persistent
            else _dkv_tables(ranges, nkt))
  # The masked loops before and after a key tile's unmasked query blocks
  # are compiled only where some tile has such blocks (fewer spills: none
  # for full attention on whole tiles, no trailing loop under a causal
  # mask); a key length cutting a tile masks all of it (_dkv_bounds).
  lead, trail = _masked_loops(ranges, lead=kv_lengths is not None)
  groups = n // kh
  segments = q_segment_ids is not None
  s_limit = sp if kv_len_static is None else int(kv_len_static)
  mult = (soft_cap if soft_cap is not None else scale) * LOG2E

  # dq_head_group: launches over groups of `hg` of the B * K (batch, K/V
  # head) pairs, grid axis "g" the pair within the group.
  hg = _head_group(cfg.dq_head_group, b, kh) if fused else None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref,
             qseg_ref, kvseg_ref, kvlen_ref, g0_ref, dqacc_ref, dk_ref,
             dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
             qseg_smem, ds_smem, dq_smem, kv_bar, q_ready, do_ready, q_free,
             do_free):
    wg = lax.axis_index("wg")
    head = None
    if hg is not None:
      def head():
        pair = g0_ref[0] + lax.axis_index("g")
        return lax.rem(pair, kh), lax.div(pair, kh)
    walk = _dkv_walk(persistent, tab_ref, kvlen_ref, s_limit, tk, groups,
                     **({} if persistent else dict(stagger=cfg.stagger_q,
                                                   head=head)))

    def dq_index(bb, kvh, hh, qb, col0, cols):
      """The dQ accumulator's index of head hh, query block qb, columns
      [col0, col0 + cols) (in the "nct" layout a multiple of dq_cols: one
      column block, dq_cols, is a scalar index)."""
      rows = pl.ds(qb * bq, bq)
      if hg is not None:
        # The group's accumulator [hg, Tp, groups, H].
        return (lax.axis_index("g"), rows, hh - kvh * groups,
                pl.ds(col0, cols))
      if "slots" in _FUSED_DROP and cfg.dq_layout == "tnh":
        # Timing only (wrong dQ): every (batch, head) reduce-adds into
        # one of _DQ_SLOTS heads of batch 0, so the accumulator the
        # kernel touches stays small enough to live in L2.
        slot = lax.rem(bb * n + hh, jnp.int32(min(_DQ_SLOTS, n)))
        return (0, rows, slot, pl.ds(col0, cols))
      if cfg.dq_layout == "tnh":
        return (bb, rows, hh, pl.ds(col0, cols))
      if cfg.dq_layout == "nth":
        return (bb, hh, rows, pl.ds(col0, cols))
      blk = col0 // dq_cols
      if cols != dq_cols:
        blk = pl.ds(blk, cols // dq_cols)
      return (bb, hh, blk, rows, pl.ds(0, dq_cols))

    @pl.when(wg == wgs)
    def _producer():
      def produce(sched, base, _):
        kt, kvh, bb, _, _, _, _, _, _, _, steps, step_coords = sched
        prefetch = None
        if fused and cfg.dq_prefetch is not None:
          prefetch = (cfg.dq_prefetch,
                      lambda hh, qb: dqacc_ref.at[dq_index(bb, kvh, hh, qb,
                                                           0, h)],
                      lax.rem(kt, cfg.dq_prefetch_every) == 0)
        _dkv_producer(
            step_coords, steps, bb=bb, bq=bq, stages=stages,
            refs=(q_ref, lse_ref, qseg_ref if segments else None, do_ref,
                  delta_ref),
            smem=(q_smem, lse_smem, qseg_smem, do_smem, delta_smem),
            bars=(q_ready, do_ready, q_free, do_free), prefetch=prefetch,
            base=base)
        return base + steps

      # On a persistent grid one ring over all the items: the next item's
      # first blocks load while the consumers finish this one. Then observe
      # the last release of every slot (no barrier phase completes
      # unobserved; harmless on the GPU, checked by the interpreter).
      plgpu.set_max_registers(cfg.producer_regs, action="decrease")
      _drain(walk(produce), stages, q_free, do_free)

    def consume(sched, base, nxt=None):
      """This consumer's share of one work item (steps ``base`` on in the
      rings); ``nxt``: ``(valid, kt, kvh, b)`` of the next item, whose K
      and V tiles are prefetched into L2. Returns the next item's base."""
      (kt, kvh, bb, _, lo, a, c, hi, kv_limit, nq, steps,
       step_coords) = sched
      k_base = kt * tk + wg * bk
      ks = pl.ds(k_base, bk)
      k_w, v_w = k_smem.at[wg], v_smem.at[wg]
      with jax.named_scope("prologue"):
        plgpu.copy_gmem_to_smem(k_ref.at[bb, ks, kvh], k_w, kv_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[bb, ks, kvh], v_w, kv_bar.at[wg])
        if segments:
          kvseg = plgpu.load(kvseg_ref.at[bb, ks], layout=_ROW,
                             optimized=False)
        plgpu.barrier_wait(kv_bar.at[wg])
      if nxt is not None:
        ks_n = pl.ds(nxt[1] * tk + wg * bk, bk)
        _prefetch_if(nxt[0], k_ref.at[nxt[3], ks_n, nxt[2]],
                     v_ref.at[nxt[3], ks_n, nxt[2]])
      col = lambda x: lax.broadcast_in_dim(x, (bk, bq), [1])

      def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (bk, bq), dim, layout=_WGMMA)

      def body(i, qb, masked, dk_acc, dv_acc):
        slot = lax.rem(base + i, jnp.int32(stages))
        # K/V descriptors formed in the loop, not hoisted (see _opaque_zero).
        z = _opaque_zero(i, steps)
        k_w, v_w = k_smem.at[wg + z], v_smem.at[wg + z]
        with jax.named_scope("wait_q"):
          plgpu.barrier_wait(q_ready.at[slot])

        def s_scope(acc):
          plgpu.wgmma(acc, k_w, q_smem.at[slot].T)
          return acc[...]

        st = pl.run_scoped(s_scope, plgpu.ACC((bk, bq), jnp.float32))
        lse = plgpu.load(lse_smem.at[slot], layout=_COL)
        if soft_cap is not None:
          st = jnp.tanh(st * (scale / soft_cap))
        pt = jnp.exp2(st * mult - col(lse))
        if masked:
          ki = k_base + iota(0)
          qi = qb * bq + iota(1)
          vis = ki < kv_limit
          if predicate is not None:
            vis = vis & predicate(qi, ki)
          if segments:
            qseg = plgpu.load(qseg_smem.at[slot], layout=_COL)
            vis = vis & (lax.broadcast_in_dim(kvseg, (bk, bq), [0])
                         == col(qseg))
          pt = jnp.where(vis, pt, 0.0)
        with jax.named_scope("wait_do"):
          plgpu.barrier_wait(do_ready.at[slot])
        dlt = plgpu.load(delta_smem.at[slot], layout=_COL)

        def dp_scope(acc):
          # The accumulator starts at -Delta (what delta_ref holds then),
          # so the matmul yields dP^T - Delta (see _DP_INIT).
          if _DP_INIT == "delta":
            acc[...] = col(dlt)
          plgpu.wgmma(acc, v_w, do_smem.at[slot].T)
          plgpu.wgmma(dv_acc, pt.astype(dtype), do_smem.at[slot])
          return plgpu.wgmma_accumulator_load(acc, wait_n=1)

        dpt = pl.run_scoped(dp_scope, plgpu.ACC((bk, bq), jnp.float32))
        dst = pt * (dpt if _DP_INIT == "delta" else dpt - col(dlt))
        if soft_cap is not None:
          dst = dst * (1.0 - st * st)
        dst16 = dst.astype(dtype)
        plgpu.wgmma(dk_acc, dst16, q_smem.at[slot])
        early = fused and cfg.early_release and "dq" not in _FUSED_DROP

        def release():
          plgpu.barrier_arrive(q_free.at[slot])
          plgpu.barrier_arrive(do_free.at[slot])

        if fused and "dq" not in _FUSED_DROP:
          with jax.named_scope("dq"):
            fused_dq(i, qb, dst16, release if early else None)
        with jax.named_scope("wait_mma"):
          plgpu.wgmma_wait(0)
        if not early:
          release()
        elif alternate:
          # The consumer whose turn it was not released nothing yet.
          pl.when(lax.rem(i, 2) != wg)(release)

      def fused_dq(i, qb, dst16, release):
        """dQ[qb] += dS K for this CTA's keys (FA3's in-kernel dQ)."""
        if nds == 1:
          # One dS^T buffer: both consumers' dQ products of the previous
          # step (each waited for its own) must be done reading it.
          buf = 0
          with jax.named_scope("dq_pair"):
            _pair_barrier()
        else:
          buf = lax.rem(i, 2)
        ds_smem.at[buf, wg][...] = dst16
        # Generic-proxy stores, then wgmma reads: fence, and wait for the
        # other consumer's half of dS.
        plgpu.commit_smem()
        with jax.named_scope("dq_pair"):
          _pair_barrier()
        hh = kvh if groups == 1 else (
            kvh * groups + lax.div(i, jnp.maximum(nq, 1)))

        def emit(w):
          col0 = 0 if alternate else w * dq_cols

          def scope(acc):
            for u in range(wgs):
              b_op = k_smem.at[u]
              if dq_cols != h:
                b_op = b_op.at[:, pl.ds(col0, dq_cols)]
              plgpu.wgmma(acc, ds_smem.at[buf, u].T, b_op)
            return acc[...]

          dq = pl.run_scoped(scope, plgpu.ACC((bq, dq_cols), jnp.float32))
          if release is not None:
            # Reading the product waited for all of this consumer's wgmma
            # (dK's and dV's, which read Q and dO): free the slots now.
            release()
          # The previous reduce from this buffer must have read it.
          with jax.named_scope("dq_tma_wait"):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          dq_smem.at[w][...] = dq
          plgpu.commit_smem()
          index = dq_index(bb, kvh, hh, qb, col0, dq_cols)
          if "reduce" in _FUSED_DROP:
            plgpu.copy_smem_to_gmem(dq_smem.at[w], dqacc_ref.at[index])
          else:
            _dq_reduce(dq_smem.at[w], dqacc_ref, index,
                       evict_last=cfg.dq_evict_last)

        if alternate and _DQ_TURN == "dynamic":
          # One branch with the emitting consumer's buffer as a run-time
          # index: the two static branches left ptxas a permutation of the
          # dQ accumulator's registers to undo at their join (64 FSEL a
          # step at H = 64).
          w_turn = lax.rem(i, 2)
          pl.when(wg == w_turn)(functools.partial(emit, w_turn))
        else:
          for w in range(wgs):
            turn = (wg == w) & (lax.rem(i, 2) == w) if alternate else wg == w
            pl.when(turn)(functools.partial(emit, w))

      def all_steps(dk_acc, dv_acc):
        # Step i = g * nq + (qb - lo) visits query block qb of head g; it is
        # masked unless qb lies in [a, c).
        def head(g, _):
          def run(i, qb, masked):
            with jax.named_scope("step"):
              body(g * nq + i - lo, qb, masked, dk_acc, dv_acc)
            return ()

          if lead:
            lax.fori_loop(lo, a, lambda qb, _: run(qb, qb, True), ())
          if cfg.stagger_q:
            # Step a + j - lo visits block a + (j + off) mod (c - a): the
            # loop runs x = a + j + off over [a + off, c + off) and wraps
            # it with one select (a per-step remainder spilled more).
            mid = c - a
            off = lax.rem(kt, jnp.maximum(mid, 1))
            lax.fori_loop(a + off, c + off, lambda x, _: run(
                x - off, jnp.where(x >= c, x - mid, x), False), ())
          else:
            lax.fori_loop(a, c, lambda qb, _: run(qb, qb, False), ())
          if trail:
            lax.fori_loop(c, hi, lambda qb, _: run(qb, qb, True), ())
          return ()

        lax.fori_loop(0, groups, head, ())
        return dk_acc[...], dv_acc[...]

      dk, dv = pl.run_scoped(all_steps, plgpu.ACC((bk, h), jnp.float32),
                             plgpu.ACC((bk, hv), jnp.float32))
      with jax.named_scope("epilogue"):
        if fused and "join" not in _FUSED_DROP:
          # The other consumer's last dQ product may still read this
          # consumer's K tile: wait for it before dK overwrites K here.
          _pair_barrier()
        k_w[...] = (dk * scale).astype(dtype)
        v_w[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_w, dk_ref.at[bb, ks, kvh],
                                commit_group=False)
        plgpu.copy_smem_to_gmem(v_w, dv_ref.at[bb, ks, kvh],
                                commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return base + steps

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_regs, action="increase")
      walk(consume)

  q_arrivals = 2 + (1 if segments else 0)
  scratch = [
      _tiled_smem((wgs, bk, h), dtype),
      _tiled_smem((wgs, bk, hv), dtype),
      _tiled_smem((stages, bq, h), dtype),
      _tiled_smem((stages, bq, hv), dtype),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.int32) if segments else None,
      _tiled_smem((nds, wgs, bk, bq), dtype) if fused else None,
      plgpu.SMEM((wgs, bq, dq_cols), jnp.float32, transforms=(
          plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
      if fused else None,
      plgpu.Barrier(num_arrivals=2, num_barriers=wgs),
      plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  ]
  if hg is not None:
    return _grouped_launches(
        kernel, scratch, (q, k, v, do, lse2, _kernel_delta(delta), tables,
                          q_segment_ids, kv_segment_ids, kv_lengths),
        hg=hg, nkt=nkt, threads=wgs + 1, scale=scale)
  acc_shape = {"tnh": (b, tp, n, h), "nth": (b, n, tp, h),
               "nct": (b, n, h // dq_cols, tp, dq_cols)}[cfg.dq_layout]
  dq_acc = jax.new_ref(jnp.zeros(acc_shape, jnp.float32)) if fused else None
  grid, grid_names = (nkt, kh, b), ("kv", "h", "b")
  if persistent:
    grid, grid_names = (tables.shape[0],), ("c",)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype),
                jax.ShapeDtypeStruct(v.shape, dtype)),
      scratch_types=scratch,
      grid=grid,
      grid_names=grid_names,
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=_dkv_params(),
  )
  dk, dv = call(q, k, v, do, lse2, _kernel_delta(delta), tables,
                q_segment_ids, kv_segment_ids, kv_lengths, None, dq_acc)
  if fused:
    acc = dq_acc[...]
    if cfg.dq_layout == "nth":
      acc = acc.transpose(0, 2, 1, 3)
    elif cfg.dq_layout == "nct":
      acc = acc.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)
    return dk, dv, (acc * scale).astype(dtype)
  return dk, dv


def _head_group(want: int | None, b: int, kh: int) -> int | None:
  """(batch, K/V head) pairs per launch for ``BwdConfig.dq_head_group``:
  the largest count <= ``want`` that is a divisor of K (a group within one
  batch entry) or K times a divisor of B (whole batch entries)."""
  if want is None:
    return None
  if want < kh:
    return max(d for d in range(1, want + 1) if kh % d == 0)
  return kh * max(d for d in range(1, want // kh + 1) if b % d == 0)


def _grouped_launches(kernel, scratch, args, *, hg, nkt, threads, scale):
  """The fused dK/dV/dQ kernel launched once per group of ``hg`` (batch,
  K/V head) pairs (``BwdConfig.dq_head_group``): each launch reduce-adds
  dQ into a float32 accumulator [hg, Tp, N / K, H] zeroed just before it,
  converted into dQ just after; dK and dV are written in place."""
  q, k, v = args[:3]
  b, tp, n, h = q.shape
  kh = k.shape[2]
  groups = n // kh
  dtype = q.dtype
  dq = jax.new_ref(jnp.zeros(q.shape, dtype))
  dk = jax.new_ref(jnp.zeros(k.shape, dtype))
  dv = jax.new_ref(jnp.zeros(v.shape, dtype))
  acc = jax.new_ref(jnp.zeros((hg, tp, groups, h), jnp.float32))
  call = plgpu.kernel(
      kernel,
      out_type=(),
      scratch_types=scratch,
      grid=(nkt, hg),
      grid_names=("kv", "g"),
      num_threads=threads,
      thread_name="wg",
      compiler_params=_dkv_params(),
  )
  shape = acc.shape

  # One loop iteration a group (a Python loop let XLA zero every group's
  # accumulator up front and convert them all at the end, each its own
  # buffer: 8 x 16 MB live at T = 4k, not in L2). In the loop body the
  # zeroing, the launch and the conversion run in that order, per group.
  def group(i, carry):
    g0 = i * hg
    acc[...] = jnp.zeros(shape, jnp.float32)
    call(*args, jnp.reshape(g0, (1,)), acc, dk, dv)
    part = (acc[...] * scale).astype(dtype)
    if hg <= kh:  # K/V heads [g0 % K, + hg) of batch entry g0 // K
      part = part.transpose(1, 0, 2, 3).reshape(1, tp, hg * groups, h)
      at = (lax.div(g0, kh), 0, lax.rem(g0, kh) * groups, 0)
    else:  # whole batch entries [g0 // K, + hg / K)
      m = hg // kh
      part = part.reshape(m, kh, tp, groups, h).transpose(
          0, 2, 1, 3, 4).reshape(m, tp, n, h)
      at = (lax.div(g0, kh), 0, 0, 0)
    dq[...] = lax.dynamic_update_slice(dq[...], part, at)
    return carry

  lax.fori_loop(0, b * kh // hg, group, 0)
  return dk[...], dv[...], dq[...]


def _backward_dkv_split(q, k, v, do, lse2, delta, *, scale, ranges, predicate,
                        kv_len_static, soft_cap, q_segment_ids, kv_segment_ids,
                        kv_lengths, cfg):
  """dK/dV with the head dim split across the two consumers (H = 256).

  A CTA owns ``bk`` keys (K and V resident). For each streamed query block
  of ``bq`` rows, consumer ``w`` computes ``S^T`` and ``dP^T`` for its half
  of the block's queries (``bq / 2`` columns, full head-dim contraction),
  then ``P^T`` and ``dS^T`` of those columns; both halves go to shared
  memory, a named barrier joins the consumers, and each accumulates
  ``dV[:, w] += P^T dO[:, w]`` and ``dK[:, w] += dS^T Q[:, w]`` over its
  half of the head dim. All operands use the 64-byte swizzle (the exchanged
  tiles are ``bq / 2 = 32`` queries wide).
  """
  b, tp, n, h = q.shape
  _, sp, kh, hv = v.shape
  dtype = q.dtype
  bq, bk, stages, wgs = (cfg.block_q_dkv, cfg.block_kv_dkv, cfg.num_stages,
                         cfg.num_compute_wgs)
  if wgs != 2:
    raise NotImplementedError("split_head needs 2 consumer warpgroups")
  if tp % bq or sp % bk:
    raise ValueError(f"Tp={tp}, Sp={sp} must be multiples of {bq}, {bk}")
  qh, hc, hvc = bq // 2, h // 2, hv // 2
  itemsize = jnp.dtype(dtype).itemsize
  swz = 64
  _smem_check([bk * h, bk * hv, 2 * bk * qh, 2 * bk * qh],
              [bq * h, bq * hv], stages, itemsize,
              extra=stages * 3 * 1024 + 1024)
  nkt = sp // bk
  persistent = cfg.persistent_dkv
  tables = (_work_table(ranges, b, kh, kh, cfg.num_ctas,
                          cfg.lpt_schedule) if persistent
            else _dkv_tables(ranges, nkt))
  groups = n // kh
  segments = q_segment_ids is not None
  s_limit = sp if kv_len_static is None else int(kv_len_static)
  mult = (soft_cap if soft_cap is not None else scale) * LOG2E
  lead, trail = _masked_loops(ranges, lead=kv_lengths is not None)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref,
             qseg_ref, kvseg_ref, kvlen_ref, dk_ref, dv_ref, k_smem, v_smem,
             q_smem, do_smem, lse_smem, delta_smem, qseg_smem, pt_smem,
             ds_smem, kv_bar, q_ready, do_ready, q_free, do_free, pair):
    wg = lax.axis_index("wg")
    walk = _dkv_walk(persistent, tab_ref, kvlen_ref, s_limit, bk, groups)

    def produce(sched, base, _):
      bb, steps, step_coords = sched[2], sched[10], sched[11]
      _dkv_producer(
          step_coords, steps, bb=bb, bq=bq, stages=stages,
          refs=(q_ref, lse_ref, qseg_ref if segments else None, do_ref,
                delta_ref),
          smem=(q_smem, lse_smem, qseg_smem, do_smem, delta_smem),
          bars=(q_ready, do_ready, q_free, do_free), base=base)
      return base + steps

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(cfg.producer_regs, action="decrease")
      _drain(walk(produce), stages, q_free, do_free)

    def consume(sched, base, nxt=None):
      """One item (steps ``base`` on in the rings); ``nxt``: ``(valid, kt,
      kvh, b)`` of the next one, whose K / V halves are prefetched into
      L2. Returns the next item's base."""
      (kt, kvh, bb, _, lo, a, c, hi, kv_limit, nq, steps,
       step_coords) = sched
      k_base = kt * bk
      ks = pl.ds(k_base, bk)

      # K and V are kept as two column halves each, so that each consumer
      # can later stage its half of dK/dV in them for a contiguous TMA
      # store. On a persistent grid each consumer loads its own halves
      # (its store of the previous item's results from them is complete),
      # both waiting for all four; one CTA a tile: consumer 0 loads all.
      if persistent:
        plgpu.copy_gmem_to_smem(k_ref.at[bb, ks, kvh, pl.ds(wg * hc, hc)],
                                k_smem.at[wg], kv_bar.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[bb, ks, kvh, pl.ds(wg * hvc, hvc)],
                                v_smem.at[wg], kv_bar.at[0])
      else:
        @pl.when(wg == 0)
        def _():
          for u in range(wgs):
            plgpu.copy_gmem_to_smem(
                k_ref.at[bb, ks, kvh, pl.ds(u * hc, hc)], k_smem.at[u],
                kv_bar.at[0])
            plgpu.copy_gmem_to_smem(
                v_ref.at[bb, ks, kvh, pl.ds(u * hvc, hvc)], v_smem.at[u],
                kv_bar.at[0])

      if segments:
        kvseg = plgpu.load(kvseg_ref.at[bb, ks], layout=_ROW,
                           optimized=False)
      plgpu.barrier_wait(kv_bar.at[0])
      if nxt is not None:
        ks_n = pl.ds(nxt[1] * bk, bk)
        _prefetch_if(nxt[0],
                     k_ref.at[nxt[3], ks_n, nxt[2], pl.ds(wg * hc, hc)],
                     v_ref.at[nxt[3], ks_n, nxt[2], pl.ds(wg * hvc, hvc)])
      q_cols = pl.ds(wg * qh, qh)
      h_cols = pl.ds(wg * hc, hc)
      hv_cols = pl.ds(wg * hvc, hvc)
      col = lambda x: lax.broadcast_in_dim(x, (bk, qh), [1])

      def join():
        # Both consumers meet (an mbarrier, so the interpreter checks it).
        plgpu.barrier_arrive(pair)
        plgpu.barrier_wait(pair)

      def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (bk, qh), dim, layout=_WGMMA)

      def body(i, masked, dk_acc, dv_acc):
        slot = lax.rem(base + i, jnp.int32(stages))
        _, qb = step_coords(i)
        # K/V descriptors formed in the loop, not hoisted (_opaque_zero).
        z = _opaque_zero(i, steps) * wgs
        plgpu.barrier_wait(q_ready.at[slot])

        def s_scope(acc):
          for u in range(wgs):
            plgpu.wgmma(acc, k_smem.at[u + z],
                        q_smem.at[slot].at[q_cols, pl.ds(u * hc, hc)].T)
          return acc[...]

        st = pl.run_scoped(s_scope, plgpu.ACC((bk, qh), jnp.float32))
        lse = plgpu.load(lse_smem.at[slot].at[q_cols], layout=_COL)
        if soft_cap is not None:
          st = jnp.tanh(st * (scale / soft_cap))
        pt = jnp.exp2(st * mult - col(lse))
        if masked:
          ki = k_base + iota(0)
          qi = qb * bq + wg * qh + iota(1)
          vis = ki < kv_limit
          if predicate is not None:
            vis = vis & predicate(qi, ki)
          if segments:
            qseg = plgpu.load(qseg_smem.at[slot].at[q_cols], layout=_COL)
            vis = vis & (lax.broadcast_in_dim(kvseg, (bk, qh), [0])
                         == col(qseg))
          pt = jnp.where(vis, pt, 0.0)
        plgpu.barrier_wait(do_ready.at[slot])
        dlt = plgpu.load(delta_smem.at[slot].at[q_cols], layout=_COL)

        def dp_scope(acc):
          if _DP_INIT == "delta":  # dP^T - Delta out of the matmul
            acc[...] = col(dlt)
          for u in range(wgs):
            plgpu.wgmma(acc, v_smem.at[u + z],
                        do_smem.at[slot].at[q_cols, pl.ds(u * hvc, hvc)].T)
          return acc[...]

        dpt = pl.run_scoped(dp_scope, plgpu.ACC((bk, qh), jnp.float32))
        dst = pt * (dpt if _DP_INIT == "delta" else dpt - col(dlt))
        if soft_cap is not None:
          dst = dst * (1.0 - st * st)
        pt_smem.at[wg][...] = pt.astype(dtype)
        ds_smem.at[wg][...] = dst.astype(dtype)
        # Generic-proxy stores, then wgmma reads of both consumers' halves.
        plgpu.commit_smem()
        join()
        for u in range(wgs):
          rows = pl.ds(u * qh, qh)
          plgpu.wgmma(dv_acc, pt_smem.at[u],
                      do_smem.at[slot].at[rows, hv_cols])
          plgpu.wgmma(dk_acc, ds_smem.at[u], q_smem.at[slot].at[rows, h_cols])
        plgpu.wgmma_wait(0)
        # Both consumers have read P^T and dS^T before either overwrites them.
        join()
        plgpu.barrier_arrive(q_free.at[slot])
        plgpu.barrier_arrive(do_free.at[slot])

      def all_steps(dk_acc, dv_acc):
        def head(g, _):
          def run(qb, masked):
            body(g * nq + qb - lo, masked, dk_acc, dv_acc)
            return ()

          if lead:
            lax.fori_loop(lo, a, lambda qb, _: run(qb, True), ())
          lax.fori_loop(a, c, lambda qb, _: run(qb, False), ())
          if trail:
            lax.fori_loop(c, hi, lambda qb, _: run(qb, True), ())
          return ()

        lax.fori_loop(0, groups, head, ())
        return dk_acc[...], dv_acc[...]

      dk, dv = pl.run_scoped(all_steps, plgpu.ACC((bk, hc), jnp.float32),
                             plgpu.ACC((bk, hvc), jnp.float32))
      # The last step's second join follows both consumers' final wgmma
      # wait, so neither reads K or V any more: each stages its half of dK
      # and dV in them (with no step at all, nothing ever read them).
      k_smem.at[wg][...] = (dk * scale).astype(dtype)
      v_smem.at[wg][...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[bb, ks, kvh, h_cols],
                              commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[bb, ks, kvh, hv_cols],
                              commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return base + steps

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_regs, action="increase")
      walk(consume)

  q_arrivals = 2 + (1 if segments else 0)
  scratch = [
      _tiled_smem((wgs, bk, hc), dtype, swz),
      _tiled_smem((wgs, bk, hvc), dtype, swz),
      _tiled_smem((stages, bq, h), dtype, swz),
      _tiled_smem((stages, bq, hv), dtype, swz),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.float32),
      plgpu.SMEM((stages, bq), jnp.int32) if segments else None,
      _tiled_smem((wgs, bk, qh), dtype, swz),
      _tiled_smem((wgs, bk, qh), dtype, swz),
      plgpu.Barrier(num_arrivals=2 * wgs, num_barriers=1),
      plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs),
  ]
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype),
                jax.ShapeDtypeStruct(v.shape, dtype)),
      scratch_types=scratch,
      grid=(tables.shape[0],) if persistent else (nkt, kh, b),
      grid_names=("c",) if persistent else ("kv", "h", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )
  return call(q, k, v, do, lse2, _kernel_delta(delta), tables,
              q_segment_ids, kv_segment_ids, kv_lengths)

def flash_backward_dq(
    q, k, v, do, lse2, delta, *, scale: float, ranges: np.ndarray,
    predicate: Callable | None = None, kv_len_static: int | None = None,
    soft_cap: float | None = None, q_segment_ids=None, kv_segment_ids=None,
    kv_lengths=None, config: BwdConfig | None = None):
  """dQ on whole tiles (arguments as :func:`flash_backward_dkv`).

  ``ranges`` is int32 [4, Tp / tile_q]: per query tile (``num_compute_wgs *
  block_q_dq`` rows) the key blocks of ``block_kv_dq`` to visit.

  Returns:
    dq [B, Tp, N, H] in q's dtype.
  """
  b, tp, n, h = q.shape
  _, sp, kh, hv = v.shape
  dtype = q.dtype
  if h not in SUPPORTED_HEAD_DIMS or hv != h:
    raise NotImplementedError(f"backward head dims H={h}, Hv={hv}")
  cfg = config or default_bwd_config(h)
  bq, bk, stages, wgs = (cfg.block_q_dq, cfg.block_kv_dq, cfg.num_stages,
                         cfg.num_compute_wgs)
  tq = cfg.tile_q
  if tp % tq or sp % bk:
    raise ValueError(f"Tp={tp}, Sp={sp} must be multiples of {tq}, {bk}")
  nqt = tp // tq
  _smem_check([wgs * bq * h, wgs * bq * hv], [bk * h, bk * hv], stages,
              jnp.dtype(dtype).itemsize, extra=stages * 1024 + 1024)
  ranges = np.asarray(ranges, np.int32)
  if ranges.shape != (4, nqt):
    raise ValueError(f"ranges must have shape (4, {nqt}), got {ranges.shape}")
  groups = n // kh
  segments = q_segment_ids is not None
  s_limit = sp if kv_len_static is None else int(kv_len_static)
  persistent = cfg.persistent_dq
  if persistent:
    tables = _work_table(ranges, b, n, kh, cfg.num_ctas,
                         cfg.lpt_schedule)
  else:
    work = ranges[3] - ranges[0]
    order = np.argsort(-work, kind="stable").astype(np.int32)
    tables = jnp.asarray(np.concatenate([ranges, order[None]], 0))
  # Masked loops only where needed (as in dK/dV); a key length cuts the
  # unmasked run short, so its blocks after it are masked.
  lead, trail = _masked_loops(ranges, trail=kv_lengths is not None)
  mult = (soft_cap if soft_cap is not None else scale) * LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref,
             qseg_ref, kvseg_ref, kvlen_ref, dq_ref, q_smem, do_smem,
             k_smem, v_smem, seg_smem, q_bar, k_ready, v_ready, k_free,
             v_free):
    wg = lax.axis_index("wg")

    item_of = lambda raw: fwd_lib.cut_item(raw, s_limit, bk, kvlen_ref)

    if persistent:
      cta = lax.axis_index("c")
      n_items = tab_ref[cta, 0, 0]
      raw_of = lambda j: tuple(tab_ref[cta, j + 1, r] for r in range(7))
    else:
      qt0 = tab_ref[4, lax.axis_index("q")]
      item0 = item_of((lax.axis_index("b"), lax.axis_index("h"), qt0,
                       *(tab_ref[r, qt0] for r in range(4))))

    def produce(item, base):
      bb, hh, _, lo, _, _, hi, _ = item
      kvh = lax.div(hh, jnp.int32(groups))
      num_kv = hi - lo

      @pl.loop(0, num_kv)
      def _(i):
        g = base + i
        slot = lax.rem(g, jnp.int32(stages))
        kslice = pl.ds((lo + i) * bk, bk)

        @pl.when(g >= stages)
        def _():
          plgpu.barrier_wait(k_free.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[bb, kslice, kvh], k_smem.at[slot],
                                k_ready.at[slot])
        if segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[bb, kslice], seg_smem.at[slot],
                                  k_ready.at[slot])

        @pl.when(g >= stages)
        def _():
          plgpu.barrier_wait(v_free.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[bb, kslice, kvh], v_smem.at[slot],
                                v_ready.at[slot])

      return base + num_kv

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(cfg.producer_regs, action="decrease")
      if persistent:
        # One K / V ring across the items: the next item's first blocks
        # load while the consumers store this item's dQ.
        total = lax.fori_loop(0, n_items,
                              lambda j, base: produce(item_of(raw_of(j)),
                                                      base), jnp.int32(0))
      else:
        total = produce(item0, 0)
      _drain(total, stages, k_free, v_free)

    def consume(item, base, nxt=None):
      """This consumer's rows of one item (steps ``base`` on in the ring);
      ``nxt``: ``(valid, b, head, query tile)`` of the next item, whose Q
      and dO rows are prefetched into L2. Returns the next item's base."""
      bb, hh, qt, lo, a, c, hi, kv_limit = item
      q_base = qt * tq + wg * bq
      qs = pl.ds(q_base, bq)
      q_w, do_w = q_smem.at[wg], do_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bb, qs, hh], q_w, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[bb, qs, hh], do_w, q_bar.at[wg])
      lse = plgpu.load(lse_ref.at[bb, hh, qs], layout=_ROW, optimized=False)
      dlt = plgpu.load(delta_ref.at[bb, hh, qs], layout=_ROW,
                       optimized=False)
      if segments:
        qseg = plgpu.load(qseg_ref.at[bb, qs], layout=_ROW, optimized=False)
      plgpu.barrier_wait(q_bar.at[wg])
      if nxt is not None:
        qs_n = pl.ds(nxt[3] * tq + wg * bq, bq)
        _prefetch_if(nxt[0], q_ref.at[nxt[1], qs_n, nxt[2]],
                     do_ref.at[nxt[1], qs_n, nxt[2]])
      row = lambda x: lax.broadcast_in_dim(x, (bq, bk), [0])

      def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=_WGMMA)

      def body(j, masked, dq_acc):
        slot = lax.rem(base + j - lo, jnp.int32(stages))
        # Q/dO descriptors formed in the loop, not hoisted (_opaque_zero).
        z = _opaque_zero(j, hi + 1)
        q_w, do_w = q_smem.at[wg + z], do_smem.at[wg + z]
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])

        def scope(s_acc, dp_acc):
          if _DP_INIT == "delta":  # dP - Delta out of the matmul
            dp_acc[...] = row(dlt)
          plgpu.wgmma(s_acc, q_w, k_smem.at[slot].T)
          plgpu.wgmma(dp_acc, do_w, v_smem.at[slot].T)
          s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
          if soft_cap is not None:
            s = jnp.tanh(s * (scale / soft_cap))
          p = jnp.exp2(s * mult - row(lse))
          if masked:
            qi = q_base + iota(0)
            ki = j * bk + iota(1)
            vis = ki < kv_limit
            if predicate is not None:
              vis = vis & predicate(qi, ki)
            if segments:
              kvseg = plgpu.load(seg_smem.at[slot], layout=_COL)
              vis = vis & (row(qseg)
                           == lax.broadcast_in_dim(kvseg, (bq, bk), [1]))
            p = jnp.where(vis, p, 0.0)
          dp = dp_acc[...]
          plgpu.barrier_arrive(v_free.at[slot])
          ds = p * (dp if _DP_INIT == "delta" else dp - row(dlt))
          if soft_cap is not None:
            ds = ds * (1.0 - s * s)
          return ds.astype(dtype)

        ds = pl.run_scoped(scope, plgpu.ACC((bq, bk), jnp.float32),
                           plgpu.ACC((bq, bk), jnp.float32))
        plgpu.wgmma(dq_acc, ds, k_smem.at[slot])
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(k_free.at[slot])

      def all_blocks(dq_acc):
        masked = lambda j, _: (body(j, True, dq_acc), ())[1]
        full = lambda j, _: (body(j, False, dq_acc), ())[1]
        if lead:
          lax.fori_loop(lo, a, masked, ())
        lax.fori_loop(a, c, full, ())
        if trail:
          lax.fori_loop(c, hi, masked, ())
        return dq_acc[...]

      dq = pl.run_scoped(all_blocks, plgpu.ACC((bq, h), jnp.float32))
      q_w[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_w, dq_ref.at[bb, qs, hh])
      # Also before the next item's Q lands in this buffer.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return base + (hi - lo)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_regs, action="increase")
      if persistent:
        def item(j, base):
          bb_n, hh_n, qt_n = raw_of(jnp.minimum(j + 1, n_items - 1))[:3]
          return consume(item_of(raw_of(j)), base,
                         (j + 1 < n_items, bb_n, hh_n, qt_n))

        lax.fori_loop(0, n_items, item, jnp.int32(0))
      else:
        consume(item0, 0)

  # Contraction over bk keys in dQ += dS K: 32-key blocks need 64B swizzle.
  swz = min(128, bk * jnp.dtype(dtype).itemsize)
  scratch = [
      _tiled_smem((wgs, bq, h), dtype, swz),
      _tiled_smem((wgs, bq, hv), dtype, swz),
      _tiled_smem((stages, bk, h), dtype, swz),
      _tiled_smem((stages, bk, hv), dtype, swz),
      plgpu.SMEM((stages, bk), jnp.int32) if segments else None,
      plgpu.Barrier(num_arrivals=2, num_barriers=wgs),
      plgpu.Barrier(num_arrivals=2 if segments else 1, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  ]
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=scratch,
      grid=(tables.shape[0],) if persistent else (nqt, n, b),
      grid_names=("c",) if persistent else ("q", "h", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )
  return call(q, k, v, do, lse2, _kernel_delta(delta), tables,
              q_segment_ids, kv_segment_ids, kv_lengths)
