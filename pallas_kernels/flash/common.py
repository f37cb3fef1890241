"""Shared pieces of the Pallas Triton flash-attention kernels.

Trace-time planning (numpy) and small in-kernel helpers used by ``triton.py``
(forward) and ``triton_bwd.py`` (backward).

Tiling. A kernel tile is ``rows x block_kv`` where the rows are ``block_t``
query positions times ``g_pad`` query heads of one key/value head (GQA/MQA
packing: the ``G = N / K`` query heads sharing a K/V head form one
``[block_t * g_pad, H]`` operand, so each K/V block is read once for the
whole group and no K/V is ever repeated). Row ``r`` is position
``t0 + r // g_pad`` of query head ``kh * G + r % g_pad``; ``g_pad`` is ``G``
rounded up to a power of two (Triton tiles are powers of two) and the extra
rows are masked.

Block plan. For each (head group, query block) the visible key blocks are
split into FULL tiles (no elementwise static masking, unmasked loads) and
PARTIAL tiles (the static mask predicate and the sequence bounds are
evaluated elementwise); EMPTY tiles are never visited. The plan is one small
int32 array ``[Hg, rows, 4 + Wf + Wp]`` holding ``(n_full, n_partial,
full_start, partial_start, full list..., partial list...)``. A class whose
tiles form a contiguous range in every row stores no list (the kernel walks
``start + jj``), so causal, windows, chunks and the unmasked case never do an
indirect load in their inner loop. The Triton backend has no scalar
prefetch, so the plan is an ordinary input read with scalar loads, and the
loops have dynamic trip counts. The dK/dV kernel uses the transposed plan
(per key block, its query blocks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["LOG2E", "LN2", "M_INIT", "Plan", "Rows", "Spec", "TileMath",
           "cdiv", "dot", "i32", "make_plan", "next_pow2", "out_struct"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Initial running max (base 2): finite, so exp2(m_old - m_new) never meets
# inf - inf, yet below every finite logit (masked logits are -inf).
M_INIT = float(np.finfo(np.float32).min)

EMPTY, PARTIAL, FULL = 0, 1, 2


def next_pow2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


# --------------------------------------------------------------------------
# Static problem description.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one attention call (hashable)."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_head_dim: int
  dtype: str
  scale: float
  soft_cap: float | None
  bias_shape: tuple[int, int, int, int] | None
  mask_array_shape: tuple[int, int, int, int] | None
  segment_ids: bool
  q_lengths: bool
  kv_lengths: bool
  sinks: bool
  mask: object  # duck-typed static mask, or None
  interpret: bool

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def g_pad(self) -> int:
    return next_pow2(self.group)

  @property
  def hp(self) -> int:
    return max(16, next_pow2(self.head_dim))

  @property
  def hvp(self) -> int:
    return max(16, next_pow2(self.value_head_dim))

  @property
  def precision(self):
    # float32 inputs must not silently drop to TF32 on the GPU.
    if np.dtype(self.dtype) == np.float32:
      return lax.Precision.HIGHEST
    return None


# --------------------------------------------------------------------------
# Trace-time planning.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one kernel's block plan (see module docstring).

  Attributes:
    num_rows: query blocks (q-major plan) or key blocks (kv-major plan).
    num_groups: 1, or K when the mask distinguishes heads.
    full_range, partial_range: the class is a contiguous range in every row.
    full_width, partial_width: list widths (0 in range mode).
    reverse: visit rows last-first (their work grows with the row index), so
      the longest programs start first (causal load balance).
    aux_heads: rows of the aux array (0: the mask has no aux bits).
  """
  num_rows: int
  num_groups: int
  full_range: bool
  partial_range: bool
  full_width: int
  partial_width: int
  reverse: bool
  aux_heads: int


def _tile_kinds(mask, t, s, bq, bk, num_kv_heads, g):
  """int8 [Hg, nq, nk] kinds per head group, plus aux [Hm, nq, nk] or None."""
  nq, nk = cdiv(t, bq), cdiv(s, bk)
  if mask is None:
    kinds = np.full((1, nq, nk), FULL, np.int8)
    aux = None
  else:
    kinds, aux = mask.block_kinds(t, s, bq, bk, need_aux=True)
    kinds = np.asarray(kinds, np.int8)
    aux = None if aux is None else np.asarray(aux, np.int32)
  kinds = kinds.copy()
  # Ragged edges need their bounds checked elementwise (and masked loads).
  if t % bq:
    kinds[:, -1, :] = np.minimum(kinds[:, -1, :], PARTIAL)
  if s % bk:
    kinds[:, :, -1] = np.minimum(kinds[:, :, -1], PARTIAL)
  if kinds.shape[0] > 1:
    # One program serves the g query heads of a K/V head: it visits the union
    # of their tiles and skips masking only where all of them are FULL.
    grouped = kinds.reshape(num_kv_heads, g, nq, nk)
    visit = grouped.max(axis=1) > EMPTY
    full = grouped.min(axis=1) == FULL
    kinds = np.where(full, FULL, np.where(visit, PARTIAL, EMPTY))
    kinds = kinds.astype(np.int8)
  return kinds, aux


