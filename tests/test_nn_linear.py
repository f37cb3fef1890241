"""attnjax.nn.LinearAttention: recurrence semantics and cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax.nn as ann
from attnjax import testing

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


def test_linear_attention_is_the_gated_recurrence():
  """Scalar gate + normalisation against a hand-written token loop."""
  layer = ann.LinearAttention(in_features=12, num_heads=3, gate="scalar",
                              feature_map="elu_plus_one", normalize=True,
                              output_norm=False, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (1, 9, 12))
  h = 4
  proj = lambda lin: (x @ lin.kernel[...]).reshape(1, 9, 3, -1)[0]
  q = jax.nn.elu(proj(layer.q_proj)) + 1
  k = jax.nn.elu(proj(layer.k_proj)) + 1
  v = proj(layer.v_proj)
  g = jax.nn.log_sigmoid(x[0] @ layer.gate_proj.kernel[...]
                         + layer.gate_proj.bias[...]) / 16.0
  s = np.zeros((3, h, h))
  z = np.zeros((3, h))
  outs = []
  for t in range(9):
    decay = np.exp(np.asarray(g[t]))[:, None]
    s = decay[..., None] * s + np.einsum("nf,nv->nfv", k[t], v[t])
    z = decay * z + np.asarray(k[t])
    num = np.einsum("nf,nfv->nv", q[t], s)
    outs.append(num / (np.einsum("nf,nf->n", q[t], z)[:, None] + 1e-6))
  o = jnp.asarray(np.stack(outs)).reshape(1, 9, 12)
  expected = o @ layer.o_proj.kernel[...]
  testing.assert_close(_call(layer, x), expected, F32)


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
