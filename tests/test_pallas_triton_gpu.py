"""The Pallas Triton kernel on a real GPU (``pytest -m gpu``).

Compiled Triton at the heuristic tiles, T from 1k to 8k in bfloat16, causal
and full, GQA and MHA: forward, lse and VJP against the float32 reference,
bit-identical repeat runs, no NaN; and forward+backward at T = 131072 within
one H100's memory. Skipped without a GPU (conftest.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, testing
from attnjax.softmax import pallas as pallas_backend
from attnjax.softmax.problem import make_problem
from softmax_suite import _key, check_against_reference

pytestmark = pytest.mark.gpu
BF16 = jnp.bfloat16


def _impl(problem):
  return pallas_backend.triton_attention(problem, interpret=False)


def _assert_deterministic(inp, **kw):
  """Two runs of forward + VJP give bit-identical results."""

  @jax.jit
  def run(q, k, v, do):
    (o, lse), vjp = jax.vjp(
        lambda q, k, v: _impl(make_problem(q, k, v, **kw)[0]), q, k, v)
    return o, lse, vjp((do, jnp.zeros_like(lse)))

  a = run(inp.q, inp.k, inp.v, inp.d_out)
  b = run(inp.q, inp.k, inp.v, inp.d_out)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32),
                                  np.asarray(y, np.float32))
  testing.assert_finite(a, "forward and grads")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("t", [1024, 4096, 8192])
def test_gqa_bf16_matches_reference(t, causal):
  inp = testing.attention_inputs(_key("gpu", t, causal), batch=1, q_len=t,
                                 num_heads=16, num_kv_heads=4, head_dim=128,
                                 dtype=BF16)
  check_against_reference(_impl, inp, dtype=BF16, is_causal=causal)
  _assert_deterministic(inp, is_causal=causal)


@pytest.mark.parametrize("h,n,kh,t", [(64, 8, 8, 2048), (256, 4, 4, 1024),
                                      (80, 8, 2, 1500)])
def test_head_dims_bf16(h, n, kh, t):
  inp = testing.attention_inputs(_key("gpuh", h), batch=2, q_len=t,
                                 num_heads=n, num_kv_heads=kh, head_dim=h,
                                 dtype=BF16)
  check_against_reference(_impl, inp, dtype=BF16, is_causal=True)


def test_features_fp16():
  t = 2000
  inp = testing.attention_inputs(_key("gpuf"), batch=2, q_len=t, kv_len=t,
                                 num_heads=8, num_kv_heads=2, head_dim=64,
                                 dtype=jnp.float16)
  seg = testing.random_segment_ids(_key("gpus"), 2, t, 4)
  bias = jax.random.normal(_key("gpub"), (1, 8, 1, t)).astype(jnp.float16)
  sinks = jax.random.normal(_key("gpuk"), (8,))
  check_against_reference(
      _impl, inp, dtype=jnp.float16, bias=bias, sinks=sinks,
      arrays={"segment_ids": seg,
              "kv_lengths": jnp.array([t, 1500], jnp.int32)},
      logits_soft_cap=20.0, mask=(masks.LocalWindow(700, 0)
                                  | masks.Prefix(16)) & masks.Causal())


def test_float32_uses_full_precision_dots():
  inp = testing.attention_inputs(_key("gpu32"), batch=1, q_len=777,
                                 num_heads=4, num_kv_heads=2, head_dim=64)
  check_against_reference(_impl, inp, dtype=jnp.float32, is_causal=True)


def test_128k_forward_backward_fits_in_memory():
  """T = 131072, B=1, N=16, H=128, bf16: no [T, S] buffer anywhere."""
  b, t, n, h = 1, 131072, 16, 128
  q = jax.random.normal(_key("long", 0), (b, t, n, h), BF16)
  k = jax.random.normal(_key("long", 1), (b, t, n, h), BF16)
  v = jax.random.normal(_key("long", 2), (b, t, n, h), BF16)

  @functools.partial(jax.jit)
  def loss_and_grads(q, k, v):
    def loss(q, k, v):
      o, _ = _impl(make_problem(q, k, v, is_causal=True)[0])
      return jnp.sum(o.astype(jnp.float32))
    return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

  compiled = loss_and_grads.lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    # Inputs, outputs and O(T) residuals only: far below one [T, T] array.
    assert mem.temp_size_in_bytes < 8 * 2**30, mem
  val, grads = compiled(q, k, v)
  testing.assert_finite((val, grads), "128k loss and grads")


@pytest.mark.parametrize("h", [128, 256])
def test_split_dkdv(h):
  """dK and dV from separate programs per key block, at the default tiles
  of the head dim (those of the dataclass are sized for H <= 128)."""
  inp = testing.attention_inputs(_key("gpusplit", h), batch=2, q_len=1500,
                                 num_heads=8, num_kv_heads=2, head_dim=h,
                                 dtype=BF16)

  def fn(p):
    bs = dataclasses.replace(pallas_backend.default_block_sizes(p),
                             split_dkdv=True)
    return pallas_backend.triton_attention(p, block_sizes=bs, interpret=False)

  check_against_reference(fn, inp, dtype=BF16, is_causal=True)
