"""Static schedules for sequence parallelism: who holds which positions, and
which (query rows, key columns, mask) kernel calls each ring step needs.

Everything here is plain Python/numpy evaluated at trace time.

Positions. A sequence of length L sharded over ``n`` devices is cut into
chunks. ``contiguous``: n chunks, device d holds chunk d. ``zigzag``: 2n
chunks, device d holds chunks d and 2n-1-d (in that order), so every device
holds one early and one late chunk and causal work is even. A device's local
index i maps to global position ``chunk_start + i % chunk_len``.

Masks. The masks sequence parallelism supports (causal, local windows and
their intersection) are all *bands* on the offset ``kv_pos - q_pos``:
``lo <= kv_pos - q_pos <= hi`` (None = unbounded). Between one chunk of
queries and one chunk of keys a band stays a band in local coordinates, only
shifted by the difference of the chunks' starts, so each kernel call gets a
static, exact mask (``attnjax.masks.Causal(offset)`` and friends) that its
tile skipping understands.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from attnjax import masks as masks_lib

__all__ = ["Band", "Call", "Layout", "band_from_flags", "band_mask",
           "ring_schedule", "all_gather_calls", "visible_count"]


@dataclasses.dataclass(frozen=True)
class Band:
  """``lo <= kv_pos - q_pos <= hi``; None leaves a side unbounded."""
  lo: int | None = None
  hi: int | None = None

  @property
  def is_full(self) -> bool:
    return self.lo is None and self.hi is None

  def shift(self, delta: int) -> Band:
    """The band on ``(kv + delta) - q``'s local offset: subtract delta."""
    return Band(None if self.lo is None else self.lo - delta,
                None if self.hi is None else self.hi - delta)

  def clip(self, dmin: int, dmax: int):
    """Visible offsets within [dmin, dmax] as (a, b), or None if none."""
    a = dmin if self.lo is None else max(self.lo, dmin)
    b = dmax if self.hi is None else min(self.hi, dmax)
    return (a, b) if a <= b else None


def band_from_flags(is_causal: bool, local_window_size) -> Band:
  """The band of ``is_causal`` and ``local_window_size=(left, right)``."""
  lo = hi = None
  if local_window_size is not None:
    if isinstance(local_window_size, (int, np.integer)):
      local_window_size = (local_window_size, local_window_size)
    left, right = local_window_size
    lo = None if left is None else -int(left)
    hi = None if right is None else int(right)
  if is_causal:
    hi = 0 if hi is None else min(hi, 0)
  return Band(lo, hi)


@dataclasses.dataclass(frozen=True)
class _AtLeast(masks_lib.Mask):
  """``kv >= q + lo`` for lo > 0 (a band's lower edge above the diagonal,
  which ``LocalWindow`` cannot express)."""
  lo: int

  def __call__(self, q_idx, kv_idx, head_idx=None):
    return kv_idx >= q_idx + self.lo

  def _kinds(self, t, s, bq, bk):
    return masks_lib._interval_kinds(  # noqa: SLF001 (same package family)
        t, s, bq, bk, lambda q: q + self.lo,
        lambda q: q * 0 + masks_lib._BIG)  # noqa: SLF001


