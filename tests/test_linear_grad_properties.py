"""Gradient properties of the chunked linear-attention implementations.

Hypothesis draws lengths (one chunk, several, ragged tails), chunk sizes,
GQA ratios, gate kinds, resets and initial states; every case compares the
forward output, the final state and the VJP in every differentiable input
(q, k, v, gate, log_decay, beta, initial_state) with autodiff of the scan
(``check_against_scan``). Pallas runs in interpret mode on CPU. The last
tests run the Pallas kernels at the production default chunk (64, no
``chunk_size``) on a length that is not a multiple of it.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from linear_suite import check_against_scan, key_for, linear_case
from pallas_kernels.linear_scan import delta as delta_kernels
from pallas_kernels.linear_scan import kernels

# Gate kinds of linear_attention, as linear_case options.
_GATES = {
    "none": {},
    "fixed": dict(log_decay=True),
    "scalar": dict(gate="scalar"),
    "channel": dict(gate="channel"),
    "scalar_fixed": dict(gate="scalar", log_decay=True),
}


@settings(max_examples=4, deadline=None)
# Every gate kind and GQA ratio at least once, on ragged multi-chunk
# lengths (and one exact multiple); hypothesis draws the rest.
@example(length=45, chunk=16, kv_heads=1, gate="channel", segments=True,
         initial_state=True, batch=2, head_dim=16)
@example(length=16, chunk=8, kv_heads=2, gate="scalar_fixed", segments=False,
         initial_state=True, batch=1, head_dim=8)
@example(length=29, chunk=8, kv_heads=2, gate="scalar", segments=True,
         initial_state=False, batch=2, head_dim=12)
@example(length=23, chunk=4, kv_heads=4, gate="fixed", segments=True,
         initial_state=True, batch=1, head_dim=8)
@example(length=33, chunk=16, kv_heads=1, gate="none", segments=False,
         initial_state=True, batch=2, head_dim=8)
@given(length=st.integers(1, 60), chunk=st.sampled_from([4, 8, 16]),
       kv_heads=st.sampled_from([4, 2, 1]), gate=st.sampled_from(
           sorted(_GATES)), segments=st.booleans(),
       initial_state=st.booleans(), batch=st.integers(1, 2),
       head_dim=st.sampled_from([8, 12, 16]))
def test_xla_chunked_gradients_property(length, chunk, kv_heads, gate,
                                        segments, initial_state, batch,
                                        head_dim):
  case = linear_case(
      key_for("grad-prop-xla", length, chunk, kv_heads, gate, segments,
              initial_state, batch, head_dim),
      batch=batch, length=length, heads=4, kv_heads=kv_heads,
      head_dim=head_dim, segments=segments, initial_state=initial_state,
      **_GATES[gate])
  check_against_scan(case, "xla_chunked", grads=True, chunk_size=chunk)


@settings(max_examples=3, deadline=None)
@example(length=37, chunk=16, kv_heads=1, gate="scalar_fixed", segments=True,
         initial_state=True)
@given(length=st.integers(1, 70), chunk=st.sampled_from([16, 32]),
       kv_heads=st.sampled_from([4, 2, 1]),
       gate=st.sampled_from(["none", "fixed", "scalar", "scalar_fixed"]),
       segments=st.booleans(), initial_state=st.booleans())
def test_pallas_gradients_property(length, chunk, kv_heads, gate, segments,
                                   initial_state):
  """The scalar-gate / fixed-decay / ungated kernels (interpret mode)."""
  case = linear_case(
      key_for("grad-prop-pallas", length, chunk, kv_heads, gate, segments,
              initial_state),
      batch=1, length=length, heads=4, kv_heads=kv_heads, head_dim=8,
      segments=segments, initial_state=initial_state, **_GATES[gate])
  check_against_scan(case, "pallas", grads=True, chunk_size=chunk)


@settings(max_examples=3, deadline=None)
@example(length=40, chunk=16, kv_heads=2, gated=True, segments=True,
         initial_state=True)
@given(length=st.integers(1, 70), chunk=st.sampled_from([16, 32]),
       kv_heads=st.sampled_from([4, 2, 1]), gated=st.booleans(),
       segments=st.booleans(), initial_state=st.booleans())
def test_delta_pallas_gradients_property(length, chunk, kv_heads, gated,
                                         segments, initial_state):
  """The (gated) delta rule's kernels: d beta among the gradients."""
  case = linear_case(
      key_for("grad-prop-delta", length, chunk, kv_heads, gated, segments,
              initial_state),
      batch=1, length=length, heads=4, kv_heads=kv_heads, head_dim=8,
      delta=True, gate="scalar" if gated else None, segments=segments,
      initial_state=initial_state)
  g, _ = check_against_scan(case, "pallas", grads=True, chunk_size=chunk)
  assert "beta" in g


