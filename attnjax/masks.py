"""Composable, hashable attention masks.

A mask is a static predicate ``visible(q_idx, kv_idx)`` over query and key
positions. Masks are frozen values, so they can be ``jax.jit`` static arguments
and kernels can specialise on them; ``&`` and ``|`` build trees of them.

Kernels use two views of a mask:

* ``block_kinds(T, S, block_q, block_kv)``: for each (query block, key block)
  tile, whether it is EMPTY (never loaded), PARTIAL (masked elementwise) or FULL
  (no elementwise masking). This is what makes a sparse mask cost time in
  proportion to its visible blocks.
* ``kernel_predicate(q_idx, kv_idx, aux)``: the elementwise predicate inside a
  PARTIAL tile. Head-dependent block-sparse leaves contribute through ``aux``,
  a per-tile integer whose bits carry their (tile-constant) value, so kernels
  never gather from a layout table.

Example:

>>> import attnjax.masks as am
>>> m = am.Causal() & am.LocalWindow(2, 0)
>>> print(m.as_array(5, 5).astype(int))
[[1 0 0 0 0]
 [1 1 0 0 0]
 [1 1 1 0 0]
 [0 1 1 1 0]
 [0 0 1 1 1]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "And",
    "BlockSparse",
    "Causal",
    "ChunkedCausal",
    "FromFunction",
    "Full",
    "LocalWindow",
    "Mask",
    "Or",
    "Prefix",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

# Dense evaluation of FromFunction for block classification is capped here.
_MAX_DENSE_ELEMENTS = 1 << 26


def _block_bounds(length: int, block: int):
  """First and last (inclusive) positions of each block, clipped to length."""
  starts = np.arange(0, length, block, dtype=np.int64)
  ends = np.minimum(starts + block, length) - 1
  return starts, ends


class Mask:
  """Base class: a static predicate over (query position, key position)."""

  # Number of heads the mask distinguishes (1 = same for every head).
  num_heads: int = 1

  def __call__(self, q_idx, kv_idx, head_idx=None):
    """Exact elementwise predicate (broadcasting jnp arrays of positions)."""
    raise NotImplementedError

  def _kinds(self, t: int, s: int, bq: int, bk: int) -> np.ndarray:
    """int8 [Hm, nq, nk] tile kinds (conservative: PARTIAL is always safe)."""
    raise NotImplementedError

  def _num_aux_bits(self) -> int:
    return 0

  def _aux(self, t, s, bq, bk, offset: int) -> np.ndarray | None:
    del t, s, bq, bk, offset
    return None

  def _kernel_eval(self, q_idx, kv_idx, aux, offset: int):
    del aux, offset
    return self(q_idx, kv_idx)

  # Public views -------------------------------------------------------------

  def as_array(self, q_len: int, kv_len: int) -> jax.Array:
    """Dense boolean form: [T, S], or [N, T, S] for a per-head mask."""
    q = jnp.arange(q_len)[:, None]
    k = jnp.arange(kv_len)[None, :]
    if self.num_heads == 1:
      return jnp.broadcast_to(self(q, k), (q_len, kv_len))
    h = jnp.arange(self.num_heads)[:, None, None]
    return jnp.broadcast_to(self(q[None], k[None], h),
                            (self.num_heads, q_len, kv_len))

  def block_kinds(self, q_len: int, kv_len: int, block_q: int, block_kv: int,
                  *, need_aux: bool = False):
    """Tile classification for a (block_q, block_kv) tiling.

    Args:
      q_len, kv_len: sequence lengths T and S.
      block_q, block_kv: tile sizes.
      need_aux: the caller will evaluate ``kernel_predicate`` inside PARTIAL
        tiles, so head-dependent leaves must be constant on each tile.

    Returns:
      ``(kinds, aux)``: int8 [Hm, nq, nk] with EMPTY/PARTIAL/FULL, and int32
      [Hm, nq, nk] auxiliary bits (None when the mask needs none).

    Raises:
      NotImplementedError: ``need_aux`` and a block-sparse leaf is not aligned
        with the tiling (its blocks must be multiples of the tiles).
    """
    with jax.ensure_compile_time_eval():
      kinds = self._kinds(q_len, kv_len, block_q, block_kv).astype(np.int8)
      aux = None
      if self._num_aux_bits():
        if need_aux:
          self._check_aligned(block_q, block_kv)
        aux = self._aux(q_len, kv_len, block_q, block_kv, 0)
        aux = np.broadcast_to(aux, kinds.shape).astype(np.int32)
    return kinds, aux

  def _check_aligned(self, bq, bk):
    del bq, bk

  def kernel_predicate(self, q_idx, kv_idx, aux=None):
    """Elementwise predicate inside a tile whose auxiliary bits are ``aux``."""
    return self._kernel_eval(q_idx, kv_idx, aux, 0)

  # Composition --------------------------------------------------------------

  def __and__(self, other: Mask) -> Mask:
    if not isinstance(other, Mask):
      return NotImplemented
    return And(self, other)

  def __or__(self, other: Mask) -> Mask:
    if not isinstance(other, Mask):
      return NotImplemented
    return Or(self, other)

  def __bool__(self):
    raise TypeError(
        "A Mask has no truth value. Use & and | (not `and`/`or`) to combine "
        "masks.")


def _combine_heads(a: int, b: int) -> int:
  if a != 1 and b != 1 and a != b:
    raise ValueError(f"masks distinguish different head counts: {a} and {b}")
  return max(a, b)


@dataclasses.dataclass(frozen=True)
class _Binary(Mask):
  left: Mask
  right: Mask

  def __post_init__(self):
    for name in ("left", "right"):
      if not isinstance(getattr(self, name), Mask):
        raise ValueError(f"{name} must be a Mask, got "
                         f"{type(getattr(self, name)).__name__}")
    _combine_heads(self.left.num_heads, self.right.num_heads)

  @property
  def num_heads(self):  # type: ignore[override]
    return _combine_heads(self.left.num_heads, self.right.num_heads)

  def _num_aux_bits(self):
    return self.left._num_aux_bits() + self.right._num_aux_bits()

  def _aux(self, t, s, bq, bk, offset):
    a = self.left._aux(t, s, bq, bk, offset)
    b = self.right._aux(t, s, bq, bk, offset + self.left._num_aux_bits())
    if a is None:
      return b
    if b is None:
      return a
    return a | b

  def _check_aligned(self, bq, bk):
    self.left._check_aligned(bq, bk)
    self.right._check_aligned(bq, bk)


@dataclasses.dataclass(frozen=True)
class And(_Binary):
  """Visible where both masks are visible."""

  def __call__(self, q_idx, kv_idx, head_idx=None):
    return (self.left(q_idx, kv_idx, head_idx)
            & self.right(q_idx, kv_idx, head_idx))

  def _kinds(self, t, s, bq, bk):
    return np.minimum(self.left._kinds(t, s, bq, bk),
                      self.right._kinds(t, s, bq, bk))

  def _kernel_eval(self, q_idx, kv_idx, aux, offset):
    return (self.left._kernel_eval(q_idx, kv_idx, aux, offset)
            & self.right._kernel_eval(
                q_idx, kv_idx, aux, offset + self.left._num_aux_bits()))


@dataclasses.dataclass(frozen=True)
class Or(_Binary):
  """Visible where either mask is visible."""

  def __call__(self, q_idx, kv_idx, head_idx=None):
    return (self.left(q_idx, kv_idx, head_idx)
            | self.right(q_idx, kv_idx, head_idx))

  def _kinds(self, t, s, bq, bk):
    return np.maximum(self.left._kinds(t, s, bq, bk),
                      self.right._kinds(t, s, bq, bk))

  def _kernel_eval(self, q_idx, kv_idx, aux, offset):
    return (self.left._kernel_eval(q_idx, kv_idx, aux, offset)
            | self.right._kernel_eval(
                q_idx, kv_idx, aux, offset + self.left._num_aux_bits()))


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every key visible to every query."""

  def __call__(self, q_idx, kv_idx, head_idx=None):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)),
                    bool)

  def _kinds(self, t, s, bq, bk):
    return np.full((1, math.ceil(t / bq), math.ceil(s / bk)), FULL)


