"""attnjax.nn: the nnx adapter and the softmax attention layer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax.nn as ann
from attnjax import masks, testing

F32 = jnp.float32

# Jitted entry points: one compile per shape instead of one per eager op.
_call = nnx.jit(lambda layer, x, **kw: layer(x, **kw),
                static_argnames=("is_causal", "decode"))
_decode = nnx.jit(lambda layer, x, cache: layer.decode(x, cache))


def _nnx_pair(num_kv_heads, **kw):
  """Two nnx.MultiHeadAttention with equal params: default vs attnjax fn."""
  common = dict(num_heads=4, in_features=16, num_kv_heads=num_kv_heads,
                decode=False, **kw)
  ref = nnx.MultiHeadAttention(**common, rngs=nnx.Rngs(0))
  ours = nnx.MultiHeadAttention(**common, rngs=nnx.Rngs(1),
                                attention_fn=ann.make_attention_fn())
  nnx.update(ours, nnx.state(ref, nnx.Param))
  return ref, ours


@pytest.mark.parametrize("num_kv_heads,mask_heads", [(4, 1), (1, 4)])
def test_attention_fn_matches_nnx_default(num_kv_heads, mask_heads):
  ref, ours = _nnx_pair(num_kv_heads)
  x = jax.random.normal(jax.random.key(1), (2, 11, 16))
  testing.assert_close(_call(ours, x, is_causal=True),
                       _call(ref, x, is_causal=True), F32, name="causal")
  # A padding-style mask [B, 1, T, S] or a per-head one [B, N, T, S], with
  # every row non-empty (nnx averages the values of an empty row).
  m = jax.random.bernoulli(jax.random.key(2), 0.6, (2, mask_heads, 11, 11))
  m = m.at[..., 0].set(True)
  testing.assert_close(_call(ours, x, mask=m, is_causal=True),
                       _call(ref, x, mask=m, is_causal=True), F32,
                       name="mask & causal")
  # Gradients with respect to the input and the parameters.
  def loss(model, x, m):
    return (model(x, mask=m) ** 2).sum()
  grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
  g_ref, g_ours = grad(ref, x, m), grad(ours, x, m)
  # Tolerance relative to the largest reference gradient (sums of squares
  # of the outputs give gradients well above 1).
  size = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
  testing.assert_close(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), F32,
                       grad=True, name="grads", scale=size)


def test_attention_fn_in_nnx_decode_mode():
  """nnx's own KV cache passes a float occupancy mask [B, 1, 1, S_max]."""
  ref, ours = _nnx_pair(2, qkv_features=16)
  x = jax.random.normal(jax.random.key(3), (2, 6, 16))
  for layer in (ref, ours):
    layer.init_cache((2, 6, 16))
  for t in range(6):
    xt = x[:, t:t + 1]
    testing.assert_close(_call(ours, xt, decode=True),
                         _call(ref, xt, decode=True), F32, name=f"token {t}")


def test_attention_fn_extra_batch_axes_and_options():
  x = testing.attention_inputs(jax.random.key(4), batch=6, q_len=9,
                               num_heads=2)
  q, k, v = (a.reshape((2, 3) + a.shape[1:]) for a in (x.q, x.k, x.v))
  fn = ann.make_attention_fn(implementation="xla_chunked")
  expected = nnx.dot_product_attention(q, k, v, is_causal=True)
  testing.assert_close(fn(q, k, v, is_causal=True), expected, F32)
  # A fixed attnjax Mask option is AND-ed with the mask nnx passes.
  window = masks.LocalWindow(2, 0)
  fn = ann.make_attention_fn(mask=window, is_causal=True)
  m = jnp.ones((2, 3, 1, 9, 9), bool).at[..., 0].set(False)
  dense = window.as_array(9, 9) & jnp.tril(jnp.ones((9, 9), bool)) & m
  dense = dense.at[..., 0, 0].set(True)  # keep row 0 non-empty
  m = m.at[..., 0, 0].set(True)
  testing.assert_close(fn(q, k, v, mask=m),
                       nnx.dot_product_attention(q, k, v, mask=dense), F32)


