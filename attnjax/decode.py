"""``attnjax.decode_attention``: a few new queries against a KV cache.

Decoding attends one (or a few speculative) query tokens per sequence to a
cache of which only the first ``kv_lengths[b]`` entries are filled. The work is
memory bound (every cache byte is read once), so the useful parallelism is
over the cache: the ``"xla_split"`` implementation splits the cache into
``num_splits`` chunks, computes a partial output and log-sum-exp per chunk and
merges them (Flash-Decoding's split-K). ``"xla"`` is the direct form.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["decode_attention"]


def _validate(query, k_cache, v_cache, kv_lengths, sinks, local_window_size,
              logits_soft_cap):
  q = jnp.asarray(query)
  if q.ndim not in (3, 4):
    raise ValueError(f"query must be [B, N, H] or [B, Tq, N, H], got shape "
                     f"{q.shape}")
  k, v = jnp.asarray(k_cache), jnp.asarray(v_cache)
  if k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"k_cache and v_cache must be [B, S_max, K, H], got "
                     f"{k.shape} and {v.shape}")
  single = q.ndim == 3
  q4 = q[:, None] if single else q
  b, tq, n, h = q4.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"k_cache/v_cache batch must be {b}, got {k.shape[0]} "
                     f"and {v.shape[0]}")
  if k.shape[3] != h:
    raise ValueError(f"k_cache head dim {k.shape[3]} != query head dim {h}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v_cache shape {v.shape} does not match k_cache "
                     f"{k.shape} in [B, S_max, K]")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of cache heads "
                     f"K={k.shape[2]}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"query, k_cache and v_cache must share a dtype, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  lengths = jnp.asarray(kv_lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape != (b,):
    raise ValueError(f"kv_lengths must be an int array of shape ({b},), got "
                     f"{lengths.dtype} {lengths.shape}")
  if sinks is not None and jnp.shape(sinks) != (n,):
    raise ValueError(f"sinks must have shape ({n},), got {jnp.shape(sinks)}")
  if local_window_size is not None:
    if isinstance(local_window_size, (int, np.integer)):
      local_window_size = (local_window_size, local_window_size)
    if (len(local_window_size) != 2
        or any(w is not None and w < 0 for w in local_window_size)):
      raise ValueError(f"local_window_size must be (left >= 0, right >= 0), "
                       f"got {local_window_size!r}")
  if logits_soft_cap is not None and not (
      isinstance(logits_soft_cap, numbers.Real) and logits_soft_cap > 0):
    raise ValueError(f"logits_soft_cap must be a positive number, got "
                     f"{logits_soft_cap!r}")
  return q4, k, v, lengths.astype(jnp.int32), single, local_window_size


def _partial(q, k, v, vis, scale, sinks, soft_cap):
  """(unnormalised acc, running max, denom) for one cache chunk.

  q [B, Tq, K, G, H]; k/v [B, C, K, H|Hv]; vis [B, Tq, C] bool.
  """
  x = jnp.einsum("btkgh,bckh->bkgtc", q, k, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST
                 if q.dtype == jnp.float32 else None) * scale
  if soft_cap is not None:
    x = soft_cap * jnp.tanh(x / soft_cap)
  x = jnp.where(vis[:, None, None], x, -jnp.inf)
  m = x.max(-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(x - m_safe[..., None])
  acc = jnp.einsum("bkgtc,bckv->bkgtv", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return acc, m, p.sum(-1)


def decode_attention(query, k_cache, v_cache, *, kv_lengths, scale=None,
                     local_window_size=None, sinks=None, logits_soft_cap=None,
                     num_splits: int | None = None, implementation=None):
  """Attention of new tokens over a KV cache.

  Query token ``t`` of ``Tq`` sits at position ``kv_lengths[b] - Tq + t``
  (the cache already holds the new tokens' keys); it sees cache entries at or
  before its position (and within ``local_window_size`` if given).

  Args:
    query: [B, N, H] (one token) or [B, Tq, N, H] (a few speculative tokens).
    k_cache: [B, S_max, K, H].
    v_cache: [B, S_max, K, Hv].
    kv_lengths: int [B]: filled cache entries per sequence.
    scale: logit scale, default 1/sqrt(H).
    local_window_size: ``(left, right)`` or an int, as in
      ``dot_product_attention``.
    sinks: float [N] sink logits.
    logits_soft_cap: c > 0 caps logits at ``c * tanh(x / c)``.
    num_splits: cache chunks for ``"xla_split"`` (default: ~S_max / 512).
    implementation: None | "xla" | "xla_split".

  Returns:
    [B, N, Hv] (or [B, Tq, N, Hv]) in the query dtype.

  Example:

  >>> import jax, jax.numpy as jnp, attnjax
  >>> q = jnp.ones((2, 4, 16))
  >>> cache = jax.random.normal(jax.random.key(0), (2, 64, 2, 16))
  >>> attnjax.decode_attention(q, cache, cache,
  ...                          kv_lengths=jnp.array([10, 64])).shape
  (2, 4, 16)
  """
  q, k, v, lengths, single, window = _validate(
      query, k_cache, v_cache, kv_lengths, sinks, local_window_size,
      logits_soft_cap)
  if implementation not in (None, "xla", "xla_split"):
    raise ValueError(f"implementation must be None, 'xla' or 'xla_split', "
                     f"got {implementation!r}")
  b, tq, n, h = q.shape
  s_max, kh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kh
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  q5 = q.reshape(b, tq, kh, g, h)
  pos = lengths[:, None] - tq + jnp.arange(tq)[None, :]  # [B, Tq]

  def visible(start, size):
    j = start + jnp.arange(size)[None, None, :]
    vis = (j <= pos[..., None]) & (j < lengths[:, None, None])
    if window is not None:
      left, right = window
      if left is not None:
        vis &= j >= pos[..., None] - left
      if right is not None:
        vis &= j <= pos[..., None] + right
    return vis

  if implementation == "xla":
    splits = 1
  else:
    splits = num_splits or max(1, s_max // 512)
    splits = max(1, min(splits, s_max))
  chunk = -(-s_max // splits)
  pad = chunk * splits - s_max
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  kc = k.reshape(b, splits, chunk, kh, h)
  vc = v.reshape(b, splits, chunk, kh, hv)
  vis = jnp.stack([visible(i * chunk, chunk) for i in range(splits)], 1)
  acc, m, l = jax.vmap(
      lambda kk, vv, vi: _partial(q5, kk, vv, vi, scale, sinks,
                                  logits_soft_cap),
      in_axes=(1, 1, 1), out_axes=0)(kc, vc, vis)
  # LSE merge of the per-split partial results.
  m_all = m.max(0)
  if sinks is not None:
    m_all = jnp.maximum(m_all, sinks.astype(jnp.float32).reshape(
        1, kh, g, 1))
  m_all = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_all), m_all, 0.0))
  w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_all), 0.0)
  denom = (w * l).sum(0)
  if sinks is not None:
    denom = denom + jnp.exp(sinks.astype(jnp.float32).reshape(1, kh, g, 1)
                            - m_all)
  num = (w[..., None] * acc).sum(0)
  out = num / jnp.where(denom > 0, denom, 1.0)[..., None]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n, hv).astype(q.dtype)
  return out[:, 0] if single else out