def band_mask(band: Band) -> masks_lib.Mask | None:
  """The simplest attnjax mask equal to ``band`` (None when unbounded)."""
  lo, hi = band.lo, band.hi
  parts = []
  if hi is not None:
    parts.append(masks_lib.Causal(offset=int(hi)))
  if lo is not None:
    if lo <= 0:
      parts.append(masks_lib.LocalWindow(left=int(-lo), right=None))
    else:
      parts.append(_AtLeast(int(lo)))
  if not parts:
    return None
  if (len(parts) == 2 and isinstance(parts[1], masks_lib.LocalWindow)
      and hi >= 0):
    return masks_lib.LocalWindow(left=int(-lo), right=int(hi))
  out = parts[0]
  for p in parts[1:]:
    out = out & p
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a length-``length`` sequence is split over ``n`` devices."""
  n: int
  length: int
  zigzag: bool = False

  def __post_init__(self):
    parts = 2 * self.n if self.zigzag else self.n
    if self.length % parts:
      raise ValueError(f"length {self.length} is not divisible into "
                       f"{parts} chunks ({self.n} devices, "
                       f"zigzag={self.zigzag})")

  @property
  def chunk_len(self) -> int:
    return self.length // (2 * self.n if self.zigzag else self.n)

  @property
  def local_len(self) -> int:
    return self.length // self.n

  def chunks(self, d: int) -> tuple[int, ...]:
    """Global chunk indices held by device d, in local order."""
    return (d, 2 * self.n - 1 - d) if self.zigzag else (d,)

  def pieces(self, d: int) -> tuple[tuple[int, int, int], ...]:
    """(local_start, global_start, length) of each chunk on device d."""
    c = self.chunk_len
    return tuple((a * c, g * c, c) for a, g in enumerate(self.chunks(d)))

  def positions(self, d: int) -> np.ndarray:
    """Global position of each local index on device d."""
    return np.concatenate([np.arange(g, g + c) for _, g, c in
                           self.pieces(d)])


@dataclasses.dataclass(frozen=True)
class Call:
  """One kernel call: local query rows [q0, q1) x key columns [k0, k1) under
  ``band`` in the call's own coordinates (row q0 and column k0 are 0)."""
  q0: int
  q1: int
  k0: int
  k1: int
  band: Band

  @property
  def mask(self) -> masks_lib.Mask | None:
    return band_mask(self.band)


def _piece_band(band, qp, kp):
  """Band of one (query piece, key piece) in local coordinates."""
  (ql, qg, _), (kl, kg, _) = qp, kp
  return band.shift((kg - kl) - (qg - ql))


def _diag_range(q0, q1, k0, k1):
  """Offsets (col - row) present in the local rectangle."""
  return k0 - (q1 - 1), (k1 - 1) - q0


def _normalise(band, q0, q1, k0, k1) -> Band | None:
  """band restricted to a rectangle, in the call's coordinates (None: empty).

  Sides that do not cut the rectangle are dropped, so an all-visible
  rectangle gets the full band (no mask at all).
  """
  dmin, dmax = _diag_range(q0, q1, k0, k1)
  vis = band.clip(dmin, dmax)
  if vis is None:
    return None
  a, b = vis
  # Call coordinates: row r = i - q0, col c = j - k0, so c - r = d - (k0-q0).
  off = k0 - q0
  return Band(None if a == dmin else a - off, None if b == dmax else b - off)


def _trim(q0, q1, k0, k1, band: Band) -> Call:
  """Drops rows and columns with nothing visible from a call.

  Afterwards ``lo <= 0 <= hi`` (when bounded): every mask is a plain
  ``Causal(offset >= 0)`` / ``LocalWindow(left, right)`` that any kernel
  supports, and the kernel's grid covers no empty edge.
  """
  lo, hi = band.lo, band.hi
  if hi is not None and hi < 0:  # leading rows see no column
    q0, lo, hi = q0 - hi, (None if lo is None else lo - hi), 0
  if lo is not None and lo > 0:  # leading columns seen by no row
    k0, hi, lo = k0 + lo, (None if hi is None else hi - lo), 0
  rows, cols = q1 - q0, k1 - k0
  if lo is not None:  # trailing rows: r + lo > cols - 1
    q1 = q0 + min(rows, cols - lo)
  if hi is not None:  # trailing columns: c > rows - 1 + hi
    k1 = k0 + min(cols, (q1 - q0) - 1 + hi + 1)
  return Call(q0, q1, k0, k1, _normalise(Band(lo, hi).shift(0), 0, q1 - q0,
                                         0, k1 - k0))


