"""xla_chunked linear attention against the scan recurrence (the definition).

Covers every variant of ``linear_attention``: plain, normalised, fixed decay,
scalar and per-channel gates, feature maps, GQA, Hv != H, initial and final
state, segment resets, bf16; chunk sizes that do and do not divide T; the
split-and-carry and token-by-token decoding properties; long-T stability.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax
from attnjax import testing
from attnjax.linear import api
from linear_suite import (BF16, F32, assert_matches, call, check_against_scan,
                          key_for, linear_case, run_in_two_parts)

_VARIANTS = {
    "plain": {},
    "normalize": dict(normalize=True, feature_map="elu_plus_one"),
    "fixed_decay": dict(log_decay=True),
    "scalar_gate": dict(gate="scalar"),
    "channel_gate": dict(gate="channel"),
    "gate_and_decay": dict(gate="scalar", log_decay=True),
    "relu": dict(feature_map="relu", gate="scalar"),
    "taylor2": dict(feature_map="taylor2", normalize=True, head_dim=3),
    "channel_gate_elu": dict(feature_map="elu_plus_one", gate="channel"),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
@settings(max_examples=3, deadline=None)
@given(length=st.integers(1, 40),
       chunk=st.integers(1, 48),
       segments=st.booleans(),
       initial_state=st.booleans())
def test_chunked_equals_scan_every_chunk_size(variant, length, chunk,
                                              segments, initial_state):
  kw = dict(_VARIANTS[variant])
  case = linear_case(key_for(variant, length, chunk), length=length,
                     segments=segments, initial_state=initial_state, **kw)
  check_against_scan(case, "xla_chunked", grads=False, chunk_size=chunk)


@pytest.mark.parametrize("variant", ["normalize", "gate_and_decay",
                                     "channel_gate", "relu",
                                     "channel_gate_elu", "fixed_decay"])
def test_chunked_gradients_match_scan(variant):
  """d(q, k, v, gate, log_decay, initial_state), with resets, chunk 8."""
  case = linear_case(key_for("grad", variant), length=29, segments=True,
                     initial_state=True, **_VARIANTS[variant])
  check_against_scan(case, "xla_chunked", chunk_size=8)


def test_per_channel_sub_chunks_and_strong_gates():
  """Chunk 32 with 16-token sub-chunks, gates strong enough that a
  chunk-start reference point would overflow float32 (exp(>88))."""
  case = linear_case(key_for("strong"), length=64, gate="channel",
                     gate_strength=12.0, initial_state=True)
  check_against_scan(case, "xla_chunked", chunk_size=32)


def test_chunked_bf16():
  """bf16 inputs, float32 state: forward and gradients (per-channel gates,
  the path with the most rounding steps)."""
  case = linear_case(key_for("bf16"), length=33, dtype=BF16, segments=True,
                     **_VARIANTS["channel_gate"])
  check_against_scan(case, "xla_chunked", chunk_size=16)


@pytest.mark.parametrize("implementation,variant", [
    ("xla_chunked", "normalize"), ("xla_chunked", "channel_gate"),
    ("xla", "gate_and_decay")])
def test_split_sequence_and_carry_state(implementation, variant):
  """Two calls carrying the state == one call over the whole sequence."""
  arrays, opts = linear_case(key_for("split", variant), length=30,
                             initial_state=True, **_VARIANTS[variant])
  full_out, full_state = call((arrays, opts), implementation, chunk_size=8)
  out, state = run_in_two_parts((arrays, opts), implementation, 13,
                                chunk_size=8)
  assert_matches(out, full_out, F32)
  assert_matches(state, full_state, F32)


@pytest.mark.parametrize("variant", ["normalize", "channel_gate",
                                     "gate_and_decay", "taylor2"])
def test_step_token_by_token_equals_full(variant):
  arrays, opts = linear_case(key_for("step", variant), length=9,
                             initial_state=True, **_VARIANTS[variant])
  full_out, full_state = call((arrays, opts), "xla")
  state = arrays["initial_state"]
  outs = []
  for t in range(arrays["query"].shape[1]):
    gate = arrays.get("gate")
    out, state = attnjax.linear_attention_step(
        arrays["query"][:, t], arrays["key"][:, t], arrays["value"][:, t],
        state, log_decay=arrays.get("log_decay"),
        gate=None if gate is None else gate[:, t], **opts)
    outs.append(out)
  assert_matches(jnp.stack(outs, 1), full_out, F32)
  assert_matches(state, full_state, F32)


def test_segments_equal_separate_sequences():
  """Packed sequences == each sequence run on its own (resets)."""
  arrays, opts = linear_case(key_for("packed"), batch=1, length=24,
                             gate="scalar", log_decay=True)
  seg = jnp.array([[0] * 10 + [1] * 5 + [0] * 9])  # ids may repeat
  packed = call(({**arrays, "segment_ids": seg}, opts), "xla_chunked",
                return_final_state=False, chunk_size=8)
  for lo, hi in ((0, 10), (10, 15), (15, 24)):
    a = {k: (v[:, lo:hi] if k in ("query", "key", "value", "gate") else v)
         for k, v in arrays.items()}
    alone = call((a, opts), "xla", return_final_state=False)
    assert_matches(packed[:, lo:hi], alone, F32)


def test_gqa_equals_repeated_heads():
  arrays, opts = linear_case(key_for("gqa"), heads=6, kv_heads=2,
                             gate="channel", length=20)
  out = call((arrays, opts), "xla_chunked", return_final_state=False,
             chunk_size=8)
  rep = dict(arrays)
  rep["key"] = jnp.repeat(arrays["key"], 3, axis=2)
  rep["value"] = jnp.repeat(arrays["value"], 3, axis=2)
  ref = call((rep, opts), "xla_chunked", return_final_state=False,
             chunk_size=8)
  assert_matches(out, ref, F32)


def test_taylor2_feature_map_is_exp_taylor_expansion():
  x = jax.random.normal(key_for("taylor"), (2, 5, 3, 6))
  y = jax.random.normal(key_for("taylor", 1), (2, 5, 3, 6))
  phi = api.FEATURE_MAPS["taylor2"]
  s = jnp.sum(x * y, -1) / np.sqrt(6)
  assert phi(x).shape[-1] == 1 + 6 + 36
  testing.assert_close(jnp.sum(phi(x) * phi(y), -1), 1 + s + s * s / 2, F32,
                       scale=float(jnp.max(1 + s + s * s / 2)))


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_long_sequence_strong_and_weak_decay(gate):
  """T = 65536: global cumulative log gates reach -1e5 for the strong head
  (exp of them under/overflows) and lose their low bits for the weak one;
  chunk-relative sums must do neither. Compared with the full scan."""
  b, t, n, h = 1, 65536, 2, 8
  ks = jax.random.split(key_for("long", gate), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, n, h)) / np.sqrt(h)
  v = jax.random.normal(ks[2], (b, t, n, h))
  shape = (b, t, n) if gate == "scalar" else (b, t, n, h)
  strength = jnp.array([2.0, 1e-4])  # head 0 strong, head 1 weak
  strength = strength[:, None] if gate == "channel" else strength
  g = -strength * (0.5 + jax.random.uniform(ks[3], shape))
  run = lambda impl: jax.jit(lambda *a: attnjax.linear_attention(  # noqa
      *a[:3], gate=a[3], implementation=impl, return_final_state=True))(
          q, k, v, g)
  out, state = run("xla_chunked")
  ref, ref_state = run("xla")
  testing.assert_finite(out, "out")
  assert_matches(out, ref, F32, name="out", axis=2)
  assert_matches(state, ref_state, F32, name="final_state", axis=1)


def test_scan_reference_weak_fixed_decay_against_float64():
  """The scan reference itself at T = 65536 with a fixed decay
  exp(-1e-4), against the same recurrence in float64 (numpy). exp(g)
  rounded to float32 near 1 misstates the decay rate by up to 3e-8 / 1e-4
  (the same error every step; biased further by a GPU's exp), which
  compounded into 1.4e-4 relative error before the reference applied the
  decay through expm1."""
  b, t, n, h = 1, 65536, 1, 8
  ks = jax.random.split(key_for("weak-decay-reference"), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, n, h)) / np.sqrt(h)
  v = jax.random.normal(ks[2], (b, t, n, h))
  out, state = jax.jit(lambda q, k, v: attnjax.linear_attention(
      q, k, v, log_decay=jnp.array([-1e-4]), implementation="xla",
      return_final_state=True))(q, k, v)
  q64, k64, v64 = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  a = np.exp(np.float64(np.float32(-1e-4)))
  s = np.zeros((h, h))
  ref = np.empty((t, h))
  for i in range(t):
    s = a * s + np.outer(k64[i], v64[i])
    ref[i] = q64[i] @ s
  assert_matches(out[0, :, 0], ref / np.sqrt(h), F32)
  assert_matches(state[0, 0], s, F32, name="final_state")


def test_jit_and_vmap():
  arrays, opts = linear_case(key_for("vmap"), gate="scalar", length=12)
  f = jax.jit(lambda q, k, v, g: attnjax.linear_attention(
      q, k, v, gate=g, implementation="xla_chunked", chunk_size=4))
  direct = f(arrays["query"], arrays["key"], arrays["value"], arrays["gate"])
  stacked = [jnp.stack([arrays[n], arrays[n][::-1]]) for n in
             ("query", "key", "value", "gate")]
  mapped = jax.vmap(f)(*stacked)
  assert_matches(mapped[0], direct, F32)
  assert_matches(mapped[1], f(*[x[1] for x in stacked]), F32)