def _interval_kinds(t, s, bq, bk, lo_fn, hi_fn):
  """Kinds for masks of the form lo(q) <= k <= hi(q) with lo, hi nondecreasing.

  ``lo_fn``/``hi_fn`` map int64 arrays of query positions to bounds (use large
  sentinels for unbounded sides).
  """
  qs, qe = _block_bounds(t, bq)
  ks, ke = _block_bounds(s, bk)
  lo_first, lo_last = lo_fn(qs)[:, None], lo_fn(qe)[:, None]
  hi_first, hi_last = hi_fn(qs)[:, None], hi_fn(qe)[:, None]
  ks, ke = ks[None, :], ke[None, :]
  empty = (ke < lo_first) | (ks > hi_last)
  full = (ks >= lo_last) & (ke <= hi_first)
  kinds = np.where(empty, EMPTY, np.where(full, FULL, PARTIAL))
  return kinds[None]


_BIG = np.int64(1) << 50


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key ``j`` visible to query ``i`` iff ``j <= i + offset``.

  ``offset=0`` is top-left aligned causal attention (``jax.nn``'s
  ``is_causal``); ``offset = S - T`` aligns the diagonal bottom-right, as when
  a few new queries attend a longer cache. T=4, S=6::

      offset=0     offset=2
      1 0 0 0 0 0  1 1 1 0 0 0
      1 1 0 0 0 0  1 1 1 1 0 0
      1 1 1 0 0 0  1 1 1 1 1 0
      1 1 1 1 0 0  1 1 1 1 1 1
  """
  offset: int = 0

  def __post_init__(self):
    if not isinstance(self.offset, (int, np.integer)):
      raise ValueError(f"offset must be an int, got {self.offset!r}")

  def __call__(self, q_idx, kv_idx, head_idx=None):
    return kv_idx <= q_idx + self.offset

  def _kinds(self, t, s, bq, bk):
    return _interval_kinds(t, s, bq, bk, lambda q: q * 0 - _BIG,
                           lambda q: q + self.offset)


@dataclasses.dataclass(frozen=True)
class LocalWindow(Mask):
  """Key ``j`` visible to query ``i`` iff ``i - left <= j <= i + right``.

  ``None`` leaves a side unbounded. ``LocalWindow(2, 0)`` on 5x5::

      1 0 0 0 0
      1 1 0 0 0
      1 1 1 0 0
      0 1 1 1 0
      0 0 1 1 1
  """
  left: int | None = None
  right: int | None = None

  def __post_init__(self):
    for name in ("left", "right"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, (int, np.integer))
                              or val < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got "
                         f"{val!r}")

  def __call__(self, q_idx, kv_idx, head_idx=None):
    vis = True
    if self.left is not None:
      vis = vis & (kv_idx >= q_idx - self.left)
    if self.right is not None:
      vis = vis & (kv_idx <= q_idx + self.right)
    shape = jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx))
    return jnp.broadcast_to(vis, shape)

  def _kinds(self, t, s, bq, bk):
    left = _BIG if self.left is None else self.left
    right = _BIG if self.right is None else self.right
    return _interval_kinds(t, s, bq, bk, lambda q: q - left,
                           lambda q: q + right)


@dataclasses.dataclass(frozen=True)
class ChunkedCausal(Mask):
  """Causal attention within consecutive chunks of ``chunk`` positions.

  Key ``j`` is visible to query ``i`` iff ``j <= i`` and
  ``j // chunk == i // chunk`` (Llama-4 style chunked attention). chunk=2::

      1 0 0 0 0
      1 1 0 0 0
      0 0 1 0 0
      0 0 1 1 0
      0 0 0 0 1
  """
  chunk: int

  def __post_init__(self):
    if not isinstance(self.chunk, (int, np.integer)) or self.chunk <= 0:
      raise ValueError(f"chunk must be a positive int, got {self.chunk!r}")

  def __call__(self, q_idx, kv_idx, head_idx=None):
    return (kv_idx <= q_idx) & (kv_idx // self.chunk == q_idx // self.chunk)

  def _kinds(self, t, s, bq, bk):
    c = self.chunk
    # lo(q) = start of q's chunk, hi(q) = q: both nondecreasing in q.
    return _interval_kinds(t, s, bq, bk, lambda q: (q // c) * c,
                           lambda q: q)


@dataclasses.dataclass(frozen=True)
class Prefix(Mask):
  """The first ``n`` keys are visible to every query (sink tokens).

  Combine with ``|``: ``(LocalWindow(3, 0) | Prefix(1)) & Causal()`` keeps a
  sliding window plus the first token, as StreamingLLM does. ``Prefix(2)``::

      1 1 0 0 0
      1 1 0 0 0
  """
  n: int

  def __post_init__(self):
    if not isinstance(self.n, (int, np.integer)) or self.n < 0:
      raise ValueError(f"n must be a non-negative int, got {self.n!r}")

  def __call__(self, q_idx, kv_idx, head_idx=None):
    shape = jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx))
    return jnp.broadcast_to(kv_idx < self.n, shape)

  def _kinds(self, t, s, bq, bk):
    return _interval_kinds(t, s, bq, bk, lambda q: q * 0,
                           lambda q: q * 0 + self.n - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparse(Mask):
  """Explicit block layout: per head, per query block, the visible key blocks.

  Args:
    layout: bool array [num_heads or 1, ceil(T / block_q), ceil(S / block_kv)]
      (a 2-D [nq, nk] layout applies to every head). ``layout[h, i, j]`` makes
      key block ``j`` visible to query block ``i`` of head ``h``.
    block_shape: ``(block_q, block_kv)``, the layout's tile in positions.

  Use it for MoBA-style routing, PowerAttention and strided patterns; combine
  with ``Causal()`` for causality inside diagonal blocks. Kernels need their
  tiles to divide ``block_shape`` (otherwise they raise NotImplementedError and
  dispatch falls back).

  Example (two heads, one block-diagonal, one block-strided):

  >>> import numpy as np
  >>> lay = np.array([np.eye(2, dtype=bool), [[1, 0], [1, 0]]], bool)
  >>> BlockSparse(lay, (2, 2)).as_array(4, 4).astype(int)[1].tolist()
  [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
  """
  layout: np.ndarray
  block_shape: tuple[int, int]

  def __post_init__(self):
    layout = np.asarray(self.layout)
    if layout.ndim == 2:
      layout = layout[None]
    if layout.ndim != 3:
      raise ValueError(
          f"layout must have rank 2 or 3, got shape {np.shape(self.layout)}")
    layout = layout.astype(bool)
    layout.setflags(write=False)
    object.__setattr__(self, "layout", layout)
    bs = tuple(int(b) for b in self.block_shape)
    if len(bs) != 2 or min(bs) <= 0:
      raise ValueError(f"block_shape must be two positive ints, got "
                       f"{self.block_shape!r}")
    object.__setattr__(self, "block_shape", bs)

  def __hash__(self):
    return hash((self.layout.shape, self.layout.tobytes(), self.block_shape))

  def __eq__(self, other):
    return (isinstance(other, BlockSparse)
            and self.block_shape == other.block_shape
            and self.layout.shape == other.layout.shape
            and bool(np.array_equal(self.layout, other.layout)))

  @property
  def num_heads(self):  # type: ignore[override]
    return self.layout.shape[0]

  def _padded_layout(self, t, s):
    bq, bk = self.block_shape
    nq, nk = math.ceil(t / bq), math.ceil(s / bk)
    lay = self.layout
    if lay.shape[1] < nq or lay.shape[2] < nk:
      raise ValueError(
          f"layout of shape {lay.shape} with block_shape {self.block_shape} "
          f"does not cover T={t}, S={s} (needs [.., {nq}, {nk}])")
    return lay[:, :nq, :nk]

  def __call__(self, q_idx, kv_idx, head_idx=None):
    bq, bk = self.block_shape
    lay = jnp.asarray(self.layout)
    if head_idx is None:
      if self.num_heads != 1:
        raise ValueError("a per-head BlockSparse mask needs head_idx")
      head_idx = 0
    qb = jnp.clip(q_idx // bq, 0, lay.shape[1] - 1)
    kb = jnp.clip(kv_idx // bk, 0, lay.shape[2] - 1)
    return lay[head_idx, qb, kb]

  def _tile_layout(self, t, s, bq, bk):
    """Per tile: (any visible, all visible) of the layout over the tile."""
    lay = self._padded_layout(t, s)
    lbq, lbk = self.block_shape
    qs, qe = _block_bounds(t, bq)
    ks, ke = _block_bounds(s, bk)
    # Layout blocks touched by each tile form a contiguous range.
    q0, q1 = qs // lbq, qe // lbq
    k0, k1 = ks // lbk, ke // lbk
    # Prefix sums give any/all over rectangular ranges.
    cs = np.zeros((lay.shape[0], lay.shape[1] + 1, lay.shape[2] + 1), np.int64)
    cs[:, 1:, 1:] = lay.astype(np.int64).cumsum(1).cumsum(2)
    a0, a1 = q0[:, None], q1[:, None] + 1
    b0, b1 = k0[None, :], k1[None, :] + 1
    count = cs[:, a1, b1] - cs[:, a0, b1] - cs[:, a1, b0] + cs[:, a0, b0]
    area = (a1 - a0) * (b1 - b0)
    return count > 0, count == area

  def _kinds(self, t, s, bq, bk):
    anyv, allv = self._tile_layout(t, s, bq, bk)
    return np.where(allv, FULL, np.where(anyv, PARTIAL, EMPTY))

  def _num_aux_bits(self):
    return 1

  def _aux(self, t, s, bq, bk, offset):
    anyv, _ = self._tile_layout(t, s, bq, bk)
    return anyv.astype(np.int32) << offset

  def _check_aligned(self, bq, bk):
    lbq, lbk = self.block_shape
    if lbq % bq or lbk % bk:
      raise NotImplementedError(
          f"BlockSparse block_shape {self.block_shape} is not a multiple of "
          f"the kernel tile ({bq}, {bk})")

  def _kernel_eval(self, q_idx, kv_idx, aux, offset):
    if aux is None:
      raise ValueError("BlockSparse.kernel_predicate needs aux bits")
    shape = jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx))
    return jnp.broadcast_to(((aux >> offset) & 1) == 1, shape)


@dataclasses.dataclass(frozen=True)
class FromFunction(Mask):
  """An elementwise predicate ``fn(q_idx, kv_idx) -> bool`` (FlexAttention's
  ``mask_mod``).

  ``fn`` receives broadcasting integer arrays and must use jnp operations; it
  must be hashable (a module-level function, not a fresh lambda per call, if
  you want jit caching). Tile classification evaluates ``fn`` densely at trace
  time (up to 2**26 positions; beyond that the mask raises NotImplementedError
  in kernels that need it), unless ``block_fn(q_first, q_last, kv_first,
  kv_last) -> kinds`` is given.

  Example (a dilated window):

  >>> fn = lambda q, k: ((q - k) % 2 == 0) & (k <= q)
  >>> FromFunction(fn).as_array(4, 4).astype(int).tolist()
  [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]]
  """
  fn: Callable
  block_fn: Callable | None = None

  def __post_init__(self):
    if not callable(self.fn):
      raise ValueError(f"fn must be callable, got {self.fn!r}")

  def __call__(self, q_idx, kv_idx, head_idx=None):
    shape = jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx))
    return jnp.broadcast_to(jnp.asarray(self.fn(q_idx, kv_idx), bool), shape)

  def _kinds(self, t, s, bq, bk):
    if self.block_fn is not None:
      qs, qe = _block_bounds(t, bq)
      ks, ke = _block_bounds(s, bk)
      kinds = np.asarray(self.block_fn(qs[:, None], qe[:, None], ks[None, :],
                                       ke[None, :]))
      return np.broadcast_to(kinds, (len(qs), len(ks)))[None]
    if t * s > _MAX_DENSE_ELEMENTS:
      raise NotImplementedError(
          f"FromFunction tile classification at T={t}, S={s} would evaluate "
          f"{t * s} positions; pass block_fn for lengths this large")
    dense = np.asarray(self.as_array(t, s))
    nq, nk = math.ceil(t / bq), math.ceil(s / bk)
    padded = np.zeros((nq * bq, nk * bk), np.int8)
    valid = np.zeros_like(padded)
    padded[:t, :s] = dense
    valid[:t, :s] = 1
    cnt = padded.reshape(nq, bq, nk, bk).sum((1, 3), dtype=np.int64)
    area = valid.reshape(nq, bq, nk, bk).sum((1, 3), dtype=np.int64)
    return np.where(cnt == area, FULL, np.where(cnt > 0, PARTIAL, EMPTY))[None]
