"""``attnjax.nn.MultiHeadAttention``: causal self-attention with a KV cache.

A thin NNX module: it owns the projections (and the optional RoPE, QK-norm,
sink logits and output gate) and hands the attention itself to
``attnjax.dot_product_attention`` (or, when the layer is set up for a device
mesh, to ``attnjax.parallel.sequence_parallel_attention``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import decode as decode_lib
from attnjax.nn.layers import RMSNorm, ShortConv, apply_rope
from attnjax.softmax import api

__all__ = ["KVCache", "MultiHeadAttention", "SequenceParallel"]


class KVCache(NamedTuple):
  """Decoding state of one attention layer.

  Attributes:
    key: [B, S_max, K, H] keys (RoPE already applied).
    value: [B, S_max, K, Hv].
    lengths: int32 [B], the number of positions written so far.
    conv: [B, kernel_size - 1, C] the short convolution's last inputs, or
      None without one.
  """
  key: jax.Array
  value: jax.Array
  lengths: jax.Array
  conv: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  """Static description of a sequence-sharded run (see attnjax.models.mesh).

  Attributes:
    mesh: the ``jax.sharding.Mesh``.
    axis_name: the mesh axis the sequence is split over.
    strategy: forwarded to ``attnjax.parallel.sequence_parallel_attention``.
  """
  mesh: Any
  axis_name: str = "seq"
  strategy: str = "auto"


def _window_left(local_window_size) -> int | None:
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (tuple, list)):
    if len(local_window_size) != 2:
      raise ValueError("local_window_size must be an int or (left, right), "
                       f"got {local_window_size!r}")
    local_window_size = local_window_size[0]
  if not isinstance(local_window_size, int) or local_window_size < 0:
    raise ValueError("local_window_size must be a non-negative int, got "
                     f"{local_window_size!r}")
  return local_window_size


def _grouped_logits(q, k, scale):
  """float32 [B, N, T, S] logits; k's K heads shared by N // K query heads."""
  n, kh = q.shape[2], k.shape[2]
  k = jnp.repeat(k, n // kh, axis=2)
  return jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32),
                    k.astype(jnp.float32)) * scale


def _visible(q_pos, kv_pos, left):
  """bool [B, 1, T, S]: causal (key at or before the query), in the window."""
  vis = kv_pos[:, None, :] <= q_pos[:, :, None]
  if left is not None:
    vis &= kv_pos[:, None, :] >= q_pos[:, :, None] - left
  return vis[:, None]