def _plan_pair(band: Band, qpieces, kpieces) -> tuple[Call, ...]:
  """Fewest calls covering every visible (query piece, key piece) exactly.

  Tries one call for everything, then one per query piece, one per key
  piece, then one per pair; a group of pieces fits in one call when a single
  band, shifted into local coordinates, reproduces every pair's visibility
  (empty pairs included) over the group's bounding rectangle.
  """
  nq, nk = len(qpieces), len(kpieces)
  true = {}
  for a in range(nq):
    for b in range(nk):
      q0, _, ql = qpieces[a]
      k0, _, kl = kpieces[b]
      lb = _piece_band(band, qpieces[a], kpieces[b])
      rect = (q0, q0 + ql, k0, k0 + kl)
      true[a, b] = (lb, rect, lb.clip(*_diag_range(*rect)))

  def group_call(cells):
    live = [c for c in cells if true[c][2] is not None]
    if not live:
      return ()
    a0, a1 = min(a for a, _ in live), max(a for a, _ in live)
    b0, b1 = min(b for _, b in live), max(b for _, b in live)
    box = [(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1)]
    if any(c not in cells for c in box):
      return None
    candidates = [true[c][0] for c in live] + [Band()]
    for cand in candidates:
      if all(cand.clip(*_diag_range(*true[c][1])) == true[c][2]
             for c in box):
        q0, q1 = qpieces[a0][0], qpieces[a1][0] + qpieces[a1][2]
        k0, k1 = kpieces[b0][0], kpieces[b1][0] + kpieces[b1][2]
        nb = _normalise(cand, q0, q1, k0, k1)
        return (_trim(q0, q1, k0, k1, nb),)
    return None

  all_cells = [(a, b) for a in range(nq) for b in range(nk)]
  partitions = [
      [all_cells],
      [[(a, b) for b in range(nk)] for a in range(nq)],
      [[(a, b) for a in range(nq)] for b in range(nk)],
      [[c] for c in all_cells],
  ]
  best = None
  for part in partitions:
    calls = []
    for cells in part:
      got = group_call(cells)
      if got is None:
        break
      calls.extend(got)
    else:
      if best is None or len(calls) < len(best):
        best = calls
  return tuple(sorted(best, key=lambda c: (c.q0, c.k0)))


def visible_count(call: Call) -> int:
  """Number of visible (query, key) pairs in a call."""
  rows = np.arange(call.q1 - call.q0, dtype=np.int64)[:, None]
  width = call.k1 - call.k0
  lo = np.zeros_like(rows) if call.band.lo is None else np.clip(
      rows + call.band.lo, 0, width)
  hi = np.full_like(rows, width - 1) if call.band.hi is None else np.clip(
      rows + call.band.hi, -1, width - 1)
  return int(np.maximum(hi - lo + 1, 0).sum())


@dataclasses.dataclass(frozen=True)
class Step:
  """Ring step ``s``: device d holds the keys of device (d - s) % n.

  ``branches`` are the distinct call lists; device d runs
  ``branches[table[d]]``.
  """
  s: int
  branches: tuple[tuple[Call, ...], ...]
  table: tuple[int, ...]


@functools.lru_cache(maxsize=512)
def ring_schedule(qlay: Layout, klay: Layout, band: Band) -> tuple[Step, ...]:
  """The ring steps that any device needs (steps nobody needs are dropped)."""
  n = qlay.n
  steps = []
  for s in range(n):
    plans = []
    for d in range(n):
      j = (d - s) % n
      plans.append(_plan_pair(band, qlay.pieces(d), klay.pieces(j)))
    if not any(plans):
      continue
    branches = tuple(dict.fromkeys(plans))
    table = tuple(branches.index(p) for p in plans)
    steps.append(Step(s, branches, table))
  return tuple(steps)


@functools.lru_cache(maxsize=512)
def all_gather_calls(qlay: Layout, kv_len: int, band: Band):
  """Per device: calls of its queries against all keys in original order."""
  kpieces = ((0, 0, kv_len),)
  plans = [_plan_pair(band, qlay.pieces(d), kpieces) for d in range(qlay.n)]
  branches = tuple(dict.fromkeys(plans))
  return branches, tuple(branches.index(p) for p in plans)


def device_work(qlay: Layout, klay: Layout, band: Band) -> list[int]:
  """Visible pairs each device computes over the whole ring."""
  work = [0] * qlay.n
  for step in ring_schedule(qlay, klay, band):
    for d in range(qlay.n):
      work[d] += sum(visible_count(c) for c in step.branches[step.table[d]])
  return work
