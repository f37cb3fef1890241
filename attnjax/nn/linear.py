"""``attnjax.nn.LinearAttention``: the linear-attention family as a layer.

One module covers the members of ``attnjax.linear_attention`` (API section 3)
by its options: the feature map (Katharopoulos' ``elu_plus_one``, BASED's
``taylor2``, ...), a fixed per-head decay (RetNet / Lightning), data-dependent
gates (scalar per head as Mamba2 / simple GLA, or per key channel as GLA), the
running-sum normaliser, and a short causal convolution in front (H3, BASED,
GLA). Decoding carries the recurrent state, so memory is constant in length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import RMSNorm, ShortConv

__all__ = ["LinearAttention", "LinearCache", "retnet_log_decay"]


class LinearCache(NamedTuple):
  """Decoding state of one linear-attention layer.

  Attributes:
    state: float32 [B, N, H', Hv'] recurrent state (H' the feature dim after
      the feature map; Hv' = Hv, plus one column for the normaliser when
      ``normalize``).
    conv: [B, kernel_size - 1, C] the short convolution's last inputs, or
      None without one.
  """
  state: jax.Array
  conv: jax.Array | None


def retnet_log_decay(num_heads: int) -> jax.Array:
  """RetNet's fixed per-head decays, ``log(1 - 2 ** (-5 - h))``, float32 [N].

  (arXiv:2307.08621, section 2.2: head h forgets with rate 2^(-5-h).)
  """
  h = jnp.arange(num_heads, dtype=jnp.float32)
  return jnp.log1p(-(2.0 ** (-5.0 - h)))


def _linear_ops():
  try:
    from attnjax import linear  # noqa: PLC0415 (written in parallel)
  except ImportError as e:  # pragma: no cover - until attnjax.linear lands
    raise NotImplementedError(
        "attnjax.nn.LinearAttention needs attnjax.linear "
        f"(linear_attention, linear_attention_step): {e}") from e
  return linear


class LinearAttention(nnx.Module):
  """Causal linear attention ``S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t``.

  ``layer(x)`` runs the whole sequence (chunked kernels); ``cache =
  layer.init_cache(B)`` and ``y, cache = layer.decode(x_new, cache)`` run
  prefill and token-by-token decoding with the recurrent state, equal to the
  full forward.

  Args:
    in_features: model width D.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0); default N.
    head_dim: query/key dim H before the feature map; default D // N.
    value_head_dim: Hv; default D // N.
    feature_map: None (identity) | "elu_plus_one" | "relu" | "taylor2" |
      a callable, as ``attnjax.linear_attention``.
    decay: None | "retnet": fixed per-head decays (``retnet_log_decay``).
    gate: None | "scalar" (one forget gate per head and token: Mamba2 /
      simple GLA) | "vector" (one per key channel: GLA). Gates are
      ``log_sigmoid(x W + b) / gate_temperature`` (GLA's parametrisation;
      the temperature keeps early forgetting slow).
    normalize: divide by the running key sum (Katharopoulos et al.).
    short_conv: kernel size of a causal depthwise convolution on q, k, v
      (None: none).
    output_norm: RMSNorm each head's output (RetNet / GLA); default: on
      unless ``normalize``.
    chunk_size, implementation: forwarded to ``attnjax.linear_attention``.
    dtype, param_dtype: computation and parameter dtypes.
    rngs: ``nnx.Rngs``.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import attnjax.nn
  >>> layer = attnjax.nn.LinearAttention(
  ...     in_features=32, num_heads=2, gate="scalar", short_conv=4,
  ...     rngs=nnx.Rngs(0))
  >>> x = jnp.ones((2, 10, 32))
  >>> cache = layer.init_cache(2)
  >>> y1, cache = layer.decode(x[:, :6], cache)
  >>> y2, cache = layer.decode(x[:, 6:7], cache)
  >>> layer(x).shape, y2.shape
  ((2, 10, 32), (2, 1, 32))
  """

  def __init__(self, *, in_features: int, num_heads: int,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               value_head_dim: int | None = None, feature_map=None,
               decay: str | None = None, gate: str | None = None,
               gate_temperature: float = 16.0, normalize: bool = False,
               short_conv: int | None = None,
               output_norm: bool | None = None, chunk_size: int | None = None,
               implementation=None, out_features: int | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a positive multiple "
                       f"of num_kv_heads ({num_kv_heads})")
    if (head_dim is None or value_head_dim is None) and in_features % num_heads:
      raise ValueError(f"in_features ({in_features}) must be divisible by "
                       f"num_heads ({num_heads}) unless head dims are given")
    head_dim = in_features // num_heads if head_dim is None else head_dim
    value_head_dim = (in_features // num_heads if value_head_dim is None
                      else value_head_dim)
    if decay not in (None, "retnet"):
      raise ValueError(f"decay must be None or 'retnet', got {decay!r}")
    if gate not in (None, "scalar", "vector"):
      raise ValueError(f"gate must be None, 'scalar' or 'vector', got "
                       f"{gate!r}")
    if gate is not None and decay is not None:
      raise ValueError("choose a fixed decay or a gate, not both")
    if gate == "vector" and feature_map == "taylor2":
      raise ValueError("gate='vector' needs the feature dim to equal "
                       "head_dim; taylor2 expands it")
    self.in_features = in_features
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.value_head_dim = value_head_dim
    self.feature_map = feature_map
    self.decay = decay
    self.gate = gate
    self.gate_temperature = float(gate_temperature)
    self.normalize = normalize
    self.chunk_size = chunk_size
    self.implementation = implementation
    self.dtype = dtype
    self.sequence_parallel = None
    out_features = in_features if out_features is None else out_features
    lin = lambda i, o, bias=False: nnx.Linear(
        i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = lin(in_features, num_heads * head_dim)
    self.k_proj = lin(in_features, num_kv_heads * head_dim)
    self.v_proj = lin(in_features, num_kv_heads * value_head_dim)
    self.o_proj = lin(num_heads * value_head_dim, out_features)
    self._conv_channels = (num_heads + num_kv_heads) * head_dim + (
        num_kv_heads * value_head_dim)
    self.conv = (ShortConv(self._conv_channels, short_conv,
                           param_dtype=param_dtype, rngs=rngs)
                 if short_conv else nnx.data(None))
    if gate == "scalar":
      self.gate_proj = lin(in_features, num_heads, bias=True)
    elif gate == "vector":
      self.gate_proj = lin(in_features, num_heads * head_dim, bias=True)
    else:
      self.gate_proj = nnx.data(None)
    output_norm = (not normalize) if output_norm is None else output_norm
    self.out_norm = (RMSNorm(value_head_dim, param_dtype=param_dtype)
                     if output_norm else nnx.data(None))

  # Pieces shared by the full forward and decoding ---------------------------

  def _inputs(self, x, conv_state):
    """Projections, short conv and gates: (q, k, v, gate, new_conv_state)."""
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
    v = v.reshape(b, t, self.num_kv_heads, self.value_head_dim)
    if self.normalize:
      # The normaliser phi(q_t) . sum_{s<=t} phi(k_s) is the output of the
      # same recurrence on an all-ones value column, so it rides along in the
      # state (and in decoding) as one extra value channel.
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], -1)
    gate = None
    if self.gate is not None:
      g = jax.nn.log_sigmoid(self.gate_proj(x).astype(jnp.float32))
      g = g / self.gate_temperature
      gate = (g if self.gate == "scalar"
              else g.reshape(b, t, self.num_heads, self.head_dim))
    return q, k, v, gate, new_conv

  def _log_decay(self):
    return retnet_log_decay(self.num_heads) if self.decay else None

  def _finish(self, o):
    b, t = o.shape[:2]
    if self.normalize:
      num, den = o[..., :-1], o[..., -1:]
      den = den.astype(jnp.float32)
      # Zero denominators arise only when every feature is zero (relu maps).
      o = (num.astype(jnp.float32) / jnp.where(den == 0, 1.0, den)
           ).astype(num.dtype)
    if self.out_norm is not None:
      o = self.out_norm(o)
    return self.o_proj(o.reshape(b, t, self.num_heads * self.value_head_dim))

  def _scan(self, q, k, v, gate, initial_state, return_final_state):
    lin = _linear_ops()
    sp = self.sequence_parallel
    kwargs = dict(feature_map=self.feature_map, log_decay=self._log_decay(),
                  gate=gate, initial_state=initial_state,
                  return_final_state=return_final_state,
                  chunk_size=self.chunk_size,
                  implementation=self.implementation)
    if (sp is not None and initial_state is None
        and not return_final_state):
      from attnjax import parallel  # noqa: PLC0415
      fn = getattr(parallel, "sequence_parallel_linear_attention", None)
      if fn is not None:
        kwargs = {k_: v_ for k_, v_ in kwargs.items()
                  if k_ not in ("initial_state", "return_final_state")}
        return fn(q, k, v, mesh=sp.mesh, axis_name=sp.axis_name, **kwargs)
    return lin.linear_attention(q, k, v, **kwargs)

  # Public API --------------------------------------------------------------

  def __call__(self, x: jax.Array, *, positions=None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] -> [B, T, out_features] (``positions`` is unused)."""
    del positions
    q, k, v, gate, _ = self._inputs(x, None)
    if segment_ids is not None:
      if self.conv is not None:
        raise NotImplementedError("segment_ids with short_conv")
      o = _linear_ops().linear_attention(
          q, k, v, feature_map=self.feature_map, log_decay=self._log_decay(),
          gate=gate, segment_ids=segment_ids, chunk_size=self.chunk_size,
          implementation=self.implementation)
    else:
      o = self._scan(q, k, v, gate, None, False)
    return self._finish(o)

  def state_shape(self, batch_size: int) -> tuple[int, ...]:
    """[B, N, H', Hv'] of the recurrent state (H' after the feature map)."""
    hv = self.value_head_dim + (1 if self.normalize else 0)
    q = jax.ShapeDtypeStruct((batch_size, 1, self.num_heads, self.head_dim),
                             jnp.float32)
    k = jax.ShapeDtypeStruct((batch_size, 1, self.num_kv_heads,
                              self.head_dim), jnp.float32)
    v = jax.ShapeDtypeStruct((batch_size, 1, self.num_kv_heads, hv),
                             jnp.float32)
    lin = _linear_ops()
    fm = self.feature_map
    _, state = jax.eval_shape(
        lambda q, k, v: lin.linear_attention(
            q, k, v, feature_map=fm, return_final_state=True,
            implementation=self.implementation), q, k, v)
    return tuple(state.shape)

  def init_cache(self, batch_size: int, max_length: int | None = None,
                 dtype=jnp.float32) -> LinearCache:
    """A zero recurrent state (``max_length`` is unused: memory is O(1))."""
    del max_length
    conv = (None if self.conv is None else
            self.conv.init_state(batch_size, self._conv_channels, dtype))
    return LinearCache(jnp.zeros(self.state_shape(batch_size), jnp.float32),
                       conv)

  def decode(self, x: jax.Array, cache: LinearCache
             ) -> tuple[jax.Array, LinearCache]:
    """Runs ``x`` [B, Tn, D] from ``cache``; returns (y, new cache)."""
    q, k, v, gate, conv = self._inputs(x, cache.conv)
    lin = _linear_ops()
    if x.shape[1] == 1:
      o, state = lin.linear_attention_step(
          q[:, 0], k[:, 0], v[:, 0], cache.state,
          feature_map=self.feature_map, log_decay=self._log_decay(),
          gate=None if gate is None else gate[:, 0])
      o = o[:, None]
    else:
      o, state = self._scan(q, k, v, gate, cache.state, True)
    if conv is not None and cache.conv is not None:
      conv = conv.astype(cache.conv.dtype)
    return self._finish(o), LinearCache(state, conv)
