"""Shared inputs and comparisons for the linear-attention tests.

``linear_case(key, ...)`` draws fresh random inputs for one variant;
``check_against_scan(fn, case)`` compares an implementation's forward output,
final state and VJP (random cotangents for both) with autodiff of the scan
reference (``implementation="xla"``) on the same inputs, using the shared
dtype-keyed tolerances of ``attnjax.testing`` scaled by each reference's
magnitude.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import testing
from attnjax.linear import api

F32, BF16 = jnp.float32, jnp.bfloat16


def key_for(*parts):
  return jax.random.key(zlib.crc32(repr(parts).encode()))


def linear_case(key, *, batch=2, length=37, heads=4, kv_heads=2, head_dim=8,
                value_dim=6, dtype=F32, gate=None, log_decay=False,
                segments=False, initial_state=False, normalize=False,
                feature_map=None, delta=False, gate_strength=1.0):
  """Random inputs for one variant, as (arrays dict, static options dict).

  gate: None, "scalar" ([B, T, N]) or "channel" ([B, T, N, F]).
  """
  ks = jax.random.split(key, 10)
  b, t, n, kh, h, hv = batch, length, heads, kv_heads, head_dim, value_dim
  q = jax.random.normal(ks[0], (b, t, n, h), F32)
  k = jax.random.normal(ks[1], (b, t, kh, h), F32)
  v = jax.random.normal(ks[2], (b, t, kh, hv), F32)
  if delta:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  elif feature_map is None and not normalize:
    k = k / np.sqrt(h)
  arrays = {"query": q.astype(dtype), "key": k.astype(dtype),
            "value": v.astype(dtype)}
  opts = {}
  fdim = h
  if feature_map is not None:
    opts["feature_map"] = feature_map
    fdim = {"taylor2": 1 + h + h * h}.get(feature_map, h)
  if normalize:
    opts["normalize"] = True
  if gate is not None:
    shape = (b, t, n) if gate == "scalar" else (b, t, n, fdim)
    arrays["gate"] = -gate_strength * jax.nn.softplus(
        jax.random.normal(ks[3], shape, F32) - 1.0)
  if log_decay:
    arrays["log_decay"] = -jax.random.uniform(ks[4], (n,), F32, 0.02, 0.7)
  if segments:
    opts_seg = testing.random_segment_ids(ks[5], b, t, num_segments=3)
    arrays["segment_ids"] = opts_seg
  if initial_state:
    cols = hv + 1 if normalize else hv
    s0 = jax.random.normal(ks[6], (b, n, fdim, cols), F32)
    if normalize:  # a key sum is positive
      s0 = s0.at[..., -1].set(jnp.abs(s0[..., -1]) + 1.0)
    arrays["initial_state"] = s0
  if delta:
    arrays["beta"] = jax.nn.sigmoid(jax.random.normal(ks[7], (b, t, n), F32))
  return arrays, opts


def call(case, implementation, *, return_final_state=True, **extra):
  """The public function on one case, jitted (one compile, not op-by-op)."""
  arrays, opts = case
  return jax.jit(lambda a: _call(a, opts, implementation, return_final_state,
                                 extra))(arrays)


def _call(arrays, opts, implementation, return_final_state, extra):
  arrays = dict(arrays)
  q, k, v = arrays.pop("query"), arrays.pop("key"), arrays.pop("value")
  if "beta" in arrays:
    beta = arrays.pop("beta")
    return api.delta_rule_attention(
        q, k, v, beta, implementation=implementation,
        return_final_state=return_final_state, **arrays, **opts, **extra)
  return api.linear_attention(q, k, v, implementation=implementation,
                              return_final_state=return_final_state,
                              **arrays, **opts, **extra)


_NONDIFF = ("segment_ids",)


def _split(arrays, nondiff=()):
  fixed = _NONDIFF + tuple(nondiff)
  diff = {k: v for k, v in arrays.items() if k not in fixed}
  rest = {k: v for k, v in arrays.items() if k in fixed}
  return diff, rest


def vjp_of(case, implementation, cotangent_key, ct_dtype=F32, nondiff=(),
           **extra):
  """(out, state, grads dict) of one implementation under random cotangents.

  The output cotangent is drawn in float32 and rounded to ``ct_dtype``, so
  a bf16 run and its float32 reference see the same values. ``nondiff``:
  further arrays held constant (e.g. a fixed decay that is not learned).
  """
  arrays, opts = case
  diff, rest = _split(arrays, nondiff)

  def f(d):
    return _call({**d, **rest}, opts, implementation, True, extra)

  @jax.jit
  def run(d):
    (out, state), pull = jax.vjp(f, d)
    k1, k2 = jax.random.split(cotangent_key)
    d_out = jax.random.normal(k1, out.shape, F32).astype(ct_dtype).astype(
        out.dtype)
    d_state = jax.random.normal(k2, state.shape, F32)
    (grads,) = pull((d_out, d_state))
    return out, state, grads

  return run(diff)


def _mag(x):
  return float(jnp.max(jnp.abs(jnp.asarray(x, F32))))


def assert_matches(actual, expected, dtype, *, grad=False, name="value",
                   axis=None):
  """assert_close with the tolerance scaled to the reference's magnitude.

  ``axis``: compare each slice along it on its own scale (e.g. the heads
  axis when heads differ in magnitude by orders: a whole-tensor scale would
  let a weak head's large values set the tolerance of a strong head's small
  ones)."""
  if axis is None:
    testing.assert_close(actual, expected, dtype, grad=grad, name=name,
                         scale=_mag(expected))
    return
  actual, expected = jnp.asarray(actual), jnp.asarray(expected)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  for i in range(expected.shape[axis]):
    a = jnp.take(actual, i, axis=axis)
    e = jnp.take(expected, i, axis=axis)
    testing.assert_close(a, e, dtype, grad=grad, name=f"{name}[{axis}={i}]",
                         scale=_mag(e))


def check_against_scan(case, implementation, *, grads=True, dtype=None,
                       nondiff=(), **extra):
  """Forward, final state and (optionally) VJP against the scan reference
  (``nondiff``: arrays not differentiated, see ``vjp_of``). Returns the
  two gradient dicts (ours, the reference's) when ``grads``."""
  dtype = dtype or case[0]["query"].dtype
  ref_case = case
  if dtype != F32:  # the reference runs on the same (rounded) values in f32
    ref_case = ({k: (v.astype(F32) if jnp.issubdtype(v.dtype, jnp.floating)
                     else v) for k, v in case[0].items()}, case[1])
  ck = key_for("cotangent", implementation)
  if grads:
    out, state, g = vjp_of(case, implementation, ck, dtype, nondiff,
                           **extra)
    rout, rstate, rg = vjp_of(ref_case, "xla", ck, dtype, nondiff)
  else:
    out, state = call(case, implementation, **extra)
    rout, rstate = call(ref_case, "xla")
  assert out.dtype == case[0]["value"].dtype
  assert state.dtype == F32
  assert_matches(out, rout, dtype, name="out")
  assert_matches(state, rstate, dtype, name="final_state")
  if grads:
    assert set(g) == set(rg)
    for name in rg:
      testing.assert_finite(g[name], name=f"d{name}")
      assert_matches(g[name], rg[name], dtype, grad=True, name=f"d{name}")
    return g, rg
  return None


def run_in_two_parts(case, implementation, at, **extra):
  """Runs tokens [0, at) and [at, T) as two calls, the second starting
  from the first's final state; returns (concatenated outputs, final
  state), to compare with one call over the whole sequence."""
  arrays, opts = case
  seq = ("query", "key", "value", "gate", "beta", "segment_ids")

  def part(sl, state):
    a = {k: (v[:, sl] if k in seq else v) for k, v in arrays.items()}
    a["initial_state"] = state
    return call((a, opts), implementation, **extra)

  out1, s1 = part(slice(0, at), arrays["initial_state"])
  out2, s2 = part(slice(at, None), s1)
  return jnp.concatenate([out1, out2], 1), s2