def _class_layout(sel):
  """Counts, first indices, range-ness and sorted lists of a bool [.., C]."""
  c = sel.shape[-1]
  count = sel.sum(axis=-1).astype(np.int32)
  first = np.where(count > 0, np.argmax(sel, axis=-1), 0).astype(np.int32)
  last = c - 1 - np.argmax(sel[..., ::-1], axis=-1)
  is_range = bool(np.all((count == 0) | (last - first + 1 == count)))
  width = 0 if is_range else max(int(count.max()), 1)
  # A stable sort of "not selected" puts the selected indices first, in
  # increasing order.
  if is_range:
    lists = np.zeros(sel.shape[:-1] + (0,), np.int32)
  else:
    lists = np.argsort(~sel, axis=-1, kind="stable")[..., :width]
  return count, first, is_range, lists.astype(np.int32)


@functools.lru_cache(maxsize=128)
def _make_plan_cached(mask, t, s, bq, bk, num_kv_heads, g, kv_major):
  kinds, aux = _tile_kinds(mask, t, s, bq, bk, num_kv_heads, g)
  if kv_major:
    kinds = kinds.transpose(0, 2, 1)
  hg, rows, _ = kinds.shape
  nf, f0, full_range, fl = _class_layout(kinds == FULL)
  npart, p0, part_range, plist = _class_layout(kinds == PARTIAL)
  wf, wp = fl.shape[-1], plist.shape[-1]
  arr = np.concatenate([nf[..., None], npart[..., None], f0[..., None],
                        p0[..., None], fl, plist], axis=-1).astype(np.int32)
  work = nf + npart
  reverse = bool(rows > 1 and work[:, -1].sum() > work[:, 0].sum())
  plan = Plan(num_rows=rows, num_groups=hg, full_range=full_range,
              partial_range=part_range, full_width=wf, partial_width=wp,
              reverse=reverse, aux_heads=0 if aux is None else aux.shape[0])
  arr.setflags(write=False)
  if aux is not None:
    aux.setflags(write=False)
  return plan, arr, aux


def make_plan(mask, t, s, bq, bk, num_kv_heads, g, *, kv_major=False):
  """Returns ``(Plan, int32 plan array, aux int32 [Hm, nq, nk] or None)``.

  Raises:
    NotImplementedError: the mask cannot be tiled this way (e.g. a
      BlockSparse layout not aligned to the tiles).
  """
  return _make_plan_cached(mask, int(t), int(s), int(bq), int(bk),
                           int(num_kv_heads), int(g), bool(kv_major))


# --------------------------------------------------------------------------
# In-kernel helpers.
# --------------------------------------------------------------------------


def i32(x):
  """A traced int32 scalar (interpret mode mishandles python ints in loads)."""
  return jnp.asarray(x, jnp.int32)


def scalar(ref, *idx):
  return ref[tuple(i32(x) for x in idx)]


