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


def _assert_grads_close(actual, expected, name):
  """Gradient pytrees compared leaf by leaf, each against its own magnitude.

  Gradients sum O(1) products over all B * T tokens, so entries exceed 1:
  each leaf's tolerance scales with the largest entry of that leaf's own
  reference gradient (at least 1), never with another leaf's, so that
  small-gradient parameters stay checked at their own size.
  """
  a_flat = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
  e_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  assert a_flat.keys() == e_flat.keys(), (a_flat.keys(), e_flat.keys())
  for path, e in e_flat.items():
    testing.assert_close(a_flat[path], e, F32, grad=True,
                         name=f"{name}{jax.tree_util.keystr(path)}",
                         scale=float(jnp.abs(e).max()))


def _layer_grads(layer, x, ct):
  """(d params as a pure dict, d x) of sum(layer(x) * ct)."""
  loss = lambda model, x: (model(x) * ct).sum()
  g_layer, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
  return nnx.to_pure_dict(g_layer), g_x


def _params(layer):
  return nnx.to_pure_dict(nnx.state(layer, nnx.Param))


# Independent float32 references (plain jnp; nothing from attnjax.nn) ------


def _rope_ref(x, positions, base):
  """x [B, T, N, H] rotated: pair (x_i, x_{i + H/2}) by pos * base^(-2i/H)."""
  h = x.shape[-1]
  half = h // 2
  i = jnp.arange(half, dtype=F32)
  freq = jnp.asarray(base, F32) ** (-2.0 * i / h)
  pos = jnp.broadcast_to(positions, x.shape[:2]).astype(F32)
  ang = pos[:, :, None, None] * freq  # [B, T, 1, H/2]
  c, s = jnp.cos(ang), jnp.sin(ang)
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _rms_ref(x, scale, eps):
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _sigmoid_ref(z):
  return 1.0 / (1.0 + jnp.exp(-z))


def _mha_ref(p, x, *, num_heads, num_kv_heads, rope=False, rope_base=1e4,
             qk_norm_eps=None, sigmoid_bias=None, window=None,
             return_weights=False):
  """Causal self-attention from the layer's parameter dict ``p``.

  Softmax (with ``p["sinks"]`` in the denominator if present) or, with
  ``sigmoid_bias``, sum_j [visible] sigmoid(q.k / sqrt(H) + b) v_j; then
  the output gate sigmoid(x W_g) (if ``p["gate_proj"]``) and W_o.
  """
  b, t, _ = x.shape
  n, kh = num_heads, num_kv_heads
  wq = p["q_proj"]["kernel"]
  h = wq.shape[1] // n
  q = (x @ wq).reshape(b, t, n, h)
  k = (x @ p["k_proj"]["kernel"]).reshape(b, t, kh, h)
  v = (x @ p["v_proj"]["kernel"]).reshape(b, t, kh, h)
  if qk_norm_eps is not None:
    q = _rms_ref(q, p["q_norm"]["scale"], qk_norm_eps)
    k = _rms_ref(k, p["k_norm"]["scale"], qk_norm_eps)
  if rope:
    pos = jnp.arange(t)
    q, k = _rope_ref(q, pos, rope_base), _rope_ref(k, pos, rope_base)
  kv_head = jnp.arange(n) // (n // kh)  # query head -> its key/value head
  k, v = k[:, :, kv_head], v[:, :, kv_head]
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  ti, si = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  vis = si <= ti
  if window is not None:
    vis &= si >= ti - window
  if sigmoid_bias is not None:
    w = jnp.where(vis, _sigmoid_ref(s + sigmoid_bias), 0.0)
  else:
    m = jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1, keepdims=True)
    if "sinks" in p:
      sink = p["sinks"][None, :, None, None]
      m = jnp.maximum(m, sink)
    e = jnp.where(vis, jnp.exp(s - m), 0.0)
    den = e.sum(-1, keepdims=True)
    if "sinks" in p:
      den = den + jnp.exp(sink - m)
    w = e / den
  if return_weights:
    return w
  o = jnp.einsum("bnts,bsnh->btnh", w, v)
  if "gate_proj" in p:
    o = o * _sigmoid_ref((x @ p["gate_proj"]["kernel"]).reshape(b, t, n, h))
  return o.reshape(b, t, n * h) @ p["o_proj"]["kernel"]


