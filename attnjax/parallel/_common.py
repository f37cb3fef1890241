"""Helpers shared by the strategies: validation of local shards, varying
types under ``shard_map``, zigzag reordering and chunk permutations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.parallel._plan import Band, band_from_flags
from attnjax.softmax.problem import make_problem

__all__ = ["LocalProblem", "axis_size", "filled", "from_zigzag",
           "hashable_impl", "kv_head_replicas", "reorder_chunks", "shift",
           "to_zigzag", "vary", "vary_all", "vma", "zigzag_order"]


def axis_size(axis_name) -> int:
  try:
    return int(lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
        f"axis_name {axis_name!r} is not a mapped axis here: call this "
        "function inside jax.shard_map over that mesh axis (or use "
        "attnjax.parallel.sequence_parallel_attention on global arrays)"
    ) from e


def vma(*xs) -> frozenset:
  """Manual axes over which any of xs varies (inside shard_map)."""
  out = frozenset()
  for x in xs:
    if x is None:
      continue
    mat = getattr(jax.typeof(x), "mat", None)
    if mat is not None:
      out |= frozenset(mat.varying)
  return out


def vary(x, axes: frozenset):
  """x marked as varying over ``axes`` (lax.switch/scan need equal types)."""
  if x is None:
    return None
  have = vma(x)
  missing = tuple(a for a in axes if a not in have)
  return lax.pcast(x, missing, to="varying") if missing else x


def filled(ref, shape, fill, dtype):
  """``shape`` filled with ``fill``, typed like ``ref`` along the batch axis.

  ``ref``'s leading (batch) axis keeps its sharding type (an Explicit "data"
  axis left automatic by the caller's shard_map) and its varying axes.
  """
  col = jnp.zeros_like(ref, dtype=dtype)[(slice(None),) +
                                           (0,) * (ref.ndim - 1)]
  col = col.reshape((shape[0],) + (1,) * (len(shape) - 1))
  return jnp.broadcast_to(col + jnp.asarray(fill, dtype), shape)


def vary_all(tree, axis_name):
  """Every array leaf varying over ``axis_name`` and over every manual axis
  any leaf varies over (the operands of a per-device ``lax.switch``)."""
  axes = vma(*jax.tree.leaves(tree)) | {axis_name}
  return jax.tree.map(lambda x: vary(x, axes), tree)


def shift(tree, axis_name, n: int, m: int):
  """Device i sends to i + m (mod n): afterwards device d holds what device
  d - m held."""
  m %= n
  if m == 0:
    return tree
  perm = [(i, (i + m) % n) for i in range(n)]
  return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), tree)


class LocalProblem:
  """Validated local shards (batched) and the static options."""

  def __init__(self, query, key, value, *, is_causal, segment_ids,
               local_window_size, sinks, logits_soft_cap, scale):
    p, self.unbatched = make_problem(
        query, key, value, is_causal=is_causal, segment_ids=segment_ids,
        local_window_size=local_window_size, sinks=sinks,
        logits_soft_cap=logits_soft_cap, scale=scale)
    self.q, self.k, self.v = p.q, p.k, p.v
    self.q_seg, self.kv_seg = p.q_segment_ids, p.kv_segment_ids
    self.sinks = p.sinks
    self.scale = p.scale
    self.soft_cap = p.logits_soft_cap
    self.is_causal = bool(is_causal)
    self.local_window_size = local_window_size
    self.band: Band = band_from_flags(is_causal, local_window_size)

  def finish(self, out):
    return out[0] if self.unbatched else out


def hashable_impl(implementation):
  if implementation is None or isinstance(implementation, str):
    return implementation
  return tuple(implementation)


# Zigzag ------------------------------------------------------------------
#
# Contiguous: device d holds chunks (2d, 2d+1) of 2n chunks. Zigzag: device d
# holds (d, 2n-1-d). Exactly one of a zigzag device's two chunks is even, so
# routing "the even chunk" and "the odd chunk" are each a permutation of the
# devices: two collective-permutes of half a shard each, either way.


def _zig_owner(k: int, n: int) -> int:
  return k if k < n else 2 * n - 1 - k


def _halves(x, axis):
  h = x.shape[axis] // 2
  return (lax.slice_in_dim(x, 0, h, axis=axis),
          lax.slice_in_dim(x, h, 2 * h, axis=axis))


def to_zigzag(x, axis_name, *, axis: int = 1):
  """Local contiguous shard -> local zigzag shard (inside shard_map).

  ``x``'s ``axis`` (length L/n) holds positions [d L/n, (d+1) L/n); the
  result holds chunks d and 2n-1-d of length L/(2n).
  """
  if x is None:
    return None
  n = axis_size(axis_name)
  if n == 1:
    return x
  even, odd = _halves(x, axis)  # chunks 2d and 2d+1
  r_even = lax.ppermute(even, axis_name,
                        [(d, _zig_owner(2 * d, n)) for d in range(n)])
  r_odd = lax.ppermute(odd, axis_name,
                       [(d, _zig_owner(2 * d + 1, n)) for d in range(n)])
  # Device t's first chunk is t: even t got it through r_even.
  t_even = lax.axis_index(axis_name) % 2 == 0
  a = jnp.concatenate([r_even, r_odd], axis)
  b = jnp.concatenate([r_odd, r_even], axis)
  return jnp.where(t_even, a, b)


def from_zigzag(x, axis_name, *, axis: int = 1):
  """Inverse of ``to_zigzag``."""
  if x is None:
    return None
  n = axis_size(axis_name)
  if n == 1:
    return x
  first, second = _halves(x, axis)  # chunks t and 2n-1-t
  t_even = lax.axis_index(axis_name) % 2 == 0
  even = jnp.where(t_even, first, second)
  odd = jnp.where(t_even, second, first)
  # Even chunk e of zigzag device t is t (t even) or 2n-1-t (t odd).
  e = [t if t % 2 == 0 else 2 * n - 1 - t for t in range(n)]
  o = [2 * n - 1 - t if t % 2 == 0 else t for t in range(n)]
  r_even = lax.ppermute(even, axis_name, [(t, e[t] // 2) for t in range(n)])
  r_odd = lax.ppermute(odd, axis_name, [(t, o[t] // 2) for t in range(n)])
  return jnp.concatenate([r_even, r_odd], axis)


def zigzag_order(n: int) -> np.ndarray:
  """Chunk order of a zigzag-sharded sequence, read device by device."""
  return np.array([c for d in range(n) for c in (d, 2 * n - 1 - d)])


def reorder_chunks(x, order, *, axis: int = 1):
  """Chunks of ``x`` along ``axis`` taken in ``order`` (a static list)."""
  if x is None:
    return x
  parts = len(order)
  c = x.shape[axis] // parts
  pieces = [lax.slice_in_dim(x, i * c, (i + 1) * c, axis=axis)
            for i in order]
  return jnp.concatenate(pieces, axis)


def kv_head_replicas(num_heads: int, num_kv_heads: int, n: int) -> int:
  """Copies of each kv head so that kv heads split evenly over n devices
  and still divide the query heads (Ulysses with GQA/MQA)."""
  want = math.lcm(num_kv_heads, n)
  if num_heads % want:
    raise NotImplementedError(
        f"ulysses needs the query heads (N={num_heads}) to split over the "
        f"{n} devices together with the key/value heads (K={num_kv_heads}); "
        f"N must be a multiple of lcm(K, devices)={want}")
  return want // num_kv_heads