def dot(a, b, *, trans_b=False, precision=None):
  """a @ b (or a @ b.T) with float32 accumulation."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def masked_load(view, mask, other):
  if mask is None:
    return plgpu.load(view)
  return plgpu.load(view, mask=mask, other=other)


def _and(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a & b


@dataclasses.dataclass(frozen=True)
class Rows:
  """The query rows of one tile: ``block_t`` positions x ``g_pad`` heads.

  ``t`` (int32 [M]) is each row's position; ``n`` its query head: int32 [M]
  when heads are packed, else the scalar head (and loads use plain slices).
  """
  t0: jax.Array
  t: jax.Array
  n: jax.Array
  gi: jax.Array | None  # row's index within the group (packed only)
  block_t: int
  g_pad: int
  g: int
  seq_len: int
  ragged: bool  # the tile may hold rows past the sequence end (static)

  @staticmethod
  def make(i, kh, *, block_t, g_pad, g, seq_len, ragged):
    rows = block_t * g_pad
    t0 = i * block_t
    r = jnp.arange(rows, dtype=jnp.int32)
    if g_pad == 1:
      return Rows(t0, t0 + r, kh, None, block_t, 1, g, seq_len, ragged)
    shift = g_pad.bit_length() - 1
    t = t0 + lax.shift_right_logical(r, jnp.int32(shift))
    gi = r & (g_pad - 1)
    return Rows(t0, t, kh * g + gi, gi, block_t, g_pad, g, seq_len, ragged)

  @property
  def size(self) -> int:
    return self.block_t * self.g_pad

  @property
  def packed(self) -> bool:
    return self.g_pad > 1

  def valid(self):
    """bool [M] row validity, or None when every row is valid (static)."""
    v = None
    if self.ragged:
      v = self.t < self.seq_len
    if self.g_pad > self.g:
      v = _and(v, self.gi < self.g)
    return v

  def _view(self, ref, b, width):
    col = jnp.arange(width, dtype=jnp.int32)
    if not self.packed:
      return ref.at[i32(b), pl.ds(i32(self.t0), self.size), i32(self.n),
                    pl.ds(i32(0), width)]
    return ref.at[i32(b), self.t[:, None], self.n[:, None], col[None, :]]

  def _mask2(self, width, real_width):
    valid = self.valid()
    mask = None if valid is None else valid[:, None]
    if width > real_width:
      mask = _and(mask, (jnp.arange(width, dtype=jnp.int32)
                         < real_width)[None, :])
    return mask

  def load(self, ref, b, width, real_width):
    """Loads [M, width] rows from a [B, T, N, D] ref (zeros past D/ends)."""
    return masked_load(self._view(ref, b, width),
                       self._mask2(width, real_width), 0.0)

  def store(self, ref, b, value, real_width):
    """Stores [M, width] rows into a [B, T, N, D] ref."""
    plgpu.store(self._view(ref, b, value.shape[1]), value.astype(ref.dtype),
                mask=self._mask2(value.shape[1], real_width))

  def _stat_view(self, ref, b):
    if not self.packed:
      return ref.at[i32(b), pl.ds(i32(self.t0), self.size), i32(self.n)]
    return ref.at[i32(b), self.t, self.n]

  def load_stat(self, ref, b, *, other):
    """Loads [M] from a [B, T, N] ref."""
    return masked_load(self._stat_view(ref, b), self.valid(), other)

  def store_stat(self, ref, b, value):
    plgpu.store(self._stat_view(ref, b), value.astype(ref.dtype),
                mask=self.valid())

  def load_head(self, ref):
    """Loads a per-head [N] array at the rows' heads: [M] (or a scalar)."""
    if not self.packed:
      return scalar(ref, self.n)
    mask = self.gi < self.g if self.g_pad > self.g else None
    return masked_load(ref.at[self.n], mask, 0)

  def load_seq(self, ref, b, *, other):
    """Loads a per-position [B, T] array at the rows' positions: [M]."""
    if not self.packed:
      view = ref.at[i32(b), pl.ds(i32(self.t0), self.size)]
    else:
      view = ref.at[i32(b), self.t]
    return masked_load(view, self.valid(), other)


def cdiv_dyn(x, d: int):
  """ceil(x / d) for a traced non-negative int32 scalar."""
  return jax.lax.div(x + (d - 1), jnp.int32(d))


def load_vec(ref, b, j, block, seq_len, ragged, other=0):
  """Loads ``ref[b, j * block : (j + 1) * block]`` of a [B, S] array."""
  mask = None
  if ragged:
    mask = j * block + jnp.arange(block, dtype=jnp.int32) < seq_len
  return masked_load(ref.at[i32(b), pl.ds(i32(j * block), block)], mask,
                     other)


def load_kv(ref, b, j, kh, block, width, real_width, seq_len, ragged):
  """Loads a [block, width] key/value tile (zeros past the sequence end)."""
  mask = None
  if ragged:
    pos = j * block + jnp.arange(block, dtype=jnp.int32)
    mask = (pos < seq_len)[:, None]
  if width > real_width:
    mask = _and(mask, (jnp.arange(width, dtype=jnp.int32)
                       < real_width)[None, :])
  view = ref.at[i32(b), pl.ds(i32(j * block), block), i32(kh),
                pl.ds(i32(0), width)]
  return masked_load(view, mask, 0.0)


