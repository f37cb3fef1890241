"""Coverage the linear-attention suites lacked (audit gaps A-F).

A. Feature maps through every implementation: gradients of taylor2 (BASED,
   normalised and not), plain (no map) and relu against the scan on
   xla_chunked and pallas (interpret mode on CPU); a callable map; the
   ValueError when query and key map to different feature dims.
B. Rows with nothing to attend to: relu features of all-negative keys give a
   zero key sum z, and the documented normaliser ``phi(q) z + 1e-6`` makes
   the output exactly zero, with finite gradients.
C. Large inputs (q, k scaled by 30) in float32 and bfloat16.
D. Split-and-carry as a property over the split point, with and without
   segment_ids (``initial_state`` belongs to the first segment).
E. An independent float64 NumPy loop of the gated delta rule.
F. linear_attention_step / delta_rule_step token by token == the full call,
   bf16 and the relu and plain variants.

Comparisons use the shared dtype tolerances (``linear_suite``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnjax
from attnjax.linear import api
from linear_suite import (BF16, F32, assert_matches, call, check_against_scan,
                          key_for, linear_case)

# ----------------------------------------------------------------------------
# A. Feature maps.

_FEATURE_VARIANTS = {
    # BASED as published: taylor2 + normalisation (F = 1 + 3 + 9 = 13).
    "taylor2_normalize": dict(feature_map="taylor2", normalize=True,
                              head_dim=3, segments=True, initial_state=True),
    # taylor2 without the normaliser, with a scalar gate.
    "taylor2": dict(feature_map="taylor2", head_dim=3, gate="scalar",
                    initial_state=True),
    # No feature map, no decay: the plain recurrence.
    "plain": dict(segments=True, initial_state=True),
    "relu": dict(feature_map="relu", gate="scalar", segments=True,
                 initial_state=True),
}


@pytest.mark.parametrize("implementation,variant", [
    (i, v) for v in sorted(_FEATURE_VARIANTS)
    for i in ("xla_chunked", "pallas")
    if (i, v) != ("xla_chunked", "relu")])  # that one: test_linear_chunked
def test_feature_map_gradients_match_scan(variant, implementation):
  """Forward, final state and d(q, k, v, gate, initial_state) vs the scan."""
  case = linear_case(key_for("cov-fmap", variant), length=29,
                     **_FEATURE_VARIANTS[variant])
  check_against_scan(case, implementation, chunk_size=16)


def _softplus_pair(x):
  """A positive callable map with F = 2 H."""
  return jnp.concatenate([jax.nn.softplus(x), jax.nn.softplus(-x)], -1)


@pytest.mark.parametrize("implementation", ["xla_chunked", "pallas"])
def test_callable_feature_map_matches_scan(implementation):
  arrays, opts = linear_case(key_for("cov-callable"), length=29,
                             normalize=True, gate="scalar", segments=True)
  check_against_scan((arrays, {**opts, "feature_map": _softplus_pair}),
                     implementation, chunk_size=16)


def test_callable_feature_map_is_applied_to_query_and_key():
  """A callable equals the identity map on pre-mapped inputs, with the
  default scale still 1 / sqrt(H) of the unmapped head dim (documented)."""
  arrays, _ = linear_case(key_for("cov-callable-applied"), length=13)
  q, k, v = arrays["query"], arrays["key"], arrays["value"]
  h = q.shape[-1]
  out = attnjax.linear_attention(q, k, v, feature_map=_softplus_pair,
                                 implementation="xla_chunked", chunk_size=8)
  ref = attnjax.linear_attention(_softplus_pair(q), _softplus_pair(k), v,
                                 scale=1 / math.sqrt(h), implementation="xla")
  assert_matches(out, ref, F32)


def _per_heads_map(x):
  """Doubles the feature dim for arrays with 2 heads (the key), not 4."""
  return x if x.shape[-2] == 4 else jnp.concatenate([x, x], -1)


def _drops_a_head(x):
  return x[..., 1:, :]


@pytest.mark.parametrize("fn", [_per_heads_map, _drops_a_head])
def test_feature_map_mismatched_dims_raise(fn):
  arrays, _ = linear_case(key_for("cov-mismatch"), length=5)  # N 4, K 2
  q, k, v = arrays["query"], arrays["key"], arrays["value"]
  with pytest.raises(ValueError, match="feature_map"):
    attnjax.linear_attention(q, k, v, feature_map=fn)
  state = jnp.zeros(q.shape[:1] + q.shape[2:] + (v.shape[-1],))
  with pytest.raises(ValueError, match="feature_map"):
    attnjax.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state,
                                  feature_map=fn)


# ----------------------------------------------------------------------------
# B. Rows with nothing to attend to.


def _nothing_to_attend_case():
  """relu + normalize where phi(k) = 0: keys negative for t < 11 and, after
  the reset at t = 20, for t in [20, 24); kv head 1 (query heads 2, 3)
  negative everywhere. Returns (case, bool mask [B, T, N] of those rows)."""
  b, t, n, kh, h, hv = 2, 29, 4, 2, 8, 6
  ks = jax.random.split(key_for("cov-empty-rows"), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jnp.abs(jax.random.normal(ks[1], (b, t, kh, h)))
  v = jax.random.normal(ks[2], (b, t, kh, hv))
  tt = jnp.arange(t)
  neg_t = (tt < 11) | ((tt >= 20) & (tt < 24))
  neg = neg_t[None, :, None] | (jnp.arange(kh) == 1)[None, None, :]
  k = jnp.where(neg[..., None], -k - 0.1, k)
  seg = jnp.broadcast_to((tt >= 20).astype(jnp.int32), (b, t))
  empty = jnp.broadcast_to(jnp.repeat(neg, n // kh, axis=2), (b, t, n))
  arrays = {"query": q, "key": k, "value": v, "segment_ids": seg}
  return (arrays, {"feature_map": "relu", "normalize": True}), empty


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked", "pallas"])
def test_normalize_zero_key_sum_gives_zero_rows(implementation):
  """Documented: o_t = phi(q) S_t / (phi(q) z_t + 1e-6); with phi(k) = 0 for
  every key so far, S_t = z_t = 0 and o_t is exactly 0 (not NaN)."""
  case, empty = _nothing_to_attend_case()
  assert 0 < int(empty.sum()) < empty.size
  out, state = call(case, implementation, chunk_size=16)
  out = np.asarray(out)
  np.testing.assert_array_equal(out[np.asarray(empty)], 0.0)
  assert np.abs(out[~np.asarray(empty)]).max() > 0
  # kv head 1 never saw a positive key after the reset: its state is zero.
  np.testing.assert_array_equal(np.asarray(state)[:, 2:], 0.0)
  # Gradients finite (checked inside) and equal to the scan's autodiff.
  check_against_scan(case, implementation, chunk_size=16)


# ----------------------------------------------------------------------------
# C. Large inputs.

_LARGE = {
    "plain": dict(length=29, gate="scalar"),
    "taylor2_normalize": dict(length=29, feature_map="taylor2",
                              normalize=True, head_dim=3),
}


# taylor2 with normalize in float32 at this scale is compared with float64
# below, not with the scan: the scan's own float32 error there (5.7e-5 of
# the output's scale, its feature sums cancelling) is above float32's
# tolerance, while the chunked forms stay within 2e-6.
_LARGE_PARAMS = [(v, d, i) for v in sorted(_LARGE)
                 for d, did in ((F32, "f32"), (BF16, "bf16"))
                 for i in ("xla_chunked", "pallas")
                 if not (v == "taylor2_normalize" and did == "f32")]


@pytest.mark.parametrize("variant,dtype,implementation", _LARGE_PARAMS,
                         ids=[f"{v}-{jnp.dtype(d).name}-{i}"
                              for v, d, i in _LARGE_PARAMS])
def test_large_inputs_match_scan(variant, dtype, implementation):
  """q and k scaled by 30 (float32 draws, then rounded to ``dtype``)."""
  arrays, opts = linear_case(key_for("cov-large", variant), **_LARGE[variant])
  arrays = dict(arrays, query=arrays["query"] * 30, key=arrays["key"] * 30)
  arrays = {n: (a.astype(dtype) if n in ("query", "key", "value") else a)
            for n, a in arrays.items()}
  check_against_scan((arrays, opts), implementation, chunk_size=16)


def _taylor2_normalized_float64(q, k, v):
  """docs/linear/based.md in float64, as the quadratic form:
  o_t = sum_{j<=t} (phi(q_t).phi(k_j)) v_j / (sum_{j<=t} phi(q_t).phi(k_j)
  + 1e-6), phi(q_t).phi(k_j) = 1 + s + s^2 / 2, s = q_t.k_j / sqrt(d)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
  w = np.tril(1 + s + s * s / 2)
  num = np.einsum("bnts,bsnv->btnv", w, v)
  return num / (w.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)


