"""The canonical, validated form of a softmax-attention request.

``attnjax.dot_product_attention`` turns its ``jax.nn``-style arguments into one
``Problem``: batched 4-D arrays, one static ``Mask`` object (``is_causal``,
``local_window_size`` and user masks combined), and the dynamic mask inputs
kept apart as arrays. Every backend takes a ``Problem`` and returns
``(out, lse)``; a backend that cannot serve it raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib

__all__ = ["Problem", "make_problem"]


@dataclasses.dataclass(frozen=True)
class Problem:
  """A validated attention request (batched; see module docstring).

  Attributes:
    q: [B, T, N, H].
    k: [B, S, K, H].
    v: [B, S, K, Hv].
    bias: float [B|1, N|1, T|1, S|1] or None.
    mask_array: bool [B|1, N|1, T|1, S|1] or None (True = visible).
    mask: static ``attnjax.masks.Mask`` or None.
    q_segment_ids: int32 [B, T] or None (then kv_segment_ids is None too).
    kv_segment_ids: int32 [B, S] or None.
    q_lengths: int32 [B] or None.
    kv_lengths: int32 [B] or None.
    sinks: float [N] or None.
    scale: python float.
    logits_soft_cap: python float or None.
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  bias: jax.Array | None = None
  mask_array: jax.Array | None = None
  mask: masks_lib.Mask | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  q_lengths: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  sinks: jax.Array | None = None
  scale: float = 1.0
  logits_soft_cap: float | None = None

  @property
  def shape(self):
    """(B, T, S, N, K, H, Hv)."""
    b, t, n, h = self.q.shape
    s, kh, hv = self.k.shape[1], self.k.shape[2], self.v.shape[3]
    return b, t, s, n, kh, h, hv

  def replace(self, **kw) -> Problem:
    return dataclasses.replace(self, **kw)

  def dense_mask(self) -> jax.Array | None:
    """The static mask and ``mask_array`` as one bool [B|1, N|1, T, S] array."""
    _, t, s, _, _, _, _ = self.shape
    dense = self.mask_array
    if self.mask is not None:
      m = self.mask.as_array(t, s)
      m = m[None, None] if m.ndim == 2 else m[None]
      dense = m if dense is None else dense & m
    return dense


def _is_array_like(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number,
                        list, tuple)) or hasattr(x, "__jax_array__")