def store_kv(ref, b, j, kh, value, real_width, seq_len, ragged):
  block, width = value.shape
  mask = None
  if ragged:
    pos = j * block + jnp.arange(block, dtype=jnp.int32)
    mask = (pos < seq_len)[:, None]
  if width > real_width:
    mask = _and(mask, (jnp.arange(width, dtype=jnp.int32)
                       < real_width)[None, :])
  view = ref.at[i32(b), pl.ds(i32(j * block), block), i32(kh),
                pl.ds(i32(0), width)]
  plgpu.store(view, value.astype(ref.dtype), mask=mask)


@dataclasses.dataclass
class TileMath:
  """Scores and visibility of one tile, in either orientation.

  ``transposed=False``: tiles are [M rows, block_kv] (forward, dQ);
  ``transposed=True``: [block_kv, M rows] (dK/dV), so probabilities come out
  already transposed for the ``p^T dO`` and ``dS^T Q`` products.
  """
  spec: Spec
  transposed: bool
  b: jax.Array
  kh: jax.Array
  bias_ref: object
  mask_array_ref: object
  aux_ref: object
  plan: Plan
  kv_len_b: jax.Array | None  # kv_lengths[b] (dynamic), if given

  def rowv(self, x):
    return x[None, :] if self.transposed else x[:, None]

  def colv(self, x):
    return x[:, None] if self.transposed else x[None, :]

  def scores(self, s, rows: Rows, kv_pos, kv_ragged):
    """Maps raw q.k products to ``(x, c, th)``: base-2 logits are ``x * c``.

    Without bias or soft-cap ``x`` is the raw product and ``c`` folds
    ``scale * log2(e)`` (one FMA later); ``th`` is ``tanh`` of the capped
    logits (for the backward), else None.
    """
    sp = self.spec
    if sp.soft_cap is None and sp.bias_shape is None and sp.scale > 0:
      return s, sp.scale * LOG2E, None
    x = s * sp.scale
    if sp.bias_shape is not None:
      x = x + self._tile_input(self.bias_ref, sp.bias_shape, rows, kv_pos,
                               kv_ragged, 0.0).astype(jnp.float32)
    if sp.soft_cap is not None:
      th = jnp.tanh(x * (1.0 / sp.soft_cap))
      return th, sp.soft_cap * LOG2E, th
    return x, LOG2E, None

  def _tile_input(self, ref, shape, rows: Rows, kv_pos, kv_ragged, other):
    """Gathers a [B|1, N|1, T|1, S|1] input over the tile (broadcastable)."""
    bb, nb, tb, sb = shape
    zero = i32(0)
    idx_b = i32(self.b) if bb > 1 else zero
    mask = None
    if nb > 1:
      idx_n = self.rowv(rows.n) if rows.packed else i32(rows.n)
      if rows.packed and rows.g_pad > rows.g:
        mask = self.rowv(rows.gi < rows.g)
    else:
      idx_n = zero
    if tb > 1:
      idx_t = self.rowv(rows.t)
      if rows.ragged:
        mask = _and(mask, self.rowv(rows.t < rows.seq_len))
    else:
      idx_t = zero
    if sb > 1:
      idx_s = self.colv(kv_pos)
      if kv_ragged:
        mask = _and(mask, self.colv(kv_pos < self.spec.kv_len))
    else:
      idx_s = zero
    return masked_load(ref.at[idx_b, idx_n, idx_t, idx_s], mask, other)

  def _aux(self, rows: Rows, i, j):
    if self.plan.aux_heads == 1:
      return scalar(self.aux_ref, 0, i, j)
    if not rows.packed:
      return scalar(self.aux_ref, rows.n, i, j)
    mask = rows.gi < rows.g if rows.g_pad > rows.g else None
    aux = masked_load(self.aux_ref.at[rows.n, i32(i), i32(j)], mask, 0)
    return self.rowv(aux)

  def visibility(self, rows: Rows, kv_pos, i, j, *, partial, kv_ragged,
                 q_seg=None, kv_seg=None):
    """bool tile visibility, or None when everything is visible (static).

    Static masking (mask predicate, key bound) runs only on PARTIAL tiles;
    dynamic inputs (dense mask, segment ids, key lengths) on every tile.
    Query rows past q_lengths are not masked here: the forward zeroes them
    at the end and the backward sees lse = -inf (p = 0) for them.
    """
    sp = self.spec
    vis = None
    if partial:
      if kv_ragged:
        vis = self.colv(kv_pos < sp.kv_len)
      if sp.mask is not None:
        aux = self._aux(rows, i, j) if self.plan.aux_heads else None
        vis = _and(vis, sp.mask.kernel_predicate(
            self.rowv(rows.t), self.colv(kv_pos), aux))
    if sp.mask_array_shape is not None:
      vis = _and(vis, self._tile_input(self.mask_array_ref,
                                       sp.mask_array_shape, rows, kv_pos,
                                       partial and kv_ragged, False))
    if q_seg is not None:
      vis = _and(vis, self.rowv(q_seg) == self.colv(kv_seg))
    if self.kv_len_b is not None:
      vis = _and(vis, self.colv(kv_pos < self.kv_len_b))
    return vis


