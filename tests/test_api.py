"""attnjax.dot_product_attention: jax.nn compatibility, validation, dispatch."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attnjax
from attnjax import masks, testing

F32 = jnp.float32
CPU_IMPLS = ["xla", "xla_chunked"]


def _inputs(seed=0, **kw):
  return testing.attention_inputs(jax.random.key(seed), **kw)


# jax.nn compatibility --------------------------------------------------------

JAX_NN_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window_tuple": dict(local_window_size=(4, 2)),
    "window_int": dict(local_window_size=3),
    "causal_window": dict(is_causal=True, local_window_size=(5, 0)),
    "scale": dict(scale=0.3),
}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", list(JAX_NN_CASES))
@pytest.mark.parametrize("kvh", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_matches_jax_nn(impl, case, kvh):
  inp = _inputs(1, q_len=29, num_kv_heads=kvh)
  kw = JAX_NN_CASES[case]
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v, implementation=impl,
                                      **kw)
  want = jax.nn.dot_product_attention(inp.q, inp.k, inp.v, **kw)
  testing.assert_close(got, want, F32)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matches_jax_nn_bias_mask_lengths(impl):
  inp = _inputs(2, q_len=24, kv_len=30)
  bias = jax.random.normal(jax.random.key(3), (2, 4, 24, 30))
  mask = jax.random.bernoulli(jax.random.key(4), 0.7, (2, 1, 24, 30))
  mask = mask.at[..., 0].set(True)  # no empty rows: jax.nn averages those
  qlen = jnp.array([24, 13], jnp.int32)
  kvlen = jnp.array([30, 9], jnp.int32)
  got = attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, bias, mask, query_seq_lengths=qlen,
      key_value_seq_lengths=kvlen, implementation=impl)
  want = jax.nn.dot_product_attention(
      inp.q, inp.k, inp.v, bias, mask, query_seq_lengths=qlen,
      key_value_seq_lengths=kvlen)
  # jax.nn leaves padded query rows unspecified; attnjax zeroes them.
  testing.assert_close(got[0], want[0], F32)
  testing.assert_close(got[1, :13], want[1, :13], F32)
  np.testing.assert_array_equal(np.asarray(got[1, 13:]), 0.0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_residuals_match_jax_nn(impl):
  inp = _inputs(5, q_len=17)
  out, lse = attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, is_causal=True, return_residuals=True,
      implementation=impl)
  want, res = jax.nn.dot_product_attention(
      inp.q, inp.k, inp.v, is_causal=True, return_residual=True)
  assert lse.shape == (2, 4, 17) and lse.dtype == F32
  testing.assert_close(out, want, F32)
  testing.assert_close(lse, jnp.transpose(res, (0, 2, 1)), F32)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_unbatched(impl):
  inp = _inputs(6, q_len=11, unbatched=True, num_kv_heads=2)
  got, lse = attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, is_causal=True, implementation=impl,
      return_residuals=True)
  want = jax.nn.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True)
  assert got.shape == (11, 4, 32) and lse.shape == (4, 11)
  testing.assert_close(got, want, F32)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtype(impl, dtype):
  inp = _inputs(7, dtype=dtype)
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                      implementation=impl)
  assert got.dtype == dtype
  want = jax.nn.dot_product_attention(inp.q.astype(F32), inp.k.astype(F32),
                                      inp.v.astype(F32), is_causal=True)
  testing.assert_close(got, want, dtype)


def test_grad_jit_vmap_through_api():
  inp = _inputs(8, q_len=13)

  def loss(q, k, v, impl):
    o = attnjax.dot_product_attention(q, k, v, is_causal=True,
                                      implementation=impl)
    return jnp.sum(o * inp.d_out)

  g_ref = jax.grad(loss, (0, 1, 2))(inp.q, inp.k, inp.v, "xla")
  g = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(
      inp.q, inp.k, inp.v, "xla_chunked")
  testing.assert_close(g, g_ref, F32, grad=True)
  per_example = jax.vmap(
      lambda q, k, v: attnjax.dot_product_attention(
          q, k, v, is_causal=True, implementation="xla_chunked"))(
              inp.q, inp.k, inp.v)  # vmap over B: unbatched [T, N, H] calls
  testing.assert_close(per_example, attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, is_causal=True, implementation="xla"), F32)


# Extensions ------------------------------------------------------------------


def test_mask_object_equals_flags():
  inp = _inputs(9, q_len=21)
  a = attnjax.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                    local_window_size=(4, 0))
  b = attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, mask=masks.Causal() & masks.LocalWindow(4, 0))
  testing.assert_close(a, b, F32)


def test_bottom_right_causal_for_cache():
  # A few new queries at the end of a longer key sequence: Causal(S - T).
  inp = _inputs(10, q_len=4, kv_len=12)
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                      mask=masks.Causal(offset=8))
  full_q = jnp.concatenate([jnp.zeros((2, 8, 4, 32)), inp.q], axis=1)
  want = attnjax.dot_product_attention(full_q, inp.k, inp.v, is_causal=True)
  testing.assert_close(got, want[:, 8:], F32)


def test_segment_ids_equal_block_diagonal_mask():
  inp = _inputs(11, q_len=20)
  seg = jnp.array([[0] * 7 + [1] * 13, [0] * 20], jnp.int32)
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v, segment_ids=seg,
                                      is_causal=True)
  block = seg[:, None, :, None] == seg[:, None, None, :]
  want = attnjax.dot_product_attention(inp.q, inp.k, inp.v, mask=block,
                                      is_causal=True)
  testing.assert_close(got, want, F32)


def test_sinks_equal_extra_zero_value_key():
  inp = _inputs(12, q_len=9)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  got = attnjax.dot_product_attention(inp.q, inp.k, inp.v, sinks=sinks)
  # A sink is a key whose logit is sinks[n] for every query and value 0.
  scale = 1 / np.sqrt(32)
  bias = jnp.concatenate(
      [jnp.zeros((1, 4, 9, 9)), jnp.broadcast_to(
          sinks[None, :, None, None] / 1.0, (1, 4, 9, 1))], axis=-1)
  k = jnp.concatenate([inp.k, jnp.zeros((2, 1, 4, 32))], axis=1)
  v = jnp.concatenate([inp.v, jnp.zeros((2, 1, 4, 32))], axis=1)
  want = jax.nn.dot_product_attention(inp.q, k, v, bias, scale=scale)
  testing.assert_close(got, want, F32)


def test_soft_cap_definition():
  inp = _inputs(13, q_len=8)
  got = attnjax.dot_product_attention(inp.q * 5, inp.k * 5, inp.v,
                                      logits_soft_cap=2.0)
  logits = jnp.einsum("btnh,bsnh->bnts", inp.q * 5, inp.k * 5) / np.sqrt(32)
  p = jax.nn.softmax(2.0 * jnp.tanh(logits / 2.0), axis=-1)
  want = jnp.einsum("bnts,bsnh->btnh", p, inp.v)
  testing.assert_close(got, want, F32)


def test_fully_masked_row_zero_without_nan_grad():
  inp = _inputs(14, q_len=6)
  mask = jnp.ones((1, 1, 6, 6), bool).at[0, 0, 2].set(False)

  def loss(q, k, v):
    return jnp.sum(attnjax.dot_product_attention(q, k, v, mask=mask) ** 2)

  out = attnjax.dot_product_attention(inp.q, inp.k, inp.v, mask=mask)
  np.testing.assert_array_equal(np.asarray(out[:, 2]), 0.0)
  grads = jax.grad(loss, (0, 1, 2))(inp.q, inp.k, inp.v)
  testing.assert_finite(grads)
  np.testing.assert_array_equal(np.asarray(grads[0][:, 2]), 0.0)


# Validation ------------------------------------------------------------------

q4 = jnp.zeros((2, 8, 4, 16))
k4 = jnp.zeros((2, 10, 2, 16))


@pytest.mark.parametrize("kwargs,arg", [
    (dict(query=jnp.zeros((8, 16)), key=k4, value=k4), "query"),
    (dict(query=q4, key=k4[0], value=k4), "key"),
    (dict(query=q4, key=k4, value=k4[..., :1, :].repeat(3, 2)), "value"),
    (dict(query=jnp.zeros((2, 8, 3, 16)), key=k4, value=k4), "heads"),
    (dict(query=q4, key=jnp.zeros((2, 10, 2, 8)), value=k4), "head dim"),
    (dict(query=q4, key=k4, value=jnp.zeros((2, 9, 2, 16))), "value length"),
    (dict(query=q4.astype(jnp.bfloat16), key=k4, value=k4), "dtype"),
    (dict(query=q4.astype(jnp.int32), key=k4, value=k4), "query"),
    (dict(query=q4, key=k4, value=k4, bias=jnp.zeros((3, 4, 8, 10))), "bias"),
    (dict(query=q4, key=k4, value=k4, mask=jnp.zeros((8, 10))), "mask"),
    (dict(query=q4, key=k4, value=k4, mask=jnp.ones((1, 5, 8, 10), bool)),
     "mask"),
    (dict(query=q4, key=k4, value=k4, local_window_size=(-1, 2)),
     "local_window_size"),
    (dict(query=q4, key=k4, value=k4, local_window_size=(1, 2, 3)),
     "local_window_size"),
    (dict(query=q4, key=k4, value=k4,
          query_seq_lengths=jnp.array([1, 2, 3])), "query_seq_lengths"),
    (dict(query=q4, key=k4, value=k4,
          key_value_seq_lengths=jnp.array([1.0, 2.0])),
     "key_value_seq_lengths"),
    (dict(query=q4, key=k4, value=k4, segment_ids=jnp.zeros((2, 8), int)),
     "segment_ids"),
    (dict(query=q4, key=k4, value=k4,
          segment_ids=(jnp.zeros((2, 8), int), jnp.zeros((2, 8), int))),
     "segment_ids"),
    (dict(query=q4, key=k4, value=k4, sinks=jnp.zeros((2,))), "sinks"),
    (dict(query=q4, key=k4, value=k4, logits_soft_cap=-1.0),
     "logits_soft_cap"),
    (dict(query=q4, key=k4, value=k4, is_causal="yes"), "is_causal"),
    (dict(query=q4, key=k4, value=k4, implementation="flash"),
     "implementation"),
    (dict(query=q4, key=k4, value=k4,
          mask=masks.BlockSparse(np.ones((3, 1, 1), bool), (8, 16))),
     "mask"),
])
def test_value_errors_name_the_argument(kwargs, arg):
  kwargs = dict(kwargs)
  args = [kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value")]
  with pytest.raises(ValueError, match=re.escape(arg)):
    attnjax.dot_product_attention(*args, **kwargs)


# Dispatch --------------------------------------------------------------------


def test_named_backend_that_cannot_serve_raises():
  inp = _inputs(15)
  if jax.default_backend() == "gpu":
    pytest.skip("cudnn serves this request on a GPU")
  with pytest.raises(NotImplementedError):
    attnjax.dot_product_attention(inp.q, inp.k, inp.v, implementation="cudnn")


def test_sequence_falls_through_not_implemented_only():
  inp = _inputs(16)
  got = attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, implementation=("cudnn", "xla_chunked"))
  want = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                      implementation="xla")
  testing.assert_close(got, want, F32)


def test_all_backends_failing_raises_exception_group():
  inp = _inputs(17)
  if jax.default_backend() == "gpu":
    pytest.skip("cudnn serves this request on a GPU")
  with pytest.raises(ExceptionGroup):
    attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                  implementation=("cudnn", "cudnn"))


def test_none_always_works():
  # Whatever backend None picks here, it serves every feature at once and
  # matches the float64 NumPy oracle (not another attnjax backend).
  from test_xla_reference import numpy_attention  # pylint: disable=g-import-not-at-top
  inp = _inputs(18, q_len=40, value_head_dim=8)
  seg = testing.random_segment_ids(jax.random.key(0), 2, 40)
  sinks = jnp.linspace(-1.0, 1.0, 4)
  got = attnjax.dot_product_attention(
      inp.q, inp.k, inp.v, segment_ids=seg, sinks=sinks,
      logits_soft_cap=3.0, is_causal=True)
  want, _, _ = numpy_attention(
      inp.q, inp.k, inp.v, inp.d_out, scale=1 / np.sqrt(32),
      vis=np.tril(np.ones((40, 40), bool)), q_seg=seg, kv_seg=seg,
      sinks=np.asarray(sinks, np.float64), cap=3.0)
  testing.assert_close(got, want, F32)


# Property tests --------------------------------------------------------------

GQA = [(1, 1), (2, 1), (4, 2), (6, 3), (4, 4), (8, 2)]
MASKS = [None, masks.Causal(), masks.LocalWindow(5, 1),
         masks.Causal() & masks.LocalWindow(7, 0), masks.ChunkedCausal(5),
         (masks.LocalWindow(3, 0) | masks.Prefix(2)) & masks.Causal(),
         masks.Causal(offset=4) | masks.LocalWindow(0, 2)]


# The two slowest property tests of the suite (~1 min each at the profile's
# 25 examples on CI's 2 cores) draw 12; ATTNJAX_HYPOTHESIS=long draws 200.
_HEAVY = settings(max_examples=200 if os.environ.get("ATTNJAX_HYPOTHESIS")
                  == "long" else 12)


@_HEAVY
@given(heads=st.sampled_from(GQA), t=st.integers(1, 40), s=st.integers(1, 40),
       h=st.sampled_from([8, 16, 24]), mask=st.sampled_from(MASKS),
       bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([4, 16]),
       seed=st.integers(0, 2**16))
def test_chunked_equals_reference_property(heads, t, s, h, mask, bq, bk, seed):
  from attnjax.softmax import xla, xla_chunked
  from attnjax.softmax.problem import make_problem
  n, kh = heads
  inp = testing.attention_inputs(jax.random.key(seed), batch=1, q_len=t,
                                 kv_len=s, num_heads=n, num_kv_heads=kh,
                                 head_dim=h)
  p, _ = make_problem(inp.q, inp.k, inp.v, mask=mask)
  out, lse = xla_chunked.xla_chunked_attention(p, block_q=bq, block_kv=bk)
  ref, ref_lse = xla.xla_attention(p)
  testing.assert_close(out, ref, F32)
  testing.assert_close(lse, ref_lse, F32)


@_HEAVY
@given(t=st.integers(2, 24), cut=st.integers(1, 23), seed=st.integers(0, 999))
def test_causal_prefix_invariance_property(t, cut, seed):
  """Changing keys after position `cut` leaves causal outputs <= cut alone."""
  assume(cut < t)
  inp = testing.attention_inputs(jax.random.key(seed), batch=1, q_len=t)
  k2 = inp.k.at[:, cut + 1:].set(inp.k[:, cut + 1:] * -3.0 + 1.0)
  a = attnjax.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                    implementation="xla_chunked")
  b = attnjax.dot_product_attention(inp.q, k2, inp.v, is_causal=True,
                                    implementation="xla_chunked")
  np.testing.assert_array_equal(np.asarray(a[:, :cut + 1]),
                                np.asarray(b[:, :cut + 1]))


@given(c=st.floats(-50, 50), seed=st.integers(0, 999))
def test_constant_bias_changes_nothing_property(c, seed):
  inp = testing.attention_inputs(jax.random.key(seed), batch=1, q_len=10)
  a = attnjax.dot_product_attention(inp.q, inp.k, inp.v)
  b = attnjax.dot_product_attention(inp.q, inp.k, inp.v,
                                    bias=jnp.full((1, 1, 1, 1), c))
  # The bias is added before the row max is taken, so logits of size |c|
  # lose their low bits: allow |c|'s float32 spacing on top.
  atol, _ = testing.tolerance(F32)
  err = float(jnp.max(jnp.abs(b - a)))
  assert err <= atol + 8 * float(np.spacing(np.float32(abs(c) + 1))), err