def _check_mha_against_ref(layer, x, key, **ref_kw):
  """Forward and gradients (w.r.t. x and every parameter) vs _mha_ref."""
  p = _params(layer)
  ref = jax.jit(lambda p, x: _mha_ref(p, x, **ref_kw))
  expected = ref(p, x)
  testing.assert_close(_call(layer, x), expected, F32, name="forward")
  ct = jax.random.normal(key, expected.shape)
  g_p, g_x = _layer_grads(layer, x, ct)
  e_p, e_x = jax.jit(jax.grad(lambda p, x: (ref(p, x) * ct).sum(),
                              argnums=(0, 1)))(p, x)
  _assert_grads_close(g_x, e_x, "d x")
  _assert_grads_close(g_p, e_p, "d params")


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
  # Gradients with respect to the input and the parameters, through a
  # random output cotangent; each leaf at its own scale.
  ct = jax.random.normal(jax.random.key(3), x.shape)
  def loss(model, x, m):
    return (model(x, mask=m) * ct).sum()
  grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
  (g_ref, gx_ref), (g_ours, gx_ours) = grad(ref, x, m), grad(ours, x, m)
  _assert_grads_close(gx_ours, gx_ref, "d x")
  _assert_grads_close(nnx.to_pure_dict(g_ours), nnx.to_pure_dict(g_ref),
                      "d params")


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
  """Sinks + output gate (+ GQA, RoPE, QK-norm) against _mha_ref."""
  layer = ann.MultiHeadAttention(in_features=16, num_heads=4, num_kv_heads=2,
                                 rope=True, qk_norm=True, sinks=True,
                                 output_gate=True, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(8), 6)
  # Every parameter random: sinks and norm scales (zeros / ones at init),
  # and a fresh gate kernel (a zero one would make the gate a constant 0.5).
  layer.sinks[...] = jax.random.normal(keys[0], (4,))
  layer.q_norm.scale[...] = 1.0 + 0.5 * jax.random.normal(keys[1], (4,))
  layer.k_norm.scale[...] = 1.0 + 0.5 * jax.random.normal(keys[2], (4,))
  layer.gate_proj.kernel[...] = jax.random.normal(keys[3], (16, 16)) * 0.5
  x = jax.random.normal(keys[4], (2, 7, 16))
  kw = dict(num_heads=4, num_kv_heads=2, rope=True,
            qk_norm_eps=layer.q_norm.eps)
  w = layer.attention_weights(x)
  assert w.shape == (2, 4, 7, 7)
  assert float(jnp.abs(jnp.triu(w, 1)).max()) == 0.0
  # Rows sum to 1 minus the sink's share exp(sink) / (exp(sink) + Z).
  testing.assert_close(w, _mha_ref(_params(layer), x, return_weights=True,
                                   **kw), F32, name="weights")
  # y = o_proj(sigmoid(x W_g) * attn), forward and gradients.
  _check_mha_against_ref(layer, x, keys[5], **kw)


SIGMOID_CONFIGS = {
    "gqa_rope": dict(num_heads=4, num_kv_heads=2, rope=True,
                     sigmoid_bias=-math.log(9)),
    "window_rope_base": dict(num_heads=2, rope=True, rope_base=500.0,
                             local_window_size=3, sigmoid_bias=0.7),
}


@pytest.mark.parametrize("config", sorted(SIGMOID_CONFIGS))
def test_sigmoid_attention_matches_reference(config):
  """sum_j [visible] sigmoid(q.k / sqrt(H) + b) v_j, from the projections."""
  kw = dict(SIGMOID_CONFIGS[config])
  layer = ann.MultiHeadAttention(in_features=16, normalization="sigmoid",
                                 rngs=nnx.Rngs(3), **kw)
  x = jax.random.normal(jax.random.key(13), (2, 9, 16))
  ref_kw = dict(num_heads=kw["num_heads"],
                num_kv_heads=kw.get("num_kv_heads", kw["num_heads"]),
                rope=kw["rope"], rope_base=kw.get("rope_base", 1e4),
                sigmoid_bias=kw["sigmoid_bias"],
                window=kw.get("local_window_size"))
  testing.assert_close(layer.attention_weights(x),
                       _mha_ref(_params(layer), x, return_weights=True,
                                **ref_kw), F32, name="weights")
  _check_mha_against_ref(layer, x, jax.random.key(14), **ref_kw)


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


def test_rms_norm_formula():
  """x / sqrt(mean(x^2) + eps) * scale with a random scale."""
  x = jax.random.normal(jax.random.key(15), (2, 5, 8)) * 3.0
  scale = jax.random.normal(jax.random.key(16), (8,))
  for eps, amp in ((1e-6, 1.0), (0.5, 0.3)):  # a large eps: where it goes
    norm = ann.RMSNorm(8, eps=eps)
    norm.scale[...] = scale
    testing.assert_close(norm(x * amp), _rms_ref(x * amp, scale, eps), F32,
                         name=f"eps={eps}")


def test_rope_formula():
  """Rotate-half: (x_i, x_{i+H/2}) rotated by pos * base ** (-2i / H)."""
  x = jax.random.normal(jax.random.key(17), (2, 6, 3, 8))
  pos = jax.random.randint(jax.random.key(18), (2, 6), 0, 50)
  for base in (10000.0, 500.0):
    testing.assert_close(ann.apply_rope(x, pos, base),
                         _rope_ref(x, pos, base), F32, name=f"base={base}")
    testing.assert_close(ann.apply_rope(x, pos[0], base),
                         _rope_ref(x, pos[0], base), F32,
                         name=f"[T] positions, base={base}")
  testing.assert_close(ann.apply_rope(x, pos), _rope_ref(x, pos, 10000.0),
                       F32, name="default base")


def test_short_conv_formula():
  """y_t = sum_i w_i x_{t-k+1+i} (zeros before the start), random w."""
  t, c, ks = 7, 5, 3
  x = jax.random.normal(jax.random.key(19), (2, t, c))
  w = jax.random.normal(jax.random.key(20), (ks, c))
  conv = ann.ShortConv(c, ks, rngs=nnx.Rngs(0))
  conv.weight[...] = w
  # Dense causal Toeplitz form: output t takes input s with tap k-1-(t-s).
  lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
  taps = w[jnp.clip(ks - 1 - lag, 0, ks - 1)]  # [T, S, C]
  taps = jnp.where(((lag >= 0) & (lag < ks))[..., None], taps, 0.0)
  y, state = conv(x)
  testing.assert_close(y, jnp.einsum("tsc,bsc->btc", taps, x), F32)
  np.testing.assert_array_equal(state, x[:, t - (ks - 1):])


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
