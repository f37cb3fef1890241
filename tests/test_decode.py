"""attnjax.decode_attention against dot_product_attention on the same cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import testing

F32 = jnp.float32


def _reference(q, k, v, lengths, window=None, **kw):
  """dot_product_attention ("xla") with the decode positions as a mask."""
  b, tq = q.shape[:2]
  s = k.shape[1]
  pos = lengths[:, None] - tq + jnp.arange(tq)[None]
  j = jnp.arange(s)[None, None]
  vis = (j <= pos[..., None]) & (j < lengths[:, None, None])
  if window is not None:
    vis &= (j >= pos[..., None] - window[0]) & (j <= pos[..., None] +
                                               window[1])
  return attnjax.dot_product_attention(q, k, v, mask=vis[:, None],
                                       implementation="xla", **kw)


@pytest.mark.parametrize("impl", ["xla", "xla_split"])
@pytest.mark.parametrize("tq", [1, 3])
def test_matches_dot_product_attention(impl, tq):
  inp = testing.attention_inputs(jax.random.key(tq), q_len=tq, kv_len=77,
                                 num_heads=6, num_kv_heads=2,
                                 value_head_dim=24)
  lengths = jnp.array([77, 31], jnp.int32)
  sinks = jnp.array([0.3, -1, 2, 0, 1, -2.0])
  got = attnjax.decode_attention(
      inp.q[:, 0] if tq == 1 else inp.q, inp.k, inp.v, kv_lengths=lengths,
      sinks=sinks, logits_soft_cap=7.0, num_splits=4, implementation=impl)
  want = _reference(inp.q, inp.k, inp.v, lengths, sinks=sinks,
                    logits_soft_cap=7.0)
  testing.assert_close(got, want[:, 0] if tq == 1 else want, F32)


def test_window_and_split_gradients():
  inp = testing.attention_inputs(jax.random.key(5), q_len=2, kv_len=40)
  lengths = jnp.array([40, 12], jnp.int32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * inp.d_out)

  split = lambda q, k, v: attnjax.decode_attention(
      q, k, v, kv_lengths=lengths, local_window_size=(9, 0), num_splits=3,
      implementation="xla_split")
  ref = lambda q, k, v: _reference(q, k, v, lengths, window=(9, 0))
  testing.assert_close(split(inp.q, inp.k, inp.v), ref(inp.q, inp.k, inp.v),
                       F32)
  g = jax.grad(loss(split), (0, 1, 2))(inp.q, inp.k, inp.v)
  g_ref = jax.grad(loss(ref), (0, 1, 2))(inp.q, inp.k, inp.v)
  testing.assert_close(g, g_ref, F32, grad=True)


@pytest.mark.parametrize("impl", ["xla", "xla_split"])
@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_empty_cache_row_is_zero(impl, dtype):
  """A sequence with an empty cache: zero output and zero (never NaN)
  gradients, with sinks and four splits; the other row and its gradients
  match the masked reference, in float32 and bf16."""
  inp = testing.attention_inputs(jax.random.key(6), q_len=1, kv_len=70,
                                 num_heads=4, num_kv_heads=2, dtype=dtype)
  lengths = jnp.array([0, 53], jnp.int32)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  q = inp.q[:, 0]
  d_out = inp.d_out[:, 0]

  def run(q, k, v, sinks):
    return attnjax.decode_attention(q, k, v, kv_lengths=lengths, sinks=sinks,
                                    num_splits=4, implementation=impl)

  def ref(q, k, v, sinks):
    return _reference(q[:, None], k, v, lengths, sinks=sinks)[:, 0]

  out = run(q, inp.k, inp.v, sinks)
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
  testing.assert_close(out[1], ref(q, inp.k, inp.v, sinks)[1], dtype)
  loss = lambda fn: lambda *a: jnp.sum(  # noqa: E731
      fn(*a).astype(F32) * d_out.astype(F32))
  g = jax.grad(loss(run), (0, 1, 2, 3))(q, inp.k, inp.v, sinks)
  g_ref = jax.grad(loss(ref), (0, 1, 2, 3))(q, inp.k, inp.v, sinks)
  testing.assert_finite(g)
  for x in g[:3]:  # dq, dk, dv of the empty sequence
    np.testing.assert_array_equal(np.asarray(x[0], np.float32), 0.0)
  for name, x, y in zip(("dq", "dk", "dv", "dsinks"), g, g_ref):
    testing.assert_close(x, y, dtype, grad=True, name=name,
                         scale=float(jnp.max(jnp.abs(y.astype(F32)))))


@pytest.mark.parametrize("kw,arg", [
    (dict(kv_lengths=jnp.array([1, 2, 3])), "kv_lengths"),
    (dict(kv_lengths=jnp.array([1, 2]), sinks=jnp.zeros(3)), "sinks"),
    (dict(kv_lengths=jnp.array([1, 2]), local_window_size=(-1, 0)),
     "local_window_size"),
    (dict(kv_lengths=jnp.array([1, 2]), implementation="pallas_foo"),
     "implementation"),
])
def test_value_errors(kw, arg):
  q = jnp.zeros((2, 4, 8))
  cache = jnp.zeros((2, 16, 2, 8))
  with pytest.raises(ValueError, match=arg):
    attnjax.decode_attention(q, cache, cache, **kw)
