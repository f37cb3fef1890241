"""linear_attention / delta_rule_attention / *_step: validation and dispatch."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

import attnjax
from attnjax.linear import api
from linear_suite import assert_matches, key_for, linear_case

B, T, N, K, H, HV = 2, 6, 4, 2, 8, 5


def _qkv(dtype=jnp.float32):
  q = jnp.ones((B, T, N, H), dtype)
  k = jnp.ones((B, T, K, H), dtype)
  v = jnp.ones((B, T, K, HV), dtype)
  return q, k, v


_BAD_LINEAR = [
    ("query", dict(query=jnp.ones((T, N, H)))),
    ("key", dict(key=jnp.ones((B, T + 1, K, H)))),
    ("value", dict(value=jnp.ones((B, T, K + 1, HV)))),
    ("key", dict(key=jnp.ones((B, T, K, H + 1)))),
    ("heads", dict(key=jnp.ones((B, T, 3, H)), value=jnp.ones((B, T, 3, HV)))),
    ("dtype", dict(key=jnp.ones((B, T, K, H), jnp.bfloat16))),
    ("feature_map", dict(feature_map="softmax")),
    ("feature_map", dict(feature_map=3)),
    ("log_decay", dict(log_decay=jnp.array([-0.1, 0.2, -0.1, -0.1]))),
    ("log_decay", dict(log_decay=jnp.zeros((N + 1,)))),
    ("log_decay", dict(log_decay=jnp.array([-0.1, jnp.nan, -0.1, -0.1]))),
    ("gate", dict(gate=jnp.zeros((B, T, N, H + 1)))),
    ("gate", dict(gate=jnp.zeros((B, T, K)))),
    ("gate", dict(gate=jnp.zeros((B, T)))),
    # Log-space decays must be <= 0: one positive or NaN entry is refused.
    ("gate", dict(gate=jnp.zeros((B, T, N)).at[1, 3, 2].set(0.1))),
    ("gate", dict(gate=jnp.zeros((B, T, N, H)).at[0, 5, 1, 7].set(jnp.nan))),
    ("initial_state", dict(initial_state=jnp.zeros((B, N, H, HV + 1)))),
    ("initial_state", dict(initial_state=jnp.zeros((B, N, H, HV)),
                           normalize=True)),
    ("segment_ids", dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32))),
    ("segment_ids", dict(segment_ids=jnp.zeros((B, T)))),
    ("chunk_size", dict(chunk_size=0)),
    ("implementation", dict(implementation="cuda")),
]


@pytest.mark.parametrize("arg,kwargs", _BAD_LINEAR,
                         ids=[f"{a}-{i}" for i, (a, _) in
                              enumerate(_BAD_LINEAR)])
def test_linear_attention_bad_input_names_the_argument(arg, kwargs):
  q, k, v = _qkv()
  kwargs = dict(kwargs)
  q = kwargs.pop("query", q)
  k = kwargs.pop("key", k)
  v = kwargs.pop("value", v)
  with pytest.raises(ValueError, match=arg):
    attnjax.linear_attention(q, k, v, **kwargs)


def test_feature_map_changes_state_width():
  q, k, v = _qkv()
  shape = jax.eval_shape(lambda: attnjax.linear_attention(
      q, k, v, feature_map="taylor2", return_final_state=True))[1].shape
  assert shape == (B, N, 1 + H + H * H, HV)
  shape = jax.eval_shape(lambda: attnjax.linear_attention(
      q, k, v, normalize=True, feature_map="elu_plus_one",
      return_final_state=True))[1].shape
  assert shape == (B, N, H, HV + 1)
  # A per-channel gate follows the feature dim.
  with pytest.raises(ValueError, match="gate"):
    attnjax.linear_attention(q, k, v, feature_map="taylor2",
                             gate=jnp.zeros((B, T, N, H)))


_BAD_DELTA = [
    ("beta", dict(beta=jnp.ones((B, T, K)))),
    ("beta", dict(beta=jnp.ones((B, T, N), jnp.int32))),
    ("gate", dict(gate=jnp.zeros((B, T, N, H)))),
    ("gate", dict(gate=jnp.zeros((B, T, N)).at[0, 0, 0].set(2.0))),
    ("initial_state", dict(initial_state=jnp.zeros((B, N, H + 1, HV)))),
    ("segment_ids", dict(segment_ids=jnp.zeros((B, 1), jnp.int32))),
]


@pytest.mark.parametrize("arg,kwargs", _BAD_DELTA,
                         ids=[a for a, _ in _BAD_DELTA])
def test_delta_rule_bad_input_names_the_argument(arg, kwargs):
  q, k, v = _qkv()
  kwargs = dict(kwargs)
  beta = kwargs.pop("beta", jnp.ones((B, T, N)))
  with pytest.raises(ValueError, match=arg):
    attnjax.delta_rule_attention(q, k, v, beta, **kwargs)


def test_step_bad_input_names_the_argument():
  q, k, v = (x[:, 0] for x in _qkv())
  state = jnp.zeros((B, N, H, HV))
  with pytest.raises(ValueError, match="state"):
    attnjax.linear_attention_step(q, k, v, state[..., :-1])
  with pytest.raises(ValueError, match="gate"):
    attnjax.linear_attention_step(q, k, v, state, gate=jnp.zeros((B, K)))
  with pytest.raises(ValueError, match="log_decay"):
    attnjax.linear_attention_step(q, k, v, state, log_decay=jnp.ones((N,)))
  with pytest.raises(ValueError, match="gate"):
    attnjax.linear_attention_step(q, k, v, state,
                                  gate=jnp.full((B, N), 0.5))
  with pytest.raises(ValueError, match="key"):
    attnjax.linear_attention_step(q, k[:, :, :-1], v, state)
  with pytest.raises(ValueError, match="beta"):
    api.delta_rule_step(q, k, v, jnp.ones((B,)), state)
  beta = jnp.ones((B, N))
  with pytest.raises(ValueError, match="gate"):
    api.delta_rule_step(q, k, v, beta, state, gate=jnp.zeros((B, N, H)))
  with pytest.raises(ValueError, match="gate"):
    api.delta_rule_step(q, k, v, beta, state, gate=jnp.ones((B, N)))
  with pytest.raises(ValueError, match="state"):
    api.delta_rule_step(q, k, v, beta, state[:, :, :-1])


def test_gate_values_are_only_checked_when_concrete():
  """Under jit a gate's values are unknown (not checked); its shape is."""
  q, k, v = _qkv()
  f = jax.jit(lambda g: attnjax.linear_attention(q, k, v, gate=g))
  assert f(jnp.full((B, T, N), 0.1)).shape == (B, T, N, HV)
  with pytest.raises(ValueError, match="gate"):
    f(jnp.zeros((B, T, K)))
  # Zero (no decay) and negative gates are accepted eagerly.
  out = attnjax.linear_attention(q, k, v, gate=jnp.zeros((B, T, N)).at[
      0, 1, 1].set(-3.0))
  assert out.shape == (B, T, N, HV)


