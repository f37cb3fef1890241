"""The delta rule (DeltaNet, Gated DeltaNet): chunked WY/UT form vs the scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax
from attnjax.linear import api
from linear_suite import (BF16, F32, assert_matches, call, check_against_scan,
                          key_for, linear_case, run_in_two_parts)


@settings(max_examples=6)
@given(length=st.integers(1, 40), chunk=st.integers(1, 48),
       gated=st.booleans(), segments=st.booleans(),
       initial_state=st.booleans())
def test_delta_chunked_equals_scan_every_chunk_size(length, chunk, gated,
                                                    segments, initial_state):
  case = linear_case(key_for("delta", length, chunk), length=length,
                     delta=True, gate="scalar" if gated else None,
                     segments=segments, initial_state=initial_state)
  check_against_scan(case, "xla_chunked", grads=False, chunk_size=chunk)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_gradients_match_scan(gated):
  """d(q, k, v, beta, gate, initial_state) with resets and GQA."""
  case = linear_case(key_for("delta-grad", gated), length=27, delta=True,
                     gate="scalar" if gated else None, segments=True,
                     initial_state=True)
  check_against_scan(case, "xla_chunked", chunk_size=8)


def test_delta_bf16():
  case = linear_case(key_for("delta-bf16"), length=30, delta=True,
                     gate="scalar", dtype=BF16)
  check_against_scan(case, "xla_chunked", chunk_size=16)


def test_delta_step_token_by_token_equals_full():
  arrays, opts = linear_case(key_for("delta-step"), length=9, delta=True,
                             gate="scalar", initial_state=True)
  full_out, full_state = call((arrays, opts), "xla")
  state = arrays["initial_state"]
  step = jax.jit(api.delta_rule_step)
  outs = []
  for t in range(arrays["query"].shape[1]):
    out, state = step(arrays["query"][:, t], arrays["key"][:, t],
                      arrays["value"][:, t], arrays["beta"][:, t], state,
                      gate=arrays["gate"][:, t])
    outs.append(out)
  assert_matches(jnp.stack(outs, 1), full_out, F32)
  assert_matches(state, full_state, F32)


def test_delta_split_sequence_and_carry_state():
  arrays, opts = linear_case(key_for("delta-split"), length=26, delta=True,
                             gate="scalar", initial_state=True)
  full_out, full_state = call((arrays, opts), "xla_chunked", chunk_size=8)
  out, state = run_in_two_parts((arrays, opts), "xla_chunked", 11,
                                chunk_size=8)
  assert_matches(out, full_out, F32)
  assert_matches(state, full_state, F32)


def test_delta_rule_learns_a_key_value_association():
  """With beta = 1 and a unit key, one write makes q = k read back v."""
  k = jnp.zeros((1, 1, 1, 4)).at[..., 2].set(1.0)
  v = jnp.arange(3.0).reshape(1, 1, 1, 3) + 1
  out = jax.jit(lambda k, v: attnjax.delta_rule_attention(
      k, k, v, jnp.ones((1, 1, 1)), scale=1.0,
      implementation="xla_chunked"))(k, v)
  assert jnp.allclose(out, v)
