"""``attnjax.nn.LinearAttention``: the linear-attention family as a layer.

One module covers the members of ``attnjax.linear_attention`` (API section 3)
by its options: the feature map (Katharopoulos' ``elu_plus_one``, BASED's
``taylor2``, ...), a fixed per-head decay (RetNet / Lightning), data-dependent
gates (scalar per head as Mamba2 / simple GLA, or per key channel as GLA), the
running-sum normaliser, and a short causal convolution in front (H3, BASED,
GLA), and the delta rule (DeltaNet, Gated DeltaNet). Decoding carries the
recurrent state, so memory is constant in length.
"""

from __future__ import annotations

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
      the feature map; Hv' = Hv, plus one column for the running key sum
      when ``normalize``).
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
    linear.linear_attention, linear.linear_attention_step  # noqa: B018
    linear.delta_rule_attention, linear.delta_rule_step  # noqa: B018
  except (ImportError, AttributeError) as e:
    raise NotImplementedError(
        "attnjax.nn.LinearAttention needs attnjax.linear "
        f"(linear_attention, linear_attention_step): {e}") from e
  return linear


class LinearAttention(nnx.Module):
  """Causal linear attention ``S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t``.

  With ``rule="delta"`` the state follows the delta rule instead (DeltaNet,
  arXiv:2406.06484): ``S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} +
  beta_t k_t^T v_t`` with L2-normalised q, k and ``beta_t = sigmoid(x_t
  W_beta)``; with ``gate="scalar"`` that is Gated DeltaNet.

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
    normalize: divide by the running key sum (Katharopoulos et al.);
      without it the outputs carry ``attnjax.linear_attention``'s default
      scale 1/sqrt(H) (which the output RMSNorm, when on, cancels).
    rule: "linear" (additive update) or "delta" (the delta rule; needs
      ``feature_map=None``, no fixed decay, at most a scalar gate, no
      ``normalize``).
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
               rule: str = "linear", short_conv: int | None = None,
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
    if rule not in ("linear", "delta"):
      raise ValueError(f"rule must be 'linear' or 'delta', got {rule!r}")
    if rule == "delta" and (feature_map is not None or decay is not None
                            or gate == "vector" or normalize):
      raise ValueError("rule='delta' supports feature_map=None, no decay, "
                       "gate None or 'scalar', normalize=False")
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
    self.rule = rule
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
    self.beta_proj = (lin(in_features, num_heads, bias=True)
                      if rule == "delta" else nnx.data(None))
    output_norm = (not normalize) if output_norm is None else output_norm
    self.out_norm = (RMSNorm(value_head_dim, param_dtype=param_dtype)
                     if output_norm else nnx.data(None))

  # Pieces shared by the full forward and decoding ---------------------------

  def _inputs(self, x, conv_state):
    """Projections, short conv, gates: (q, k, v, gate, beta, conv state)."""
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
    gate = beta = None
    if self.gate is not None:
      g = jax.nn.log_sigmoid(self.gate_proj(x).astype(jnp.float32))
      g = g / self.gate_temperature
      gate = (g if self.gate == "scalar"
              else g.reshape(b, t, self.num_heads, self.head_dim))
    if self.rule == "delta":
      # DeltaNet: unit-norm keys keep (I - beta k^T k) a contraction.
      unit = lambda a: (a.astype(jnp.float32) * jax.lax.rsqrt(
          jnp.sum(jnp.square(a.astype(jnp.float32)), -1, keepdims=True)
          + 1e-6)).astype(a.dtype)
      q, k = unit(q), unit(k)
      beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
    return q, k, v, gate, beta, new_conv

  def _log_decay(self):
    return retnet_log_decay(self.num_heads) if self.decay else None

  def _finish(self, o):
    b, t = o.shape[:2]
    if self.out_norm is not None:
      o = self.out_norm(o)
    return self.o_proj(o.reshape(b, t, self.num_heads * self.value_head_dim))

  def _kwargs(self, gate, **extra):
    if self.rule == "delta":
      kw = dict(gate=gate)
    else:
      kw = dict(feature_map=self.feature_map, log_decay=self._log_decay(),
                gate=gate, normalize=self.normalize)
    return kw | extra

  def _sequence(self, q, k, v, gate, beta, *, initial_state=None,
                return_final_state=False, segment_ids=None):
    lin = _linear_ops()
    kw = self._kwargs(gate, chunk_size=self.chunk_size,
                      implementation=self.implementation)
    sp = self.sequence_parallel
    # Decoding (a state in or out) is never sequence-sharded.
    if (sp is not None and self.rule == "linear" and initial_state is None
        and not return_final_state):
      from attnjax import parallel  # noqa: PLC0415
      try:
        fn = parallel.sequence_parallel_linear_attention
      except (AttributeError, ImportError):  # not written (yet): XLA's way
        fn = None
      if fn is not None:
        return fn(q, k, v, mesh=sp.mesh, axis_name=sp.axis_name,
                  segment_ids=segment_ids, **kw)
    kw |= dict(initial_state=initial_state,
               return_final_state=return_final_state,
               segment_ids=segment_ids)
    if self.rule == "delta":
      return lin.delta_rule_attention(q, k, v, beta, **kw)
    return lin.linear_attention(q, k, v, **kw)

  # Public API --------------------------------------------------------------

  def __call__(self, x: jax.Array, *, positions=None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] -> [B, T, out_features] (``positions`` is unused).

    ``segment_ids`` [B, T] resets the state at each new packed document
    (not with ``short_conv``, which would mix neighbouring documents).
    """
    del positions
    if segment_ids is not None and self.conv is not None:
      raise NotImplementedError("segment_ids with short_conv")
    q, k, v, gate, beta, _ = self._inputs(x, None)
    o = self._sequence(q, k, v, gate, beta, segment_ids=segment_ids)
    return self._finish(o)

  def state_shape(self, batch_size: int) -> tuple[int, ...]:
    """[B, N, H', Hv'] of the recurrent state (H' after the feature map)."""
    lin = _linear_ops()
    sds = lambda heads, dim: jax.ShapeDtypeStruct(
        (batch_size, 1, heads, dim), jnp.float32)
    q = sds(self.num_heads, self.head_dim)
    k = sds(self.num_kv_heads, self.head_dim)
    v = sds(self.num_kv_heads, self.value_head_dim)
    if self.rule == "delta":
      fn = lambda q, k, v: lin.delta_rule_attention(
          q, k, v, jnp.ones((batch_size, 1, self.num_heads)),
          return_final_state=True, implementation="xla")
    else:
      fn = lambda q, k, v: lin.linear_attention(
          q, k, v, feature_map=self.feature_map, normalize=self.normalize,
          return_final_state=True, implementation="xla")
    _, state = jax.eval_shape(fn, q, k, v)
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
    """Runs ``x`` [B, Tn, D] from ``cache``; returns (y, new cache).

    One token uses ``linear_attention_step`` (or ``delta_rule_step``);
    several (prefill) use the chunked form from the cached state.
    """
    q, k, v, gate, beta, conv = self._inputs(x, cache.conv)
    lin = _linear_ops()
    if x.shape[1] == 1:
      at0 = lambda a: None if a is None else a[:, 0]
      kw = self._kwargs(at0(gate))
      if self.rule == "delta":
        o, state = lin.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                       cache.state, **kw)
      else:
        o, state = lin.linear_attention_step(q[:, 0], k[:, 0], v[:, 0],
                                             cache.state, **kw)
      o = o[:, None]
    else:
      o, state = self._sequence(q, k, v, gate, beta,
                                initial_state=cache.state,
                                return_final_state=True)
    if conv is not None:
      conv = conv.astype(cache.conv.dtype)
    return self._finish(o), LinearCache(state, conv)