def _to_4d(x, name: str, dims: tuple[int, int, int, int]):
  """Prepend unit axes to rank<=4 x and check it broadcasts to dims."""
  x = jnp.asarray(x)
  if x.ndim > 4 or x.ndim < 2:
    raise ValueError(f"{name} must have rank 2 to 4 (broadcastable to "
                     f"[B, N, T, S]={list(dims)}), got shape {x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for size, want, letter in zip(x.shape, dims, "BNTS"):
    if size not in (1, want):
      raise ValueError(
          f"{name} of shape {x.shape} does not broadcast to [B, N, T, S]="
          f"{list(dims)} (axis {letter})")
  return x


def _int_array(x, name: str, shape: tuple[int, ...]):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  if x.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
  return x.astype(jnp.int32)


def _window_mask(local_window_size) -> masks_lib.Mask:
  if isinstance(local_window_size, (int, np.integer)):
    local_window_size = (local_window_size, local_window_size)
  if (not isinstance(local_window_size, Sequence)
      or len(local_window_size) != 2
      or not all(isinstance(w, (int, np.integer)) or w is None
                 for w in local_window_size)):
    raise ValueError("local_window_size must be an int or a (left, right) "
                     f"pair of ints, got {local_window_size!r}")
  left, right = local_window_size
  for side, w in (("left", left), ("right", right)):
    if w is not None and w < 0:
      raise ValueError(
          f"local_window_size {side} size must be >= 0, got {w}")
  return masks_lib.LocalWindow(left, right)


def make_problem(
    query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
    query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
    segment_ids=None, sinks=None, logits_soft_cap=None,
) -> tuple[Problem, bool]:
  """Validates ``dot_product_attention`` arguments.

  Returns:
    ``(problem, unbatched)``.

  Raises:
    ValueError: naming the offending argument.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not _is_array_like(x):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if q.ndim not in (3, 4):
    raise ValueError(f"query must have rank 4 [B, T, N, H] or 3 [T, N, H], "
                     f"got shape {q.shape}")
  for name, x in (("key", k), ("value", v)):
    if x.ndim != q.ndim:
      raise ValueError(f"{name} must have the same rank as query ({q.ndim}), "
                       f"got shape {x.shape}")
  unbatched = q.ndim == 3
  if unbatched:
    q, k, v = q[None], k[None], v[None]
  for name, x in (("query", q), ("key", k), ("value", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"query, key and value must share a dtype, got "
                     f"query {q.dtype}, key {k.dtype}, value {v.dtype}")
  b, t, n, h = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"key and value batch must equal query batch {b}, got "
                     f"key {k.shape}, value {v.shape}")
  if k.shape[3] != h:
    raise ValueError(f"key head dim {k.shape[3]} must equal query head dim "
                     f"{h}")
  if v.shape[1] != k.shape[1]:
    raise ValueError(f"value length {v.shape[1]} must equal key length "
                     f"{k.shape[1]}")
  if v.shape[2] != k.shape[2]:
    raise ValueError(f"value heads {v.shape[2]} must equal key heads "
                     f"{k.shape[2]}")
  s, kh = k.shape[1], k.shape[2]
  if kh == 0 or n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of key/value "
                     f"heads K={kh}")
  if 0 in (t, s, h, v.shape[3]):
    raise ValueError(f"empty dimension in query {q.shape}, key {k.shape} or "
                     f"value {v.shape}")
  dims = (b, n, t, s)

  def add_batch(x):
    return None if x is None else (x[None] if unbatched else x)

  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point, got {bias.dtype}")
    if unbatched and bias.ndim == 4:
      raise ValueError("bias must have rank <= 3 for unbatched inputs, got "
                       f"shape {bias.shape}")
    bias = _to_4d(bias, "bias", dims)

  static_mask = None
  mask_array = None
  if isinstance(mask, masks_lib.Mask):
    static_mask = mask
  elif mask is not None:
    mask_array = jnp.asarray(mask)
    if mask_array.dtype != jnp.bool_:
      raise ValueError(f"mask must be a boolean array (True = visible) or an "
                       f"attnjax.masks.Mask; got dtype {mask_array.dtype}. "
                       "Pass additive masks as bias.")
    if unbatched and mask_array.ndim == 4:
      raise ValueError("mask must have rank <= 3 for unbatched inputs, got "
                       f"shape {mask_array.shape}")
    mask_array = _to_4d(mask_array, "mask", dims)
  if static_mask is not None and static_mask.num_heads not in (1, n):
    raise ValueError(f"mask distinguishes {static_mask.num_heads} heads but "
                     f"query has N={n}")

  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
  parts = []
  if is_causal:
    parts.append(masks_lib.Causal())
  if local_window_size is not None:
    parts.append(_window_mask(local_window_size))
  if static_mask is not None:
    parts.append(static_mask)
  combined = None
  for part in parts:
    combined = part if combined is None else combined & part

  q_lengths = kv_lengths = None
  if query_seq_lengths is not None:
    q_lengths = _int_array(add_batch(jnp.asarray(query_seq_lengths)),
                           "query_seq_lengths", (b,))
  if key_value_seq_lengths is not None:
    kv_lengths = _int_array(add_batch(jnp.asarray(key_value_seq_lengths)),
                            "key_value_seq_lengths", (b,))

  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be an int array [B, T] or a pair "
                         "(q_ids [B, T], kv_ids [B, S])")
      q_seg = _int_array(add_batch(jnp.asarray(segment_ids[0])),
                         "segment_ids[0] (query ids)", (b, t))
      kv_seg = _int_array(add_batch(jnp.asarray(segment_ids[1])),
                          "segment_ids[1] (key/value ids)", (b, s))
    else:
      if t != s:
        raise ValueError(f"segment_ids as one array needs T == S (got T={t}, "
                         f"S={s}); pass (q_ids, kv_ids) for cross attention")
      q_seg = _int_array(add_batch(jnp.asarray(segment_ids)), "segment_ids",
                         (b, t))
      kv_seg = q_seg

  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
      raise ValueError(f"sinks must be floating point, got {sinks.dtype}")
    if sinks.shape != (n,):
      raise ValueError(f"sinks must have shape [N]=({n},), got {sinks.shape}")

  if logits_soft_cap is not None:
    if (not isinstance(logits_soft_cap, numbers.Real)
        or not logits_soft_cap > 0):
      raise ValueError(f"logits_soft_cap must be a positive number, got "
                       f"{logits_soft_cap!r}")
    logits_soft_cap = float(logits_soft_cap)

  if scale is None:
    scale = 1.0 / float(np.sqrt(h))
  elif not isinstance(scale, numbers.Real):
    raise ValueError(f"scale must be a python number, got {scale!r}")
  scale = float(scale)

  problem = Problem(
      q=q, k=k, v=v, bias=bias, mask_array=mask_array, mask=combined,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_lengths=q_lengths,
      kv_lengths=kv_lengths, sinks=sinks, scale=scale,
      logits_soft_cap=logits_soft_cap)
  return problem, unbatched