@pytest.mark.parametrize("implementation", ["xla_chunked", "pallas"])
def test_large_taylor2_normalize_matches_float64(implementation):
  """The large taylor2 case against float64: phi(q).phi(k) = 1 + s + s^2/2
  is O(1) where its F products are O(1e5), so float32 sums of them cancel.
  The scan ("xla", the oracle elsewhere) accumulates those sums token by
  token in float32 and is off by 5.7e-5 here (measured 2026-12-05), above
  float32's tolerance: at this scale float64 is the reference."""
  arrays, opts = linear_case(key_for("cov-large", "taylor2_normalize"),
                             **_LARGE["taylor2_normalize"])
  q, k = arrays["query"] * 30, arrays["key"] * 30
  out = attnjax.linear_attention(q, k, arrays["value"],
                                 implementation=implementation, chunk_size=16,
                                 **opts)
  assert_matches(out, _taylor2_normalized_float64(q, k, arrays["value"]), F32)


# ----------------------------------------------------------------------------
# D. Split and carry, with the documented segment rule.

_SPLIT_T = 24
# Row 0 starts segments at 7 and 16, row 1 at 12 and 16 (ids may be any
# ints): a split at 16 starts a segment in every row, at 7 or 12 in one.
_SPLIT_SEGMENTS = jnp.array([[0] * 7 + [1] * 9 + [2] * 8,
                             [5] * 12 + [6] * 4 + [7] * 8], jnp.int32)

