"""Flash attention forward for Hopper (sm_90) with Pallas Mosaic GPU.

The structure follows FlashAttention-3 (Shah et al., 2024,
https://arxiv.org/abs/2407.08608), written from scratch against
``jax.experimental.pallas.mosaic_gpu``:

* **Warp specialisation.** Each CTA runs ``num_compute_wgs`` consumer
  warpgroups, each owning ``block_q`` query rows, and one producer warpgroup
  that streams K and V tiles with TMA into a ``num_stages``-deep shared-memory
  ring. Full/empty handshakes use mbarriers: TMA completion (``k_ready``,
  ``v_ready``) and one arrival per consumer warpgroup (``k_free``,
  ``v_free``). The producer gives its registers to the consumers
  (``setmaxnreg``).
* **Intra-warpgroup overlap** (FA3 section 3.2). In iteration ``j`` a consumer
  issues ``S_{j+1} = Q K_{j+1}^T`` and ``O += P_j V_j`` back to back, waits
  for the first only (``wgmma.wait_group 1``) and computes the softmax of
  ``S_{j+1}`` while the tensor cores run ``P_j V_j``. The rescale of ``O`` by
  the previous block's correction factor overlaps ``Q K_{j+1}^T``.
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
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["FwdConfig", "default_fwd_config", "flash_forward",
           "kv_block_ranges", "SUPPORTED_HEAD_DIMS"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SMEM_BYTES = 227 * 1024
# Mosaic GPU uses named barrier 0 and 1 + warpgroup index; ours start here.
_SCHED_BARRIER_BASE = 8

_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)


@dataclasses.dataclass(frozen=True)
class FwdConfig:
  """Tiling of the forward kernel.

  Attributes:
    block_q: query rows per consumer warpgroup (multiple of 64).
    block_kv: keys per pipeline stage (multiple of 64).
    num_stages: depth of the K/V shared-memory ring.
    num_compute_wgs: consumer warpgroups per CTA (2 or 3).
    pingpong: order the consumers' matmuls with named barriers.
    consumer_regs, producer_regs: ``setmaxnreg`` targets.
    no_auto_barriers: let Pallas skip its conservative SMEM barriers.
  """
  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  num_compute_wgs: int = 2
  pingpong: bool = True
  consumer_regs: int = 240
  producer_regs: int = 24
  no_auto_barriers: bool = False

  def __post_init__(self):
    if self.block_q % 64 or self.block_kv % 64:
      raise ValueError(f"block_q={self.block_q} and block_kv={self.block_kv} "
                       "must be multiples of 64")
    if self.num_stages < 2:
      raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
    if self.num_compute_wgs not in (1, 2, 3):
      raise ValueError(f"num_compute_wgs must be 1, 2 or 3, got "
                       f"{self.num_compute_wgs}")
    regs = (self.num_compute_wgs * self.consumer_regs
            + self.producer_regs) * 128
    if regs > 65536:
      raise ValueError(f"register budget {regs} > 65536")

  @property
  def tile_q(self) -> int:
    return self.block_q * self.num_compute_wgs


def default_fwd_config(head_dim: int, causal: bool = False) -> FwdConfig:
  """The tiling used when the caller gives none (tuned on H100)."""
  del causal
  if head_dim <= 64:
    return FwdConfig(block_q=64, block_kv=128, num_stages=3)
  if head_dim <= 128:
    return FwdConfig(block_q=64, block_kv=128, num_stages=2)
  return FwdConfig(block_q=64, block_kv=64, num_stages=2)


def smem_bytes(cfg: FwdConfig, head_dim: int, head_dim_v: int,
               itemsize: int = 2, segments: bool = False) -> int:
  """Shared memory the forward kernel allocates (rounded as Mosaic does)."""
  rnd = lambda n: -(-n // 1024) * 1024
  total = rnd(cfg.tile_q * head_dim * itemsize)
  if head_dim_v != head_dim:
    total += rnd(cfg.tile_q * head_dim_v * itemsize)
  total += cfg.num_stages * rnd(cfg.block_kv * head_dim * itemsize)
  total += cfg.num_stages * rnd(cfg.block_kv * head_dim_v * itemsize)
  total += rnd(cfg.num_compute_wgs * cfg.block_q * 4)
  if segments:
    total += cfg.num_stages * rnd(cfg.block_kv * 4)
  return total + 1024  # barriers


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
    mgpu.utils.inline_ptx(f"bar.{op} $0, 256;", idx, has_side_effects=True)

  emit()


def _tiled_smem(shape, dtype):
  """SMEM with the 128-byte swizzle wgmma and TMA both like."""
  elems = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128)))


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
  need = smem_bytes(cfg, h, hv, jnp.dtype(dtype).itemsize, segments)
  if need > SMEM_BYTES:
    raise NotImplementedError(f"config {cfg} needs {need} bytes of SMEM")
  groups = n // kh
  s_limit = sp if kv_len_static is None else int(kv_len_static)
  # Heaviest query tiles first: better tail balance for causal masks.
  work = ranges[3] - ranges[0]
  order = np.argsort(-work, kind="stable").astype(np.int32)
  tables = jnp.asarray(np.concatenate([ranges, order[None]], 0))
  log2_scale = scale * LOG2E
  if sinks is not None:
    sinks = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None] * LOG2E,
                             (n, bq))

  def kernel(q_ref, k_ref, v_ref, tab_ref, sink_ref, qseg_ref, kvseg_ref,
             qlen_ref, kvlen_ref, out_ref, lse_ref, q_smem, k_smem, v_smem,
             lse_smem, seg_smem, q_bar, k_ready, v_ready, k_free, v_free):
    qt = tab_ref[4, lax.axis_index("q")]
    hh = lax.axis_index("h")
    bb = lax.axis_index("b")
    wg = lax.axis_index("wg")
    kvh = lax.div(hh, jnp.int32(groups))
    lo = tab_ref[0, qt]
    a = tab_ref[1, qt]
    c = tab_ref[2, qt]
    hi = tab_ref[3, qt]
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
    num_kv = hi - lo

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(cfg.producer_regs, action="decrease")

      @pl.loop(0, num_kv)
      def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        kslice = pl.ds((lo + i) * bk, bk)

        @pl.when(i >= stages)
        def _():
          plgpu.barrier_wait(k_free.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[bb, kslice, kvh], k_smem.at[slot],
                                k_ready.at[slot])
        if segments:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[bb, kslice], seg_smem.at[slot],
                                  k_ready.at[slot])

        @pl.when(i >= stages)
        def _():
          plgpu.barrier_wait(v_free.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[bb, kslice, kvh], v_smem.at[slot],
                                v_ready.at[slot])

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_regs, action="increase")
      q_base = qt * tq + wg * bq
      qs = pl.ds(q_base, bq)
      q_w = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bb, qs, hh], q_w, q_bar.at[wg])
      pingpong = cfg.pingpong and wgs > 1

      def sched_wait():
        if pingpong:
          _sched_barrier("sync", other=False, num_wgs=wgs)

      def sched_signal():
        if pingpong:
          _sched_barrier("arrive", other=True, num_wgs=wgs)

      if sinks is not None:
        m0 = plgpu.load(sink_ref.at[hh], layout=_ROW, optimized=False)
        l0 = jnp.ones((bq,), jnp.float32)
      else:
        m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((bq,), jnp.float32)
      m0 = plgpu.layout_cast(m0, _ROW)
      l0 = plgpu.layout_cast(l0, _ROW)
      acc0 = plgpu.layout_cast(jnp.zeros((bq, hv), jnp.float32), _WGMMA)
      p0 = plgpu.layout_cast(jnp.zeros((bq, bk), dtype), _WGMMA)
      if segments:
        qseg = plgpu.load(qseg_ref.at[bb, qs], layout=_ROW,
                          optimized=False)
      row = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])

      def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=_WGMMA)

      def softmax(s, j, slot, m, l, masked):
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
            kvseg = plgpu.load(seg_smem.at[slot], layout=_COL)
            vis = vis & (row(qseg, s.shape)
                         == lax.broadcast_in_dim(kvseg, s.shape, [1]))
          s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * mult)
        if masked or sinks is None:
          # A row with nothing visible yet keeps m = -inf; shift by 0 there.
          m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
          m_use = m_new
        p = jnp.exp2(s * mult - row(m_use, s.shape))
        alpha = jnp.exp2(m - m_use)
        l_new = l * alpha + p.sum(axis=1)
        return m_new, l_new, p, alpha

      def first_block(carry):
        acc, m, l, _ = carry
        plgpu.barrier_wait(k_ready.at[0])
        sched_wait()

        def scope(s_ref):
          plgpu.wgmma(s_ref, q_w, k_smem.at[0].T)
          sched_signal()
          return s_ref[...]

        s = pl.run_scoped(scope, plgpu.ACC((bq, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[0])
        # acc is still zero, so its rescale by alpha can be skipped.
        m, l, p, _ = softmax(s, lo, 0, m, l, masked=True)
        return acc, m, l, p.astype(dtype)

      def middle_block(j, carry, masked):
        """S_{j+1} = Q K_{j+1}^T and O += P_j V_j, then softmax(S_{j+1}).

        ``acc`` arrives already scaled to block j's running max: ptxas
        serialises every wgmma of the kernel if ordinary instructions write a
        wgmma input register while an earlier wgmma is in flight, so the
        rescale by the new correction factor comes after the wait, as in FA3
        for head dims <= 128 (the other consumer's matmuls hide it), and P is
        converted to 16 bits only once P_j V_j has retired.
        """
        acc, m, l, p = carry
        slot = lax.rem(j - lo, jnp.int32(stages))
        nslot = lax.rem(j + 1 - lo, jnp.int32(stages))
        plgpu.barrier_wait(k_ready.at[nslot])
        plgpu.barrier_wait(v_ready.at[slot])
        sched_wait()

        def pv(o_ref):
          plgpu.wgmma(o_ref, p, v_smem.at[slot])

        def scope(s_ref):
          plgpu.wgmma(s_ref, q_w, k_smem.at[nslot].T)
          # Issued, not awaited: o is valid only after wgmma_wait(0).
          o = pl.run_state(pv)(plgpu.ACC.init(acc))
          sched_signal()
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
          plgpu.barrier_arrive(k_free.at[nslot])
          m_new, l_new, p_new, alpha = softmax(s, j + 1, nslot, m, l, masked)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(v_free.at[slot])
          # P_{j+1} may only overwrite P_j's registers once P_j V_j is done.
          return o * row(alpha, o.shape), m_new, l_new, p_new.astype(dtype)

        return pl.run_scoped(scope, plgpu.ACC((bq, bk), jnp.float32))

      def last_block(carry):
        acc, m, l, p = carry
        slot = lax.rem(hi - 1 - lo, jnp.int32(stages))
        plgpu.barrier_wait(v_ready.at[slot])

        def pv(o_ref):
          plgpu.wgmma(o_ref, p, v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m, l, p

      plgpu.barrier_wait(q_bar.at[wg])
      if pingpong:
        # Turns pass around the ring 0 -> 1 -> ... -> wgs-1 -> 0; the last
        # consumer hands consumer 0 the first turn.
        pl.when(wg == wgs - 1)(sched_signal)
      carry = (acc0, m0, l0, p0)
      carry = lax.cond(num_kv > 0, first_block, lambda x: x, carry)
      # Block j+1 is masked unless it lies in [a, c).
      masked_body = functools.partial(middle_block, masked=True)
      full_body = functools.partial(middle_block, masked=False)
      carry = lax.fori_loop(lo, jnp.maximum(a - 1, lo), masked_body, carry)
      carry = lax.fori_loop(jnp.maximum(a - 1, lo), jnp.maximum(c - 1, lo),
                            full_body, carry)
      carry = lax.fori_loop(jnp.maximum(c - 1, lo), hi - 1, masked_body,
                            carry)
      carry = lax.cond(num_kv > 0, last_block, lambda x: x, carry)
      if pingpong:
        # Consume the turn the last consumer handed to consumer 0.
        pl.when(wg == 0)(sched_wait)
      acc, m, l, _ = carry

      # Epilogue: normalise, write O through the (now idle) Q buffer.
      l_safe = jnp.where(l == 0.0, 1.0, l)
      out = acc * row(1.0 / l_safe, acc.shape)
      lse = jnp.where(l == 0.0, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
      if qlen_ref is not None:
        valid = (q_base + plgpu.broadcasted_iota(
            jnp.int32, (bq,), 0, layout=_ROW)) < qlen_ref[bb]
        lse = jnp.where(valid, lse, -jnp.inf)
        out = jnp.where(row(valid, out.shape), out, 0.0)
      q_w[...] = out.astype(dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_w, out_ref.at[bb, qs, hh], commit_group=False)
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bb, hh, qs],
                              commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  scratch = [
      _tiled_smem((wgs, bq, h), dtype),
      _tiled_smem((stages, bk, h), dtype),
      _tiled_smem((stages, bk, hv), dtype),
      plgpu.SMEM((wgs, bq), jnp.float32),
      plgpu.SMEM((stages, bk), jnp.int32) if segments else None,
      plgpu.Barrier(num_barriers=wgs),
      plgpu.Barrier(num_arrivals=2 if segments else 1, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  ]
  out_shape = (jax.ShapeDtypeStruct((b, tp, n, hv), dtype),
               jax.ShapeDtypeStruct((b, n, tp), jnp.float32))
  call = plgpu.kernel(
      kernel,
      out_type=out_shape,
      scratch_types=scratch,
      grid=(nqt, n, b),
      grid_names=("q", "h", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, unsafe_no_auto_barriers=cfg.no_auto_barriers),
  )
  return call(q, k, v, tables, sinks, q_segment_ids, kv_segment_ids,
              q_lengths, kv_lengths)