def plan_block(plan_ref, plan: Plan, h, r, jj, *, full: bool, start):
  """The jj-th block of row r's FULL (or PARTIAL) list."""
  if full and plan.full_range or (not full and plan.partial_range):
    return start + jj
  off = 4 if full else 4 + plan.full_width
  return scalar(plan_ref, h, r, off + jj)


def plan_counts(plan_ref, h, r):
  """(n_full, n_partial, full_start, partial_start) scalars."""
  return tuple(scalar(plan_ref, h, r, c) for c in range(4))


def clamp_range(count, start, limit, is_range: bool):
  """Drops blocks at or past ``limit`` (a dynamic bound) from a range."""
  if not is_range:
    return count
  return jnp.clip(limit - start, 0, count)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters of the three kernels.

  ``block_q*`` count tile rows: query positions times the packed query heads
  of a K/V group (see module docstring), so a GQA group of 4 with
  ``block_q=128`` covers 32 positions. ``block_kv*`` count key positions.
  All are powers of two >= 16 (a Triton dot needs 16 in every dimension).

  Attributes:
    block_q, block_kv, num_warps, num_stages: forward kernel.
    block_q_dq, block_kv_dq, num_warps_dq, num_stages_dq: dQ kernel.
    block_q_dkv, block_kv_dkv, num_warps_dkv, num_stages_dkv: dK/dV kernel.
    split_dkdv: compute dV and dK in separate programs (one float32
      accumulator each instead of two, at the price of recomputing
      ``K Q^T`` in both): large head dims, where the two ``[block_kv, H]``
      accumulators of one program do not fit the registers of
      ``block_kv >= 64`` rows a warpgroup.
  """
  block_q: int = 128
  block_kv: int = 64
  num_warps: int = 8
  num_stages: int = 3
  block_q_dq: int = 128
  block_kv_dq: int = 64
  num_warps_dq: int = 8
  num_stages_dq: int = 2
  block_q_dkv: int = 64
  block_kv_dkv: int = 128
  num_warps_dkv: int = 8
  num_stages_dkv: int = 2
  split_dkdv: bool = False

  def __post_init__(self):
    for f in dataclasses.fields(self):
      val = getattr(self, f.name)
      if f.name == "split_dkdv":
        if not isinstance(val, (bool, np.bool_)):
          raise ValueError(f"split_dkdv={val!r} must be a bool")
        continue
      if not isinstance(val, (int, np.integer)) or val <= 0:
        raise ValueError(f"{f.name}={val!r} must be a positive int")
      if f.name.startswith("block") and (val < 16 or val & (val - 1)):
        raise ValueError(f"{f.name}={val} must be a power of two >= 16")
      if f.name.startswith("num_warps") and val & (val - 1):
        raise ValueError(f"{f.name}={val} must be a power of two")


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """A kernel output's ``ShapeDtypeStruct``, typed for ``shard_map``.

  Inside a ``jax.shard_map`` with ``check_vma=True`` every ``pallas_call``
  output must say over which manual mesh axes it varies: the union of those
  of ``like`` (the kernel's array inputs; None entries are skipped). Outside
  ``shard_map`` that set is empty.
  """
  varying = frozenset()
  for x in like:
    if x is not None:
      varying |= jax.typeof(x).mat.varying
  return jax.ShapeDtypeStruct(
      shape, dtype,
      manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def tile_shape(rows: int, block_kv: int, spec: Spec) -> tuple[int, int]:
  """(block_t, block_kv) for a kernel, shrunk to the problem.

  ``rows`` is the requested tile height (positions x packed heads).
  """
  g_pad = spec.g_pad
  block_t = max(1, rows // g_pad)
  block_t = min(block_t, next_pow2(spec.q_len))
  block_t = max(block_t, cdiv(16, g_pad))  # a dot needs >= 16 rows
  bk = min(block_kv, max(16, next_pow2(spec.kv_len)))
  return block_t, bk