def test_attention_fn_raises_on_what_it_cannot_honour():
  q = jnp.ones((1, 4, 2, 8))
  fn = ann.make_attention_fn()
  with pytest.raises(NotImplementedError, match="dropout"):
    fn(q, q, q, dropout_rate=0.1, deterministic=False,
       dropout_rng=jax.random.key(0))
  fn(q, q, q, dropout_rate=0.1, deterministic=True)  # inactive dropout: ok
  with pytest.raises(NotImplementedError, match="sow"):
    fn(q, q, q, module=object())
  with pytest.raises(NotImplementedError, match="input_positions"):
    fn(q, q, q, input_positions=jnp.arange(4))
  with pytest.raises(ValueError, match="unknown options"):
    ann.make_attention_fn(dropout_rate=0.1)
  with pytest.raises(ValueError, match="Mask"):
    ann.make_attention_fn(mask=jnp.ones((4, 4), bool))
  layer = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, decode=False, dropout_rate=0.1,
      rngs=nnx.Rngs(0), attention_fn=ann.make_attention_fn())
  with pytest.raises(NotImplementedError, match="dropout"):
    layer(jnp.ones((1, 4, 8)), deterministic=False)
  with pytest.raises(NotImplementedError, match="sow"):
    layer(jnp.ones((1, 4, 8)), deterministic=True, sow_weights=True)


def test_multi_head_attention_matches_nnx_projections():
  """Plain config (no RoPE/extras) equals nnx.MultiHeadAttention(causal)."""
  d, n, kh, h = 24, 4, 2, 6
  ours = ann.MultiHeadAttention(in_features=d, num_heads=n, num_kv_heads=kh,
                                rngs=nnx.Rngs(0))
  ref = nnx.MultiHeadAttention(num_heads=n, in_features=d, num_kv_heads=kh,
                               use_bias=False, decode=False,
                               rngs=nnx.Rngs(1))
  ref.query.kernel[...] = ours.q_proj.kernel[...].reshape(d, n, h)
  ref.key.kernel[...] = ours.k_proj.kernel[...].reshape(d, kh, h)
  ref.value.kernel[...] = ours.v_proj.kernel[...].reshape(d, kh, h)
  ref.out.kernel[...] = ours.o_proj.kernel[...].reshape(n, h, d)
  x = jax.random.normal(jax.random.key(5), (3, 13, d))
  testing.assert_close(_call(ours, x), _call(ref, x, is_causal=True), F32)


DECODE_CONFIGS = {
    "gqa_rope_qknorm_sinks_gate": dict(
        num_heads=4, num_kv_heads=2, rope=True, qk_norm=True, sinks=True,
        output_gate=True),
    "window": dict(num_heads=2, rope=True, local_window_size=3),
    "mqa_window_sinks": dict(num_heads=4, num_kv_heads=1, sinks=True,
                             local_window_size=5),
    "sigmoid": dict(num_heads=2, rope=True, normalization="sigmoid",
                    sigmoid_bias=-math.log(13)),
}


def _randomise_sinks(layer, key):
  if getattr(layer, "sinks", None) is not None:
    layer.sinks[...] = jax.random.normal(key, layer.sinks.shape)


@pytest.mark.parametrize("config", sorted(DECODE_CONFIGS))
def test_multi_head_attention_decode_equals_forward(config):
  layer = ann.MultiHeadAttention(in_features=32, rngs=nnx.Rngs(0),
                                 **DECODE_CONFIGS[config])
  _randomise_sinks(layer, jax.random.key(9))
  x = jax.random.normal(jax.random.key(6), (2, 13, 32))
  full = _call(layer, x)
  cache = layer.init_cache(2, 16)
  outs = []
  y, cache = _decode(layer, x[:, :5], cache)  # prefill
  outs.append(y)
  for t in range(5, 11):  # token by token
    y, cache = _decode(layer, x[:, t:t + 1], cache)
    outs.append(y)
  y, cache = _decode(layer, x[:, 11:], cache)  # a second multi-token chunk
  outs.append(y)
  np.testing.assert_array_equal(cache.lengths, [13, 13])
  testing.assert_close(jnp.concatenate(outs, axis=1), full, F32)


@pytest.mark.parametrize("config", ["window", "sigmoid"])
def test_multi_head_attention_causal_and_window(config):
  """Outputs at t ignore tokens after t, and tokens before the window."""
  kw = DECODE_CONFIGS[config]
  layer = ann.MultiHeadAttention(in_features=16, rngs=nnx.Rngs(0), **kw)
  x = jax.random.normal(jax.random.key(7), (1, 12, 16))
  y = _call(layer, x)
  t = 8
  x_future = x.at[:, t + 1:].add(1.0)
  testing.assert_close(_call(layer, x_future)[:, :t + 1], y[:, :t + 1], F32)
  left = kw.get("local_window_size")
  if left is not None:
    y_past = _call(layer, x.at[:, : t - left].add(1.0))
    testing.assert_close(y_past[:, t:], y[:, t:], F32)
    assert not np.allclose(y_past[:, t - 1], y[:, t - 1])