class MultiHeadAttention(nnx.Module):
  """Causal multi-head self-attention (GQA, RoPE, QK-norm, sinks, gate).

  ``layer(x)`` runs the whole sequence. ``cache = layer.init_cache(B,
  max_length)`` and ``y, cache = layer.decode(x_new, cache)`` run prefill
  (several tokens at once) and token-by-token decoding; the concatenated
  decode outputs equal ``layer(x)`` on the whole sequence.

  Args:
    in_features: model width D (also the output width unless
      ``out_features``).
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0); default N.
    head_dim: H; default D // N.
    rope: rotary position embedding on q and k.
    qk_norm: RMSNorm over the head dim of q and k (shared across heads).
    sinks: a learned per-head sink logit (StreamingLLM / gpt-oss): the
      softmax denominator gains ``exp(sink)`` with no value attached.
    output_gate: the head-specific, query-dependent sigmoid gate on the
      attention output of "Gated Attention for Large Language Models"
      (arXiv:2505.06708): ``o * sigmoid(x W_g)``.
    local_window_size: sliding window: a query sees itself and the
      ``local_window_size`` keys before it. ``None``: full causal attention.
    implementation: forwarded to ``attnjax.dot_product_attention``.
    normalization: ``"softmax"`` or ``"sigmoid"`` (Sigmoid Self-Attention,
      arXiv:2409.04431: weights ``sigmoid(logit + sigmoid_bias)``, no row
      normalisation; materialised O(T * S), for experiments).
    sigmoid_bias: the bias b of sigmoid attention (that paper uses
      ``-log(sequence length)``).
    short_conv: kernel size of a causal depthwise convolution over time on
      the q, k, v projections (Primer's "multi-DConv-head attention",
      arXiv:2109.08668); None: none.
    out_features: output width; default ``in_features``.
    dtype: computation dtype (default: the input's); params in
      ``param_dtype``.
    rngs: ``nnx.Rngs`` for the initialisers.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import attnjax.nn
  >>> layer = attnjax.nn.MultiHeadAttention(
  ...     in_features=32, num_heads=4, num_kv_heads=2, rope=True,
  ...     rngs=nnx.Rngs(0))
  >>> x = jnp.ones((2, 10, 32))
  >>> y = layer(x)
  >>> cache = layer.init_cache(2, 16)
  >>> y1, cache = layer.decode(x[:, :6], cache)   # prefill
  >>> y2, cache = layer.decode(x[:, 6:7], cache)  # one token
  >>> y.shape, y1.shape, y2.shape
  ((2, 10, 32), (2, 6, 32), (2, 1, 32))
  """

  def __init__(self, *, in_features: int, num_heads: int,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               rope: bool = False, rope_base: float = 10000.0,
               qk_norm: bool = False, sinks: bool = False,
               output_gate: bool = False,
               local_window_size: int | None = None,
               implementation=None, normalization: str = "softmax",
               sigmoid_bias: float = 0.0, short_conv: int | None = None,
               out_features: int | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a positive multiple "
                       f"of num_kv_heads ({num_kv_heads})")
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(f"in_features ({in_features}) must be divisible by "
                         f"num_heads ({num_heads}) unless head_dim is given")
      head_dim = in_features // num_heads
    if rope and head_dim % 2:
      raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    if normalization not in ("softmax", "sigmoid"):
      raise ValueError("normalization must be 'softmax' or 'sigmoid', got "
                       f"{normalization!r}")
    if normalization == "sigmoid" and sinks:
      raise ValueError("sinks apply to softmax normalization only")
    self.in_features = in_features
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope = rope
    self.rope_base = rope_base
    self.window_left = _window_left(local_window_size)
    self.implementation = (tuple(implementation)
                           if isinstance(implementation, list)
                           else implementation)
    self.normalization = normalization
    self.sigmoid_bias = float(sigmoid_bias)
    self.dtype = dtype
    self.sequence_parallel: SequenceParallel | None = None
    out_features = in_features if out_features is None else out_features
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.q_proj = lin(in_features, num_heads * head_dim)
    self.k_proj = lin(in_features, num_kv_heads * head_dim)
    self.v_proj = lin(in_features, num_kv_heads * head_dim)
    self.o_proj = lin(num_heads * head_dim, out_features)
    self.gate_proj = (lin(in_features, num_heads * head_dim) if output_gate
                      else nnx.data(None))
    if qk_norm:
      self.q_norm = RMSNorm(head_dim, param_dtype=param_dtype)
      self.k_norm = RMSNorm(head_dim, param_dtype=param_dtype)
    else:
      self.q_norm = nnx.data(None)
      self.k_norm = nnx.data(None)
    self.sinks = (nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sinks
                  else nnx.data(None))
    self._conv_channels = (num_heads + 2 * num_kv_heads) * head_dim
    self.conv = (ShortConv(self._conv_channels, short_conv,
                           param_dtype=param_dtype, rngs=rngs)
                 if short_conv else nnx.data(None))

  # Pieces shared by the full forward and decoding ---------------------------

  def _project(self, x, positions, conv_state=None):
    """(q, k, v, new conv state) for tokens at ``positions``."""
    b, t, _ = x.shape
    if self.dtype is not None:
      x = x.astype(self.dtype)
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    new_conv = None
    if self.conv is not None:
      qkv, new_conv = self.conv(jnp.concatenate([q, k, v], axis=-1),
                                conv_state)
      nq, nk = q.shape[-1], k.shape[-1]
      q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope:
      q = apply_rope(q, positions, self.rope_base)
      k = apply_rope(k, positions, self.rope_base)
    return q, k, v, new_conv

  def _finish(self, x, o):
    b, t = o.shape[:2]
    if self.gate_proj is not None:
      gate = self.gate_proj(x.astype(o.dtype)).reshape(o.shape)
      o = o * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(o.dtype)
    return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))

  def _sink_logits(self):
    return None if self.sinks is None else self.sinks[...]

  def _sigmoid_attention(self, q, k, v, visible):
    scale = 1.0 / math.sqrt(self.head_dim)
    w = jax.nn.sigmoid(_grouped_logits(q, k, scale) + self.sigmoid_bias)
    w = jnp.where(visible, w, 0.0)
    n, kh = q.shape[2], k.shape[2]
    v = jnp.repeat(v, n // kh, axis=2).astype(jnp.float32)
    return jnp.einsum("bnts,bsnh->btnh", w, v).astype(q.dtype)

  def _window(self):
    return None if self.window_left is None else (self.window_left, 0)

  # Public API --------------------------------------------------------------

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention over the whole sequence.

    Args:
      x: [B, T, D].
      positions: int [B, T] RoPE positions (default ``arange(T)``).
      segment_ids: int [B, T]: packed documents (softmax only).

    Returns:
      [B, T, out_features].
    """
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, v, _ = self._project(x, positions)
    if self.normalization == "sigmoid":
      if segment_ids is not None:
        raise NotImplementedError("segment_ids with sigmoid attention")
      vis = _visible(positions, positions, self.window_left)
      o = self._sigmoid_attention(q, k, v, vis)
    elif self.sequence_parallel is not None:
      from attnjax import parallel  # noqa: PLC0415 (optional dependency)
      sp = self.sequence_parallel
      o = parallel.sequence_parallel_attention(
          q, k, v, mesh=sp.mesh, axis_name=sp.axis_name,
          strategy=sp.strategy, is_causal=True, segment_ids=segment_ids,
          local_window_size=self._window(), sinks=self._sink_logits(),
          implementation=self.implementation)
    else:
      o = api.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=self._window(),
          segment_ids=segment_ids, sinks=self._sink_logits(),
          implementation=self.implementation)
    return self._finish(x, o)

  def init_cache(self, batch_size: int, max_length: int,
                 dtype=jnp.float32) -> KVCache:
    """An empty KV cache for up to ``max_length`` positions."""
    shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
    conv = (None if self.conv is None else
            self.conv.init_state(batch_size, self._conv_channels, dtype))
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch_size,), jnp.int32), conv)

  def decode(self, x: jax.Array, cache: KVCache
             ) -> tuple[jax.Array, KVCache]:
    """Appends ``x`` [B, Tn, D] to the cache and attends from its tokens.

    Prefill is ``decode`` with the whole prompt (``dot_product_attention``
    with the new rows of the causal mask); generation is ``decode`` with one
    token at a time (``attnjax.decode_attention``, split-K over the cache). The caller keeps ``lengths + Tn <= S_max``
    (positions past the end of the cache are clamped by
    ``lax.dynamic_update_slice``).

    Returns:
      ``(y [B, Tn, out_features], new_cache)``.
    """
    b, tn, _ = x.shape
    s_max = cache.key.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(tn, dtype=jnp.int32)[None]
    q, k, v, conv = self._project(x, pos, cache.conv)
    if conv is not None:
      conv = conv.astype(cache.conv.dtype)
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(
        c, u.astype(c.dtype), (i, 0, 0)))
    key = write(cache.key, k, cache.lengths)
    value = write(cache.value, v, cache.lengths)
    kv_pos = jnp.broadcast_to(jnp.arange(s_max, dtype=jnp.int32), (b, s_max))
    vis = _visible(pos, kv_pos, self.window_left)
    kq, vq = key.astype(q.dtype), value.astype(q.dtype)
    if self.normalization == "sigmoid":
      o = self._sigmoid_attention(q, kq, vq, vis)
    elif tn == 1:
      # One new token: split-K decoding over the cache (API section 4).
      o = decode_lib.decode_attention(
          q, kq, vq, kv_lengths=cache.lengths + tn,
          local_window_size=self._window(), sinks=self._sink_logits())
    else:
      # Prefill: the new tokens' rows of the causal (windowed) mask.
      o = api.dot_product_attention(
          q, kq, vq, mask=vis, sinks=self._sink_logits(),
          implementation=self.implementation)
    return self._finish(x, o), KVCache(key, value, cache.lengths + tn, conv)

  def attention_weights(self, x: jax.Array) -> jax.Array:
    """The materialised attention weights, float32 [B, N, T, T] (analysis).

    Softmax rows sum to 1 minus the sink's share; sigmoid rows do not sum to
    anything in particular.
    """
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, _, _ = self._project(x, positions)
    logits = _grouped_logits(q, k, 1.0 / math.sqrt(self.head_dim))
    vis = _visible(positions, positions, self.window_left)
    if self.normalization == "sigmoid":
      return jnp.where(vis, jax.nn.sigmoid(logits + self.sigmoid_bias), 0.0)
    logits = jnp.where(vis, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    if self.sinks is not None:
      sink = self.sinks[...].astype(jnp.float32)[None, :, None, None]
      lse = jnp.logaddexp(lse, sink)
    return jnp.exp(logits - lse)