_SPLIT_VARIANTS = {
    "normalize": dict(normalize=True, feature_map="elu_plus_one",
                      log_decay=True),
    "channel_gate": dict(gate="channel"),
    "gate_and_decay": dict(gate="scalar", log_decay=True),
    "delta": dict(delta=True, gate="scalar"),
}
_SEQ = ("query", "key", "value", "gate", "beta", "segment_ids")


def _split_case(variant, segmented):
  arrays, opts = linear_case(key_for("cov-split", variant), length=_SPLIT_T,
                             initial_state=True, **_SPLIT_VARIANTS[variant])
  if segmented:
    arrays = {**arrays, "segment_ids": _SPLIT_SEGMENTS}
  return arrays, opts


@functools.lru_cache(maxsize=None)
def _one_pass(implementation, variant, segmented):
  return call(_split_case(variant, segmented), implementation, chunk_size=16)


def _second_initial_state(arrays, at, carried):
  """The documented rule: ``initial_state`` belongs to the first segment of
  a call, so a second part that starts a new segment starts fresh (no
  initial state); otherwise it carries the first part's final state."""
  seg = arrays.get("segment_ids")
  if seg is None or at in (0, seg.shape[1]):
    return carried
  starts = np.asarray(seg[:, at] != seg[:, at - 1])
  if starts.all():
    return None
  return jnp.where(starts[:, None, None, None], 0.0, carried)


def _two_parts(case, implementation, at, second_initial):
  arrays, opts = case

  def part(sl, state):
    a = {k: (v[:, sl] if k in _SEQ else v) for k, v in arrays.items()}
    a.pop("initial_state")
    if state is not None:
      a["initial_state"] = state
    return call((a, opts), implementation, chunk_size=16)

  out1, s1 = part(slice(0, at), arrays["initial_state"])
  out2, s2 = part(slice(at, None), second_initial(s1))
  return jnp.concatenate([out1, out2], 1), s2


_SPLIT_PARAMS = [("xla_chunked", "normalize", True),  # z carried too
                 ("xla_chunked", "channel_gate", False),
                 ("xla", "delta", True),
                 ("pallas", "gate_and_decay", True)]


@pytest.mark.parametrize("implementation,variant,segmented", _SPLIT_PARAMS)
@settings(max_examples=2, deadline=None)
@given(at=st.integers(0, _SPLIT_T))
@example(at=16)  # a segment starts in every row: the second part is fresh
@example(at=7)   # a segment starts in row 0 only: row 1 carries
@example(at=10)  # inside a segment in both rows: carry
def test_split_and_carry_equals_one_pass(implementation, variant, segmented,
                                         at):
  case = _split_case(variant, segmented)
  full_out, full_state = _one_pass(implementation, variant, segmented)
  out, state = _two_parts(
      case, implementation, at,
      lambda s1: _second_initial_state(case[0], at, s1))
  assert_matches(out, full_out, F32)
  assert_matches(state, full_state, F32, name="final_state")


@pytest.mark.parametrize("at,starts_segment", [(16, True), (10, False)])
def test_split_rule_is_the_documented_one(at, starts_segment):
  """The other choice is wrong in each case: carrying the state into a part
  that starts a segment, or dropping it inside a segment, changes the
  result (so the property above is not vacuous)."""
  case = _split_case("gate_and_decay", True)
  full_out, _ = _one_pass("xla_chunked", "gate_and_decay", True)
  assert (_second_initial_state(case[0], at, 0.0) is None) == starts_segment
  wrong = (lambda s1: s1) if starts_segment else (lambda s1: None)
  out, _ = _two_parts(case, "xla_chunked", at, wrong)
  err = float(jnp.max(jnp.abs(out[:, at:] - full_out[:, at:])))
  assert err > 1e-2, err