def test_attention_weights_sinks_and_gate():
  layer = ann.MultiHeadAttention(in_features=16, num_heads=2, sinks=True,
                                 output_gate=True, rngs=nnx.Rngs(0))
  layer.sinks[...] = jnp.array([0.5, -1.0])
  x = jax.random.normal(jax.random.key(8), (2, 7, 16))
  w = layer.attention_weights(x)
  assert w.shape == (2, 2, 7, 7)
  assert float(jnp.abs(jnp.triu(w, 1)).max()) == 0.0
  # Each row gives the sink exp(sink) / (exp(sink) + sum_j exp(s_ij)),
  # with s_ij the causal logits of the layer's own projections.
  pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
  q, k, _, _ = layer._project(x, pos)  # pylint: disable=protected-access
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(layer.head_dim)
  z = jnp.sum(jnp.where(jnp.tril(jnp.ones((7, 7), bool)), jnp.exp(s), 0.0),
              -1)
  e_sink = jnp.exp(jnp.array([0.5, -1.0]))[None, :, None]
  testing.assert_close(1.0 - w.sum(-1), e_sink / (e_sink + z), F32,
                       name="sink share")
  # The output gate is sigmoid(x W_g) times the attention output.
  layer.gate_proj.kernel[...] = jnp.zeros_like(layer.gate_proj.kernel[...])
  y_half = _call(layer, x)
  ungated = ann.MultiHeadAttention(in_features=16, num_heads=2, sinks=True,
                                   rngs=nnx.Rngs(0))
  ungated.sinks[...] = layer.sinks[...]
  testing.assert_close(y_half, 0.5 * _call(ungated, x), F32)


def test_multi_head_attention_validates():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ann.MultiHeadAttention(in_features=8, num_heads=3, num_kv_heads=2,
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="normalization"):
    ann.MultiHeadAttention(in_features=8, num_heads=2, normalization="relu",
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="local_window_size"):
    ann.MultiHeadAttention(in_features=8, num_heads=2, local_window_size=-1,
                           rngs=nnx.Rngs(0))


def test_building_blocks():
  x = jax.random.normal(jax.random.key(10), (2, 5, 8)) * 3.0
  y = ann.RMSNorm(8)(x)
  testing.assert_close(jnp.sqrt(jnp.mean(y * y, -1)), jnp.ones((2, 5)), F32)
  # RoPE: a rotation (norms kept) whose q.k depends on relative offsets only.
  q = jax.random.normal(jax.random.key(11), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(12), (1, 1, 1, 8))
  rot = lambda a, p: ann.apply_rope(a, jnp.array([[p]]))
  testing.assert_close(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), F32)
  dots = [float((rot(q, p + 3) * rot(k, p)).sum()) for p in (0, 5, 11)]
  testing.assert_close(jnp.array(dots), jnp.full(3, dots[0]), F32)
  # ShortConv is causal and streams: two halves equal the whole.
  conv = ann.ShortConv(8, 3, rngs=nnx.Rngs(0))
  whole, _ = conv(x)
  a, state = conv(x[:, :2])
  b, _ = conv(x[:, 2:], state)
  testing.assert_close(jnp.concatenate([a, b], 1), whole, F32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_default_backends_match_xla(dtype):
  """On a GPU the layers' default kernels (Pallas / cuDNN) equal "xla".

  The projections around the kernels run at full float32 precision: XLA's
  default on a GPU is one TF32 pass, whose rounding of the kernels'
  float32-exact differences (1e-6) would alone exceed the float32 tolerance.
  """
  with jax.default_matmul_precision("highest"):
    _default_backends_match_xla(dtype)


def _default_backends_match_xla(dtype):
  x = jax.random.normal(jax.random.key(20), (2, 256, 128)).astype(dtype)
  for kw in (dict(num_kv_heads=2, sinks=True), dict(local_window_size=64)):
    fast = ann.MultiHeadAttention(in_features=128, num_heads=8, rope=True,
                                  dtype=dtype, rngs=nnx.Rngs(0), **kw)
    ref = ann.MultiHeadAttention(in_features=128, num_heads=8, rope=True,
                                 dtype=dtype, implementation="xla",
                                 rngs=nnx.Rngs(0), **kw)
    testing.assert_close(_call(fast, x), _call(ref, x), dtype)
    loss = lambda m, x: (m(x).astype(F32) ** 2).mean()
    grad = nnx.jit(nnx.grad(loss))
    testing.assert_close(jax.tree.leaves(grad(fast, x)),
                         jax.tree.leaves(grad(ref, x)), dtype, grad=True)
  fast = ann.LinearAttention(in_features=128, num_heads=4, gate="scalar",
                             dtype=dtype, rngs=nnx.Rngs(0))
  ref = ann.LinearAttention(in_features=128, num_heads=4, gate="scalar",
                            dtype=dtype, implementation="xla",
                            rngs=nnx.Rngs(0))
  testing.assert_close(_call(fast, x), _call(ref, x), dtype)
