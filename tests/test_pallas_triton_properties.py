"""Property tests: the Pallas Triton kernel equals the reference everywhere.

Random shapes (odd lengths, T != S, GQA/MQA pairs including groups that are
not powers of two), random composed masks, random dynamic masking and random
tile sizes, in interpret mode; forward, lse and the VJP are compared with
autodiff of the materialised reference. Interpret mode is slow, so the
default run draws a few examples; ``pytest -m long`` draws more.
"""

import hypothesis as hp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, testing
from attnjax.softmax import pallas as pallas_backend
from softmax_suite import _key, check_against_reference

HEAD_PAIRS = [(1, 1), (2, 1), (3, 3), (4, 2), (6, 2), (8, 1), (6, 3)]


@st.composite
def static_masks(draw, t, s):
  kind = draw(st.sampled_from(["none", "causal", "offset", "window",
                               "chunked", "streaming"]))
  if kind == "none":
    return None
  if kind == "causal":
    return masks.Causal()
  if kind == "offset":
    return masks.Causal(offset=draw(st.integers(-t // 2, s)))
  if kind == "window":
    left = draw(st.one_of(st.none(), st.integers(0, s)))
    right = draw(st.one_of(st.none(), st.integers(0, s)))
    return masks.LocalWindow(left, right)
  if kind == "chunked":
    return masks.ChunkedCausal(draw(st.integers(1, max(t, 1))))
  return ((masks.LocalWindow(draw(st.integers(0, 12)), 0)
           | masks.Prefix(draw(st.integers(0, 4)))) & masks.Causal())


@st.composite
def cases(draw):
  t = draw(st.integers(1, 50))
  s = draw(st.integers(1, 50))
  n, kh = draw(st.sampled_from(HEAD_PAIRS))
  h = draw(st.sampled_from([16, 32, 40]))
  hv = draw(st.sampled_from([h, 16]))
  batch = draw(st.integers(1, 2))
  mask = draw(static_masks(t, s))
  dynamic = draw(st.sampled_from(["none", "segments", "lengths", "sinks"]))
  bq = draw(st.sampled_from([16, 32]))
  bk = draw(st.sampled_from([16, 32]))
  seed = draw(st.integers(0, 2**16))
  return dict(t=t, s=s, n=n, kh=kh, h=h, hv=hv, batch=batch, mask=mask,
              dynamic=dynamic, bq=bq, bk=bk, seed=seed)


def _check(case):
  bs = pallas_backend.BlockSizes(
      block_q=case["bq"], block_kv=case["bk"], block_q_dq=case["bq"],
      block_kv_dq=case["bk"], block_q_dkv=case["bk"],
      block_kv_dkv=case["bq"])

  def impl(problem):
    return pallas_backend.triton_attention(problem, block_sizes=bs,
                                           interpret=True)

  b, t, s = case["batch"], case["t"], case["s"]
  inp = testing.attention_inputs(
      _key("prop", case["seed"]), batch=b, q_len=t, kv_len=s,
      num_heads=case["n"], num_kv_heads=case["kh"], head_dim=case["h"],
      value_head_dim=case["hv"])
  kw, arrays, sinks = {}, {}, None
  if case["mask"] is not None:
    kw["mask"] = case["mask"]
  k1, k2 = jax.random.split(_key("dyn", case["seed"]))
  if case["dynamic"] == "segments":
    arrays["segment_ids"] = (testing.random_segment_ids(k1, b, t, 3),
                             testing.random_segment_ids(k2, b, s, 3))
  elif case["dynamic"] == "lengths":
    arrays["q_lengths"] = jax.random.randint(k1, (b,), 0, t + 1)
    arrays["kv_lengths"] = jax.random.randint(k2, (b,), 0, s + 1)
  elif case["dynamic"] == "sinks":
    sinks = jax.random.normal(k1, (case["n"],))
  check_against_reference(impl, inp, dtype=jnp.float32, sinks=sinks,
                          arrays=arrays, **kw)


@hp.settings(max_examples=5)
@hp.given(cases())
def test_matches_reference(case):
  _check(case)


@pytest.mark.long
@hp.settings(max_examples=40)
@hp.given(cases())
def test_matches_reference_many(case):
  _check(case)
