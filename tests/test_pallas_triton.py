"""The portable Pallas (Triton) flash kernel against the reference.

CPU: the kernel runs in the Pallas interpreter at small tiles (16 x 16), so
every case has several query and key blocks: ragged last blocks, EMPTY-tile
skipping, FULL/PARTIAL tiles and GQA head packing are all exercised.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks, testing
from attnjax.softmax import pallas as pallas_backend
from attnjax.softmax import xla as xla_backend
from attnjax.softmax.problem import make_problem
from pallas_kernels.flash import common
from softmax_suite import SoftmaxSuite, _key, check_against_reference

F32 = jnp.float32

SMALL = pallas_backend.BlockSizes(
    block_q=16, block_kv=16, num_warps=4, num_stages=2, block_q_dq=16,
    block_kv_dq=16, block_q_dkv=16, block_kv_dkv=16)


class TestPallasTritonInterpret(SoftmaxSuite):
  """The shared suite at 16 x 16 tiles in interpret mode."""

  @staticmethod
  def impl(problem):
    return pallas_backend.triton_attention(problem, block_sizes=SMALL,
                                           interpret=True)


# Cases beyond the shared suite: paths specific to this kernel. ------------

_impl = TestPallasTritonInterpret.impl


def test_non_power_of_two_group_with_head_bias():
  # G = 3 query heads per K/V head are packed as 4 rows (one masked): the
  # per-head bias, its gradient and segment ids must ignore the padding row.
  inp = testing.attention_inputs(_key("g3"), q_len=35, kv_len=35,
                                 num_heads=6, num_kv_heads=2)
  bias = jax.random.normal(_key("g3b"), (1, 6, 35, 35))
  seg = testing.random_segment_ids(_key("g3s"), 2, 35, 3)
  sinks = jax.random.normal(_key("g3k"), (6,))
  check_against_reference(_impl, inp, dtype=F32, bias=bias, sinks=sinks,
                          arrays={"segment_ids": seg}, is_causal=True)


@pytest.mark.parametrize("shape", [(1, 1, 33, 40), (2, 4, 1, 40),
                                   (1, 4, 33, 1), (2, 1, 33, 40)],
                         ids=["shared", "key_bias", "query_bias", "no_heads"])
def test_bias_gradient_broadcasts_with_gqa(shape):
  # dbias is reduced in-kernel over packed heads / rows, then over programs.
  inp = testing.attention_inputs(_key("bb", shape), q_len=33, kv_len=40,
                                 num_heads=4, num_kv_heads=2)
  bias = jax.random.normal(_key("bbv", shape), shape)
  check_against_reference(_impl, inp, dtype=F32, bias=bias,
                          local_window_size=(20, 5))


def test_head_dim_96_value_dim_48_soft_cap():
  # Head dims are padded to the next power of two inside the kernel.
  inp = testing.attention_inputs(_key("hd96"), q_len=30, kv_len=27,
                                 num_heads=4, num_kv_heads=1, head_dim=96,
                                 value_head_dim=48)
  check_against_reference(_impl, inp, dtype=F32, logits_soft_cap=3.0,
                          mask=masks.Causal(offset=-3))


def test_empty_tiles_are_never_loaded():
  # Keys 32..47 are invisible to every query: with 16-wide key tiles that
  # block is EMPTY everywhere. NaN there would poison any tile that loaded
  # it (0 * NaN in p @ V), so a finite, correct result shows it was skipped.
  t = 64
  inp = testing.attention_inputs(_key("poison"), q_len=t, kv_len=t,
                                 num_heads=2, num_kv_heads=1)
  hole = masks.FromFunction(_outside_hole)
  poison = (jnp.arange(t) >= 32) & (jnp.arange(t) < 48)
  nan_k = jnp.where(poison[None, :, None, None], jnp.nan, inp.k)
  nan_v = jnp.where(poison[None, :, None, None], jnp.nan, inp.v)
  p, _ = make_problem(inp.q, nan_k, nan_v, mask=hole & masks.Causal())
  out, lse = _impl(p)
  ref_p, _ = make_problem(inp.q, inp.k, inp.v, mask=hole & masks.Causal())
  out_r, lse_r = xla_backend.xla_attention(ref_p)
  testing.assert_close(out, out_r, F32)
  testing.assert_close(lse, lse_r, F32)

  def loss(q, k, v):
    o, _ = _impl(make_problem(q, k, v, mask=hole & masks.Causal())[0])
    return jnp.sum(o * inp.d_out)

  dq, dk, dv = jax.grad(loss, (0, 1, 2))(inp.q, nan_k, nan_v)
  testing.assert_finite((dq, dk, dv), "grads")
  np.testing.assert_array_equal(np.asarray(dk[:, 32:48]), 0.0)


def _outside_hole(q, k):
  del q
  return (k < 32) | (k >= 48)


def test_plan_classes():
  """Causal tiles: FULL ranges below the diagonal, PARTIAL on it, no lists."""
  plan, arr, aux = common.make_plan(masks.Causal(), 64, 64, 16, 16, 1, 1)
  assert aux is None and plan.full_range and plan.partial_range
  assert plan.reverse  # later query blocks have more work: launched first
  np.testing.assert_array_equal(arr[0, :, 0], [0, 1, 2, 3])  # n_full
  np.testing.assert_array_equal(arr[0, :, 1], [1, 1, 1, 1])  # n_partial
  np.testing.assert_array_equal(arr[0, :, 3], [0, 1, 2, 3])  # diagonal
  # Transposed (per key block): the query blocks below it are FULL.
  plan_t, arr_t, _ = common.make_plan(masks.Causal(), 64, 64, 16, 16, 1, 1,
                                      kv_major=True)
  assert not plan_t.reverse
  np.testing.assert_array_equal(arr_t[0, :, 0], [3, 2, 1, 0])
  np.testing.assert_array_equal(arr_t[0, :, 2], [1, 2, 3, 0])
  # Ragged ends are PARTIAL (bounds checked) even for an unmasked problem.
  _, arr_r, _ = common.make_plan(None, 40, 40, 16, 16, 1, 1)
  np.testing.assert_array_equal(arr_r[0, :, :2], [[2, 1], [2, 1], [0, 3]])


def test_misaligned_block_sparse_is_not_implemented():
  inp = testing.attention_inputs(_key("mis"), q_len=32, kv_len=32)
  mask = masks.BlockSparse(np.ones((1, 4, 4), bool), (8, 8))
  p, _ = make_problem(inp.q, inp.k, inp.v, mask=mask)
  with pytest.raises(NotImplementedError, match="multiple of the kernel"):
    _impl(p)


def test_unsupported_requests_raise_not_implemented():
  inp = testing.attention_inputs(_key("big"), q_len=8, head_dim=320)
  p, _ = make_problem(inp.q, inp.k, inp.v)
  with pytest.raises(NotImplementedError, match="head dims"):
    pallas_backend.triton_attention(p)


def test_dispatch_name():
  """implementation="pallas" reaches this kernel on CPU (interpret mode)."""
  inp = testing.attention_inputs(_key("disp"), q_len=19, num_heads=2)
  out = attnjax.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                      implementation="pallas")
  ref = attnjax.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                      implementation="xla")
  testing.assert_close(out, ref, F32)


@pytest.mark.parametrize("causal", [False, True])
def test_split_dkdv_matches_reference(causal):
  """dK and dV from separate programs per key block (``split_dkdv``): GQA,
  odd lengths, segment ids, key lengths, sinks, soft-cap and a bias with
  its gradient."""
  bs = dataclasses.replace(SMALL, split_dkdv=True)
  inp = testing.attention_inputs(_key("split", causal), q_len=45, kv_len=53,
                                 num_heads=6, num_kv_heads=2, head_dim=24,
                                 value_head_dim=40)
  qs = testing.random_segment_ids(_key("splitq"), 2, 45, 3)
  ks = testing.random_segment_ids(_key("splitk"), 2, 53, 3)
  bias = jax.random.normal(_key("splitb"), (1, 6, 45, 53))
  sinks = jax.random.normal(_key("splits"), (6,))
  check_against_reference(
      lambda p: pallas_backend.triton_attention(p, block_sizes=bs,
                                                interpret=True),
      inp, dtype=F32, bias=bias, sinks=sinks, logits_soft_cap=7.0,
      arrays={"segment_ids": (qs, ks),
              "kv_lengths": jnp.array([53, 31], jnp.int32)},
      is_causal=causal)
