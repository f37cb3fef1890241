"""Materialised softmax attention: the specification every flash kernel meets.

Plain ``jax.numpy`` with float32 accumulation, no tiling and no custom VJP, so
``jax.grad`` of this function is an independent oracle for the hand-written
backward passes. It shares no code with the kernels.

Layout letters follow ``jax.nn.dot_product_attention``: B batch, T query length,
S key/value length, N query heads, K key/value heads (N % K == 0), H head dim,
Hv value head dim. Query head ``n`` reads key/value head ``n // (N // K)``.

Semantics fixed here (and met by every kernel):

* ``logits = scale * q @ k.T (+ bias)``, then ``cap * tanh(logits / cap)`` when
  ``logits_soft_cap`` is set, then masking.
* ``sinks[n]`` adds ``exp(sinks[n])`` to the softmax denominator of every row of
  head ``n`` with no value attached.
* A query row with no visible key returns zeros (and ``lse = -inf`` unless a
  sink is present); its gradients are zero, never NaN.
* Rows ``t >= q_lengths[b]`` return zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention_reference", "visibility"]


def visibility(
    batch: int,
    num_heads: int,
    q_len: int,
    kv_len: int,
    *,
    mask=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_lengths=None,
    kv_lengths=None,
):
  """Dense boolean [B, N|1, T, S] visibility from the dynamic mask inputs."""
  vis = jnp.ones((1, 1, q_len, kv_len), bool)
  if mask is not None:
    vis = vis & mask
  if q_segment_ids is not None:
    vis = vis & (q_segment_ids[:, None, :, None]
                 == kv_segment_ids[:, None, None, :])
  if q_lengths is not None:
    vis = vis & (jnp.arange(q_len)[None, None, :, None]
                 < q_lengths[:, None, None, None])
  if kv_lengths is not None:
    vis = vis & (jnp.arange(kv_len)[None, None, None, :]
                 < kv_lengths[:, None, None, None])
  return jnp.broadcast_to(vis, (batch, vis.shape[1] if vis.shape[1] == 1
                                else num_heads, q_len, kv_len))


def attention_reference(
    q,
    k,
    v,
    bias=None,
    mask=None,
    *,
    scale: float,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_lengths=None,
    kv_lengths=None,
    sinks=None,
    logits_soft_cap: float | None = None,
):
  """Softmax attention, materialising the [B, N, T, S] logits.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys.
    v: [B, S, K, Hv] values.
    bias: optional float array broadcastable to [B, N, T, S].
    mask: optional bool array broadcastable to [B, N, T, S]; True = visible.
    scale: logit scale.
    q_segment_ids: optional int [B, T]; with ``kv_segment_ids`` int [B, S].
    q_lengths: optional int [B]; rows at or past it are zeroed.
    kv_lengths: optional int [B]; keys at or past it are invisible.
    sinks: optional float [N] sink logits.
    logits_soft_cap: optional positive float.

  Returns:
    ``(out, lse)``: out [B, T, N, Hv] in q's dtype, lse float32 [B, N, T].
  """
  b, t, n, _ = q.shape
  _, s, kh, hv = v.shape
  g = n // kh
  f32 = jnp.float32
  qf = q.astype(f32).reshape(b, t, kh, g, -1)
  logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(f32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  logits = logits.reshape(b, n, t, s)
  if bias is not None:
    logits = logits + bias.astype(f32)
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  vis = visibility(b, n, t, s, mask=mask, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
                   kv_lengths=kv_lengths)
  logits = jnp.where(vis, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(f32)[None, :, None], row_max.shape)
    row_max = jnp.maximum(row_max, sink)
  # A row with nothing visible has max -inf; shift by 0 there so no inf - inf.
  row_max = jax.lax.stop_gradient(
      jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.exp(logits - row_max[..., None])
  denom = jnp.sum(p, axis=-1)
  if sinks is not None:
    denom = denom + jnp.exp(sink - row_max)
  safe = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskv->btkgv", (p / safe[..., None]).reshape(
      b, kh, g, t, s), v.astype(f32), precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(b, t, n, hv)
  lse = jnp.where(denom > 0, jnp.log(safe) + row_max, -jnp.inf)
  if q_lengths is not None:
    valid = jnp.arange(t)[None, :] < q_lengths[:, None]
    out = jnp.where(valid[:, :, None, None], out, 0.0)
    lse = jnp.where(valid[:, None, :], lse, -jnp.inf)
  return out.astype(q.dtype), lse
