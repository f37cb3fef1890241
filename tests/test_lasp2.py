"""LASP-2 on 8 fake CPU devices: equals single-device linear attention.

Forward outputs, final states and gradients (q, k, v, gates, decays, beta,
initial state) against the scan reference on unsharded arrays, for the
stateful variants (fixed decay + scalar gates + resets, per-channel gates +
normalisation, the gated delta rule), on Explicit, Auto and 2-D meshes; and
the compiled HLO: one all-gather in the forward pass, and backward
collectives whose shapes do not depend on the sequence length.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.parallel import lasp2
from linear_suite import (BF16, F32, assert_matches, key_for, linear_case,
                          vjp_of)

_NONDIFF = ("segment_ids",)


def _mesh(kind):
  if kind == "explicit":
    return jax.make_mesh((8,), ("seq",))
  if kind == "auto":
    return jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))
  return jax.make_mesh((2, 4), ("data", "seq"))  # explicit, batch on data


def _lasp_fn(case, mesh, **extra):
  """f(diff arrays) -> (out, final_state) through LASP-2."""
  arrays, opts = case
  rest = {k: v for k, v in arrays.items() if k in _NONDIFF}

  def f(d):
    a = {**d, **rest}
    q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
    if "beta" in a:
      beta = a.pop("beta")
      return lasp2.sequence_parallel_delta_rule_attention(
          q, k, v, beta, mesh=mesh, return_final_state=True, **a, **opts,
          **extra)
    return lasp2.sequence_parallel_linear_attention(
        q, k, v, mesh=mesh, return_final_state=True, **a, **opts, **extra)

  return f


_CASES = {
    # Fixed decay + scalar gates, resets (one exactly at a shard boundary),
    # initial state, GQA.
    "decay_gate_resets": dict(gate="scalar", log_decay=True,
                              initial_state=True),
    # Per-channel gates (GLA) with the normalised elu+1 map.
    "channel_normalize": dict(gate="channel", normalize=True,
                              feature_map="elu_plus_one", segments=True),
    # Gated DeltaNet: the state transition is a matrix per shard.
    "delta": dict(delta=True, gate="scalar", initial_state=True),
}
_MESH_FOR = {"decay_gate_resets": "explicit", "channel_normalize": "auto",
             "delta": "data_seq"}


@pytest.mark.parametrize("name,dtype", [(n, F32) for n in sorted(_CASES)]
                         + [("decay_gate_resets", BF16), ("delta", BF16)])
def test_lasp2_matches_single_device(name, dtype):
  """bf16: the inputs rounded, the reference in float32 on the same
  values, bf16 tolerances."""
  length = 64
  arrays, opts = linear_case(key_for("lasp2", name), length=length,
                             dtype=dtype, **_CASES[name])
  if name != "channel_normalize":
    # Segment changes at a shard boundary (16 = 2 shards of 8) and inside.
    seg = jnp.zeros((2, length), jnp.int32)
    seg = seg.at[:, 16:].set(1).at[0, 37:].set(2)
    arrays["segment_ids"] = seg
  case = (arrays, opts)
  mesh = _mesh(_MESH_FOR[name])
  impl = "xla_chunked"
  ck = key_for("lasp2-ct", name)
  diff = {k: v for k, v in arrays.items() if k not in _NONDIFF}
  lasp = _lasp_fn(case, mesh, chunk_size=4, implementation=impl)

  @jax.jit
  def run(d):
    (out, state), pull = jax.vjp(lasp, d)
    k1, k2 = jax.random.split(ck)
    cts = (jax.random.normal(k1, out.shape, F32).astype(out.dtype),
           jax.random.normal(k2, state.shape, F32))
    return out, state, pull(cts)[0]

  out, state, grads = run(diff)
  assert out.sharding.spec[1] == "seq"
  assert out.dtype == dtype
  ref_case = ({k: (v.astype(F32) if jnp.issubdtype(v.dtype, jnp.floating)
                   else v) for k, v in arrays.items()}, opts)
  rout, rstate, rgrads = vjp_of(ref_case, "xla", ck, ct_dtype=dtype)
  assert_matches(out, rout, dtype, name="out")
  assert_matches(state, rstate, dtype, name="final_state")
  assert set(grads) == set(rgrads)
  for k in rgrads:
    assert_matches(grads[k], rgrads[k], dtype, grad=True, name=f"d{k}")


def test_lasp2_eager_inputs_already_sharded():
  """Inputs device_put with a NamedSharding, called outside jit."""
  mesh = _mesh("explicit")
  arrays, opts = linear_case(key_for("lasp2-eager"), length=32,
                             log_decay=True)
  sh = NamedSharding(mesh, P(None, "seq"))
  q, k, v = (jax.device_put(arrays[n], sh) for n in ("query", "key", "value"))
  out = lasp2.sequence_parallel_linear_attention(
      q, k, v, mesh=mesh, log_decay=arrays["log_decay"])
  ref = jax.jit(lambda q, k, v: lasp2.api.linear_attention(
      q, k, v, log_decay=arrays["log_decay"], implementation="xla"))(
          arrays["query"], arrays["key"], arrays["value"])
  assert_matches(out, ref, F32)


_COLLECTIVE = re.compile(
    r"= (\S+) (all-gather|all-reduce|reduce-scatter|collective-permute|"
    r"all-to-all)(?:-start)?\(")


def _collectives(fn, *args):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return sorted(_COLLECTIVE.findall(text))


@pytest.mark.parametrize("kind", ["linear", "delta"])
def test_lasp2_one_all_gather_forward_and_length_free_backward(kind):
  mesh = _mesh("explicit")
  sigs = []
  for length in (32, 64):
    kw = (dict(delta=True, gate="scalar") if kind == "delta" else
          dict(gate="scalar", log_decay=True, initial_state=True))
    arrays, opts = linear_case(key_for("lasp2-hlo", kind), length=length,
                               **kw)
    arrays["segment_ids"] = jnp.zeros((2, length), jnp.int32).at[:, 20:].set(
        1)
    lasp = _lasp_fn((arrays, opts), mesh, chunk_size=4)
    diff = {k: v for k, v in arrays.items() if k not in _NONDIFF}
    fwd = _collectives(lasp, diff)
    assert [op for _, op in fwd] == ["all-gather"], fwd
    loss = lambda d: sum(jnp.sum(x) for x in lasp(d))  # noqa: E731
    sigs.append((fwd, _collectives(jax.grad(loss), diff)))
  # Same collectives with the same shapes at both lengths.
  assert sigs[0] == sigs[1], sigs


def test_lasp2_bad_arguments():
  mesh = _mesh("explicit")
  x = jnp.ones((1, 12, 2, 4))
  with pytest.raises(ValueError, match="divisible"):
    lasp2.sequence_parallel_linear_attention(x, x, x, mesh=mesh)
  y = jnp.ones((1, 16, 2, 4))
  with pytest.raises(ValueError, match="axis_name"):
    lasp2.sequence_parallel_linear_attention(y, y, y, mesh=mesh,
                                             axis_name="sp")
  with pytest.raises(ValueError, match="log_decay"):
    lasp2.sequence_parallel_linear_attention(y, y, y, mesh=mesh,
                                             log_decay=jnp.ones((2,)))
  with pytest.raises(ValueError, match="beta"):
    lasp2.sequence_parallel_delta_rule_attention(y, y, y, jnp.ones((1, 16)),
                                                 mesh=mesh)
