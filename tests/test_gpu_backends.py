"""GPU checks of the XLA-level backends and dispatch (run `pytest -m gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import testing

pytestmark = pytest.mark.gpu
BF16 = jnp.bfloat16


def _inp(seed, t=1024, n=8, kh=8, h=128, dtype=BF16):
  return testing.attention_inputs(jax.random.key(seed), batch=2, q_len=t,
                                  num_heads=n, num_kv_heads=kh, head_dim=h,
                                  dtype=dtype)


@pytest.mark.parametrize("kw", [
    dict(), dict(is_causal=True), dict(is_causal=True,
                                       local_window_size=(100, 0)),
    dict(key_value_seq_lengths=jnp.array([1024, 517], jnp.int32)),
    dict(query_seq_lengths=jnp.array([1024, 300], jnp.int32),
         is_causal=True),
], ids=["full", "causal", "window", "kv_lengths", "q_lengths"])
def test_cudnn_matches_reference(kw):
  inp = _inp(0, kh=2)
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                      implementation="cudnn", **kw)
  want = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                       implementation="xla", **kw)
  testing.assert_close(got, want, BF16)

  def loss(impl):
    return lambda q, k, v: jnp.sum(attnjax.dot_product_attention(
        q, k, v, implementation=impl, **kw).astype(jnp.float32)
                                   * inp.d_out.astype(jnp.float32))

  g = jax.grad(loss("cudnn"), (0, 1, 2))(inp.q, inp.k, inp.v)
  g_ref = jax.grad(loss("xla"), (0, 1, 2))(inp.q, inp.k, inp.v)
  testing.assert_close(g, g_ref, BF16, grad=True)


@pytest.mark.parametrize("impl", ["xla_chunked", None])
def test_full_feature_request_on_gpu(impl):
  inp = _inp(1, t=777, n=6, kh=3, h=64)
  seg = testing.random_segment_ids(jax.random.key(2), 2, 777, 3)
  kw = dict(segment_ids=seg, sinks=jnp.linspace(-1, 1, 6),
            logits_soft_cap=20.0, is_causal=True, local_window_size=(300, 0))
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                      implementation=impl, **kw)
  want = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                       implementation="xla", **kw)
  testing.assert_close(got, want, BF16)
  testing.assert_finite(got)


def test_default_dispatch_is_deterministic():
  inp = _inp(3, t=2048)
  f = jax.jit(lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True))
  a, b = f(inp.q, inp.k, inp.v), f(inp.q, inp.k, inp.v)
  np.testing.assert_array_equal(np.asarray(a, np.float32),
                                np.asarray(b, np.float32))
  testing.assert_finite(a)