# ----------------------------------------------------------------------------
# E. The gated delta rule against a float64 loop.


def _delta_rule_float64(q, k, v, beta, log_gate, s0, seg, scale):
  """docs/linear/delta_rule.md, state [H, Hv] (key rows), per head:
  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
  o_t = scale q_t S_t; S zeroed before a token whose segment id changes."""
  q, k, v, beta, log_gate, s0 = (np.asarray(x, np.float64) for x in
                                 (q, k, v, beta, log_gate, s0))
  seg = np.asarray(seg)
  b, t, n, h = q.shape
  out = np.zeros((b, t, n, v.shape[-1]))
  state = s0.copy()
  for bi in range(b):
    for ni in range(n):
      s = s0[bi, ni].copy()
      for ti in range(t):
        if ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
          s = np.zeros_like(s)
        kt = k[bi, ti, ni][:, None]  # column: k_t^T
        proj = np.eye(h) - beta[bi, ti, ni] * (kt @ kt.T)
        s = (np.exp(log_gate[bi, ti, ni]) * proj @ s
             + beta[bi, ti, ni] * kt @ v[bi, ti, ni][None, :])
        out[bi, ti, ni] = scale * (q[bi, ti, ni] @ s)
      state[bi, ni] = s
  return out, state


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked", "pallas"])
def test_gated_delta_rule_matches_float64_loop(implementation):
  arrays, _ = linear_case(key_for("cov-delta64"), batch=2, length=37,
                          heads=3, kv_heads=3, head_dim=8, value_dim=6,
                          delta=True, gate="scalar", segments=True,
                          initial_state=True)
  h = arrays["query"].shape[-1]
  ref_out, ref_state = _delta_rule_float64(
      arrays["query"], arrays["key"], arrays["value"], arrays["beta"],
      arrays["gate"], arrays["initial_state"], arrays["segment_ids"],
      1 / math.sqrt(h))
  out, state = call((arrays, {}), implementation, chunk_size=16)
  assert_matches(out, ref_out, F32)
  assert_matches(state, ref_state, F32, name="final_state")


# ----------------------------------------------------------------------------
# F. Decoding token by token.

_STEP_VARIANTS = {
    "plain": dict(),
    "plain_decay": dict(log_decay=True),
    "relu": dict(feature_map="relu", gate="scalar"),
    "normalize_gate": dict(normalize=True, feature_map="elu_plus_one",
                           gate="scalar"),
    "channel_gate": dict(gate="channel"),
    "taylor2_normalize": dict(feature_map="taylor2", normalize=True,
                              head_dim=3),
}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", sorted(_STEP_VARIANTS))
def test_step_token_by_token_equals_full(variant, dtype):
  arrays, opts = linear_case(key_for("cov-step", variant, str(dtype)),
                             length=9, initial_state=True, dtype=dtype,
                             **_STEP_VARIANTS[variant])
  full_out, full_state = call((arrays, opts), "xla")
  step = jax.jit(functools.partial(attnjax.linear_attention_step, **opts))
  state, gate = arrays["initial_state"], arrays.get("gate")
  outs = []
  for t in range(arrays["query"].shape[1]):
    out, state = step(arrays["query"][:, t], arrays["key"][:, t],
                      arrays["value"][:, t], state,
                      log_decay=arrays.get("log_decay"),
                      gate=None if gate is None else gate[:, t])
    assert out.dtype == dtype and state.dtype == F32
    outs.append(out)
  assert_matches(jnp.stack(outs, 1), full_out, dtype)
  assert_matches(state, full_state, dtype, name="final_state")


def test_delta_step_bf16_token_by_token_equals_full():
  arrays, _ = linear_case(key_for("cov-delta-step"), length=9, delta=True,
                          gate="scalar", initial_state=True, dtype=BF16)
  full_out, full_state = call((arrays, {}), "xla")
  step = jax.jit(api.delta_rule_step)
  state = arrays["initial_state"]
  outs = []
  for t in range(arrays["query"].shape[1]):
    out, state = step(arrays["query"][:, t], arrays["key"][:, t],
                      arrays["value"][:, t], arrays["beta"][:, t], state,
                      gate=arrays["gate"][:, t])
    assert out.dtype == BF16
    outs.append(out)
  assert_matches(jnp.stack(outs, 1), full_out, BF16)
  assert_matches(state, full_state, BF16, name="final_state")