@settings(max_examples=3, deadline=None)
# The strongest gates: log decays down to ~-60 a step.
@example(length=50, chunk=16, kv_heads=2, strength=30.0, segments=False,
         initial_state=True)
@given(length=st.integers(17, 70), chunk=st.sampled_from([16, 32]),
       kv_heads=st.sampled_from([4, 2, 1]), strength=st.floats(0.01, 30.0),
       segments=st.booleans(), initial_state=st.booleans())
def test_pallas_scalar_gate_strength_property(length, chunk, kv_heads,
                                              strength, segments,
                                              initial_state):
  """The scalar-gate kernel from near-unit decays to decays of e^-60 a
  step (exp(G_i - G_j) spans many orders inside a chunk): forward, final
  state and every gradient, the gate's included."""
  case = linear_case(
      key_for("grad-prop-strength", length, chunk, kv_heads, strength),
      batch=1, length=length, heads=4, kv_heads=kv_heads, head_dim=8,
      gate="scalar", gate_strength=strength, segments=segments,
      initial_state=initial_state)
  check_against_scan(case, "pallas", grads=True, chunk_size=chunk)


def _spy_chunk(monkeypatch, module, name, chunk_of):
  """Records the chunk each call of module.name runs with."""
  seen = []
  original = getattr(module, name)

  def spy(*args, **kwargs):
    seen.append(chunk_of(kwargs))
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, spy)
  return seen


def test_pallas_scalar_gate_default_chunk(monkeypatch):
  """No chunk_size: the production chunk (64) on T = 150 (two chunks and
  a ragged 22), with a gate, a fixed decay, GQA, resets and an initial
  state; forward and every gradient."""
  seen = _spy_chunk(
      monkeypatch, kernels, "chunked_linear_attention",
      lambda kw: (kw.get("config") or kernels.default_config()).chunk)
  case = linear_case(key_for("grad-default-chunk-scalar"), batch=1,
                     length=150, heads=4, kv_heads=2, head_dim=16,
                     value_dim=12, gate="scalar", log_decay=True,
                     segments=True, initial_state=True)
  check_against_scan(case, "pallas", grads=True)
  assert seen and set(seen) == {64}, seen


def test_delta_pallas_default_chunk(monkeypatch):
  """No chunk_size: the gated delta rule's production chunk (64) on
  T = 150 (two chunks and a ragged 22), with GQA, resets and an initial
  state; forward and every gradient (beta's and the gate's included)."""
  seen = _spy_chunk(
      monkeypatch, delta_kernels, "delta_rule",
      lambda kw: kw.get("chunk") or (kw.get("config")
                                     or delta_kernels.DeltaConfig()).chunk)
  case = linear_case(key_for("grad-default-chunk-delta"), batch=1,
                     length=150, heads=4, kv_heads=2, head_dim=16,
                     value_dim=12, delta=True,
                     gate="scalar", segments=True, initial_state=True)
  check_against_scan(case, "pallas", grads=True)
  assert seen and set(seen) == {64}, seen