def test_log_decay_is_only_checked_when_concrete():
  """Under jit the values are unknown; shapes are still checked."""
  q, k, v = _qkv()
  f = jax.jit(lambda ld: attnjax.linear_attention(q, k, v, log_decay=ld))
  assert f(-jnp.ones((N,))).shape == (B, T, N, HV)
  with pytest.raises(ValueError, match="log_decay"):
    f(-jnp.ones((N + 1,)))


def test_pallas_per_channel_gate_with_segments():
  """segment_ids reach the per-channel-gate kernels (chunk-parallel
  layout) as resets: random inputs, a boundary inside a chunk."""
  arrays, _ = linear_case(key_for("api-channel-segments"), length=40,
                          gate="channel")
  q, k, v, gate = (arrays[n] for n in ("query", "key", "value", "gate"))
  cut = 17
  seg = jnp.zeros(q.shape[:2], jnp.int32).at[:, cut:].set(1)
  out = attnjax.linear_attention(q, k, v, gate=gate, segment_ids=seg,
                                 implementation="pallas")
  ref = attnjax.linear_attention(q, k, v, gate=gate, segment_ids=seg,
                                 implementation="xla")
  assert_matches(out, ref, jnp.float32, name="out")
  # The second segment does not see the first; without the reset it would.
  alone = attnjax.linear_attention(q[:, cut:], k[:, cut:], v[:, cut:],
                                   gate=gate[:, cut:], implementation="xla")
  assert_matches(out[:, cut:], alone, jnp.float32, name="second segment")
  joined = attnjax.linear_attention(q, k, v, gate=gate,
                                    implementation="xla")
  assert not jnp.allclose(joined[:, cut:], alone, atol=1e-2)


def test_default_implementation_order():
  expect = (("pallas", "xla_chunked") if jax.default_backend() == "gpu"
            else ("xla_chunked",))
  assert api.resolve(None) == expect
  assert api.resolve(["xla", "pallas"]) == ("xla", "pallas")


def test_output_dtype_follows_input_and_state_is_float32():
  q, k, v = _qkv(jnp.bfloat16)
  out, state = jax.eval_shape(lambda: attnjax.linear_attention(
      q, k, v, return_final_state=True, gate=-jnp.ones((B, T, N))))
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32


def test_empty_sequence_passes_the_state_through():
  q = jnp.ones((B, 0, N, H))
  kv = jnp.ones((B, 0, K, H))
  s0 = jnp.full((B, N, H, H), 2.0)
  out, state = attnjax.linear_attention(q, kv, kv, initial_state=s0,
                                        return_final_state=True)
  assert out.shape == (B, 0, N, H) and jnp.array_equal(state, s0)


def _largest_constant(hlo: str) -> int:
  """Elements of the largest array constant in an HLO module's text."""
  sizes = [math.prod(int(d) for d in m.group(1).split(",") if d)
           for m in re.finditer(r"= \w+\[([\d,]*)\]\S* constant\(", hlo)]
  return max(sizes, default=0)


@pytest.mark.parametrize("implementation", ["xla_chunked", "pallas"])
@pytest.mark.parametrize("segments", [False, True])
def test_constant_decay_is_not_folded_into_per_token_constants(
    implementation, segments):
  """A decay fixed at trace time (e.g. nn.retnet_log_decay) must not turn
  the per-token cumulative decays into compile-time constants: XLA folds
  those on the host, which took over a minute per compile at T = 512k."""
  t, n = 2048, 4
  decay = attnjax.nn.retnet_log_decay(n)
  seg = (jnp.arange(t)[None] // 700).astype(jnp.int32) if segments else None

  def f(q, k, v):
    return attnjax.linear_attention(
        q, k, v, log_decay=decay, segment_ids=seg,
        implementation=implementation)

  x = jax.ShapeDtypeStruct((1, t, n, 16), jnp.float32)
  hlo = jax.jit(f).lower(x, x, x).compile().as_text()
  assert _largest_constant(hlo) <= t, _largest_constant(hlo)  # seg: [1, t]
  grad = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), (0, 1, 2)))
  hlo = grad.lower(x, x, x).compile().as_text()
  assert _largest_constant(hlo) <= t, _largest_constant(hlo)  # seg: [1, t]
