"""attnjax.nn.LinearAttention: recurrence semantics and cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax.nn as ann
from attnjax import testing
from test_nn import _assert_grads_close

F32 = jnp.float32

_call = nnx.jit(lambda layer, x: layer(x))
_decode = nnx.jit(lambda layer, x, cache: layer.decode(x, cache))

CONFIGS = {
    "elu_normalize_conv": dict(feature_map="elu_plus_one", normalize=True,
                               short_conv=3),
    "taylor2_gqa": dict(feature_map="taylor2", head_dim=4, num_kv_heads=1,
                        normalize=True),
    "scalar_gate_conv": dict(gate="scalar", short_conv=4),
    "vector_gate": dict(gate="vector", feature_map="relu"),
    "retnet_decay": dict(decay="retnet"),
    "gated_delta": dict(rule="delta", gate="scalar", short_conv=2),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_linear_attention_decode_equals_forward(config):
  layer = ann.LinearAttention(in_features=16, num_heads=2, rngs=nnx.Rngs(0),
                              **CONFIGS[config])
  x = jax.random.normal(jax.random.key(1), (2, 11, 16))
  full = _call(layer, x)
  cache = layer.init_cache(2)
  outs = []
  y, cache = _decode(layer, x[:, :4], cache)  # prefill from a zero state
  outs.append(y)
  for t in range(4, 8):  # token by token (linear_attention_step)
    y, cache = _decode(layer, x[:, t:t + 1], cache)
    outs.append(y)
  y, cache = _decode(layer, x[:, 8:], cache)  # prefill from a live state
  outs.append(y)
  testing.assert_close(jnp.concatenate(outs, axis=1), full, F32)
  assert cache.state.dtype == jnp.float32
  assert cache.state.shape == layer.state_shape(2)


def _recurrence_ref(p, x, *, num_heads, feature_map, decay, gate,
                    normalize, temperature=16.0, norm_eps=None):
  """Hand-written token loop of S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t.

  a_t per head: RetNet's fixed 1 - 2^(-5-h) (decay="retnet"), or
  sigmoid(x_t W_g + b)^(1/temperature), one per head ("scalar") or per key
  channel ("vector", head-major channels). o_t = phi(q_t) S_t / sqrt(H)
  (linear_attention's default scale), or phi(q_t) S_t / (phi(q_t) z_t +
  1e-6) (z_t the decayed key sum; the scale cancels) when normalising; then a
  per-head RMSNorm (if p has "out_norm") and W_o.
  """
  b, t, _ = x.shape
  n = num_heads
  phi = {None: lambda a: a,
         "elu_plus_one": lambda a: jnp.where(a > 0, a + 1.0, jnp.exp(a)),
         "relu": lambda a: jnp.maximum(a, 0.0)}[feature_map]
  split = lambda a: a.reshape(b, t, n, -1)
  q = phi(split(x @ p["q_proj"]["kernel"]))
  k = phi(split(x @ p["k_proj"]["kernel"]))
  v = split(x @ p["v_proj"]["kernel"])
  h, hv = q.shape[-1], v.shape[-1]
  if decay == "retnet":
    heads = np.arange(n, dtype=np.float64)
    a = jnp.broadcast_to(jnp.asarray(1.0 - 2.0 ** (-5.0 - heads), F32)
                         [:, None], (b, t, n, 1))
  else:
    z = x @ p["gate_proj"]["kernel"] + p["gate_proj"]["bias"]
    a = (1.0 / (1.0 + jnp.exp(-z))) ** (1.0 / temperature)
    a = a[..., None] if gate == "scalar" else split(a)  # [B, T, N, 1 or H]
  s = jnp.zeros((b, n, h, hv))
  zsum = jnp.zeros((b, n, h))
  outs = []
  for i in range(t):
    s = a[:, i, :, :, None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
    o = jnp.einsum("bnf,bnfv->bnv", q[:, i], s)
    if normalize:
      zsum = a[:, i] * zsum + k[:, i]
      o = o / (jnp.einsum("bnf,bnf->bn", q[:, i], zsum)[..., None] + 1e-6)
    else:
      o = o / np.sqrt(h)
    outs.append(o)
  o = jnp.stack(outs, axis=1)  # [B, T, N, Hv]
  if "out_norm" in p:
    o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + norm_eps)
    o = o * p["out_norm"]["scale"]
  return o.reshape(b, t, n * hv) @ p["o_proj"]["kernel"]


RECURRENCE_CONFIGS = {
    # Scalar gate + normalisation, no output norm.
    "scalar_gate_elu_normalize": dict(
        num_heads=3, gate="scalar", feature_map="elu_plus_one",
        normalize=True, output_norm=False),
    # RetNet's fixed per-head decays (4 heads: 1 - 2^-5 ... 1 - 2^-8).
    "retnet_decay": dict(num_heads=4, decay="retnet", output_norm=False),
    # GLA's per-key-channel gate, a sharper temperature.
    "vector_gate_relu": dict(num_heads=3, gate="vector", feature_map="relu",
                             gate_temperature=4.0, output_norm=False),
    # Vector gate with the normaliser and the per-head output RMSNorm.
    "vector_gate_normalize_out_norm": dict(
        num_heads=3, gate="vector", feature_map="elu_plus_one",
        normalize=True, output_norm=True),
}


@pytest.mark.parametrize("config", sorted(RECURRENCE_CONFIGS))
def test_linear_attention_is_the_gated_recurrence(config):
  """The layer against a hand-written token loop: forward and gradients."""
  kw = RECURRENCE_CONFIGS[config]
  layer = ann.LinearAttention(in_features=12, rngs=nnx.Rngs(2), **kw)
  keys = jax.random.split(jax.random.key(3), 4)
  # Random where init is constant: gate bias (zeros), output norm (ones).
  if layer.gate_proj is not None:
    bias = layer.gate_proj.bias
    bias[...] = jax.random.normal(keys[0], bias.shape)
  if layer.out_norm is not None:
    scale = layer.out_norm.scale
    scale[...] = 1.0 + 0.5 * jax.random.normal(keys[1], scale.shape)
  x = jax.random.normal(keys[2], (2, 9, 12))
  p = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  ref = jax.jit(lambda p, x: _recurrence_ref(
      p, x, num_heads=kw["num_heads"], feature_map=kw.get("feature_map"),
      decay=kw.get("decay"), gate=kw.get("gate"),
      normalize=kw.get("normalize", False),
      temperature=kw.get("gate_temperature", 16.0),
      norm_eps=None if layer.out_norm is None else layer.out_norm.eps))
  expected = ref(p, x)
  testing.assert_close(_call(layer, x), expected, F32, name="forward")
  ct = jax.random.normal(keys[3], expected.shape)
  loss = lambda model, x: (model(x) * ct).sum()
  g_layer, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
  e_p, e_x = jax.jit(jax.grad(lambda p, x: (ref(p, x) * ct).sum(),
                              argnums=(0, 1)))(p, x)
  _assert_grads_close(g_x, e_x, "d x")
  _assert_grads_close(nnx.to_pure_dict(g_layer), e_p, "d params")


def test_linear_attention_causal_and_validates():
  layer = ann.LinearAttention(in_features=8, num_heads=2, gate="scalar",
                              short_conv=3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (1, 10, 8))
  y = _call(layer, x)
  y2 = _call(layer, x.at[:, 6:].add(1.0))
  testing.assert_close(y2[:, :6], y[:, :6], F32)
  with pytest.raises(ValueError, match="gate"):
    ann.LinearAttention(in_features=8, num_heads=2, gate="sigmoid",
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="decay or a gate"):
    ann.LinearAttention(in_features=8, num_heads=2, gate="scalar",
                        decay="retnet", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="delta"):
    ann.LinearAttention(in_features=8, num_heads=2, rule="delta",
                        feature_map="relu", rngs=nnx.Rngs(0))
