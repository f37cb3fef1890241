"""Pallas chunked-scan kernels: interpret mode vs the scan, H100 lowering, GPU.

On CPU the kernels run in Pallas interpret mode on small shapes (forward,
final state and gradients against autodiff of the scan) and are lowered for an
abstract H100 through Triton. ``@pytest.mark.gpu`` tests run the compiled
kernels on a real GPU.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax
from attnjax import testing
from linear_suite import (BF16, F32, assert_matches, call, check_against_scan,
                          key_for, linear_case, run_in_two_parts)
from pallas_kernels.linear_scan import kernels


def _with_config(monkeypatch, **overrides):
  """Makes implementation="pallas" use this tiling (e.g. forced splits)."""
  base = kernels.default_config

  def patched(dtype=jnp.bfloat16, *dims, **kw):
    return dataclasses.replace(base(dtype, *dims, **kw), **overrides)

  monkeypatch.setattr(kernels, "default_config", patched)


_CASES = {
    # GQA, Hv != H, F and V padded inside (12 -> 16, 20 -> 32), 1 split.
    "plain_gqa": (dict(head_dim=12, value_dim=20, length=50), 1),
    # Scalar gate + fixed decay, resets, initial state, 3 splits.
    "gated_segments": (dict(gate="scalar", log_decay=True, segments=True,
                            initial_state=True, length=45), 3),
    # Normalised elu+1 with a fixed decay: V + 1 value columns.
    "normalize": (dict(normalize=True, feature_map="elu_plus_one",
                       log_decay=True, initial_state=True, length=40), 2),
    # Resets without any decay (the weights are masks only), 3 splits.
    "segments_only": (dict(segments=True, initial_state=True, length=45), 3),
    # bf16 inputs, gates and resets, 2 splits.
    "bf16": (dict(gate="scalar", segments=True, dtype=BF16, length=40), 2),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_pallas_interpret_matches_scan(name, monkeypatch):
  kw, splits = _CASES[name]
  _with_config(monkeypatch, num_splits=splits)
  case = linear_case(key_for("pallas", name), **kw)
  check_against_scan(case, "pallas", chunk_size=16)


@pytest.mark.parametrize("name,splits", [("gated_segments", 1), ("bf16", 2),
                                         ("plain_gqa", 1), ("normalize", 1)])
def test_pallas_prefetch_weights_matches_scan(name, splits, monkeypatch):
  """KernelConfig(prefetch_weights=True): the sweeps carry the next chunk's
  weights through their loops (none without gates or resets). 100 tokens
  in chunks of 16: 7 (4) chunks a split, so a weight off by one chunk
  shows. Forward and gradients against the scan."""
  kw, _ = _CASES[name]
  _with_config(monkeypatch, num_splits=splits, prefetch_weights=True)
  case = linear_case(key_for("pallas-prefetch", name),
                     **{**kw, "length": 100})
  check_against_scan(case, "pallas", chunk_size=16)


@pytest.mark.parametrize("name,splits,extra", [
    ("gated_segments", 1, {}), ("gated_segments", 3, {}), ("bf16", 2, {}),
    ("segments_only", 3, {}), ("normalize", 1, dict(prefetch_weights=True)),
    ("plain_gqa", 1, {}), ("gated_segments", 3, dict(chained_tile=32))])
def test_pallas_packed_weights_matches_scan(name, splits, extra,
                                            monkeypatch):
  """KernelConfig(packed_weights=True): the sweeps (forward, chained
  forward, dq, dv, dk) read the log-gate sums, wq, wk and the reset counts
  as one [C, 4] tile of one array (none without gates or resets). Gates,
  fixed decays, resets alone, splits, prefetching, the chained forward;
  100 tokens in chunks of 16. Forward and gradients against the scan."""
  kw, _ = _CASES[name]
  _with_config(monkeypatch, num_splits=splits, packed_weights=True, **extra)
  case = linear_case(key_for("pallas-packed", name, str(splits)),
                     **{**kw, "length": 100})
  check_against_scan(case, "pallas", chunk_size=16)


def _spy_statics(monkeypatch):
  """A list that collects the _Static of every call of kernels._core."""
  seen = []
  core = kernels._core

  def spy(*a):
    seen.append(a[-1])
    return core(*a)

  monkeypatch.setattr(kernels, "_core", spy)
  return seen


# gram_parts is opt-in and slower (run82); its heaviest case runs with
# `pytest -m long`.
@pytest.mark.parametrize("name,splits,parts", [
    pytest.param("gated_segments", 4, 4, marks=pytest.mark.long),
    ("bf16", 2, 4), ("plain_gqa", 3, 2), ("segments_only", 2, 8)])
def test_pallas_gram_parts_matches_scan(name, splits, parts, monkeypatch):
  """KernelConfig(gram_parts): each split's Gram sum (the forward's
  k^T v, the backward's q^T dO) taken by several programs over parts of
  its rows and added. 250 tokens in chunks of 16 (16 chunks), Gram steps
  of 16 rows, so every part is one or more whole steps; the parts asked
  for are the ones used (the split's rows divide). Forward and gradients
  against the scan."""
  kw, _ = _CASES[name]
  _with_config(monkeypatch, num_splits=splits, gram_parts=parts,
               block_rows=16)
  case = linear_case(key_for("pallas-gram-parts", name),
                     **{**kw, "length": 250})
  seen = _spy_statics(monkeypatch)
  check_against_scan(case, "pallas", chunk_size=16)
  assert seen and all(st.gram_parts == parts and st.splits == splits
                      for st in seen), seen


@pytest.mark.parametrize("splits", [2, 3])
def test_pallas_ones_weighted_gram_matches_scan(splits, monkeypatch):
  """kernels._UNWEIGHTED_GRAM = False (the timing switch for the former
  form: the ungated Gram pass weighted by ones, the backward's scale
  folded into the weights) still matches the scan, forward and
  gradients."""
  monkeypatch.setattr(kernels, "_UNWEIGHTED_GRAM", False)
  kw, _ = _CASES["plain_gqa"]  # no gate, no resets: the only such case
  _with_config(monkeypatch, num_splits=splits)
  case = linear_case(key_for("pallas-ones-gram", splits),
                     **{**kw, "length": 100})
  check_against_scan(case, "pallas", chunk_size=16)


def test_pallas_gram_parts_reduced_to_whole_steps(monkeypatch):
  """gram_parts halves until each part is whole Gram steps: 100 tokens in
  chunks of 16 over 2 splits (4 chunks, 64 rows a split) with 64-row
  steps leave one part; rounded up to a power of two first (3 -> 4)."""
  seen = _spy_statics(monkeypatch)
  x = jnp.ones((1, 100, 1, 16), F32)
  for rows, parts, want in ((64, 4, 1), (32, 4, 2), (16, 3, 4)):
    cfg = kernels.KernelConfig(chunk=16, num_splits=2, block_rows=rows,
                               gram_parts=parts)
    jax.eval_shape(lambda a: kernels.chunked_linear_attention(
        a, a, a, scale=1.0, config=cfg, interpret=True), x)
    assert seen[-1].gram_parts == want, (rows, parts, seen[-1])


def _chained_kernels(case, **extra):
  """pallas_call names in the jaxpr of the (undifferentiated) call."""
  arrays, _ = case
  text = str(jax.make_jaxpr(lambda: call(case, "pallas", **extra))())
  return set(re.findall(r"linear_scan_\w+", text))


def _chained_cases():
  """(name, splits, tile, prefix, lookback) of the chained forward's test:
  every case with the prefix look-back, the two other links on
  gated_segments; their other cases with `pytest -m long` (an opt-in
  research path; CI's suite stays under 20 minutes)."""
  links = {"prefix": (True, True), "sums": (False, True),
           "serial": (True, False)}
  for name, splits, tile in [
      ("plain_gqa", 3, 16), ("gated_segments", 3, 32), ("normalize", 2, 16),
      ("segments_only", 3, 48), ("bf16", 2, 16)]:
    for link, (prefix, lookback) in links.items():
      heavy = link != "prefix" and name != "gated_segments"
      yield pytest.param(name, splits, tile, prefix, lookback,
                         id=f"{link}-{name}-{splits}-{tile}",
                         marks=pytest.mark.long if heavy else ())


@pytest.mark.parametrize("name,splits,tile,prefix,lookback",
                         list(_chained_cases()))
def test_pallas_chained_forward_matches_scan(name, splits, tile, prefix,
                                             lookback, monkeypatch):
  """KernelConfig(chained_tile): the forward in one kernel over tiles of
  1-3 chunks chained by look-back, against the scan, alone and under
  differentiation (its states entering the splits feed the backward).
  "sums":
  no tile publishes its leaving state, so each walks back over every
  earlier tile's own sum to the initial state (on a GPU, the walk over
  tiles still running); "serial": no tile publishes its own sum
  (KernelConfig(chained_lookback=False)), each waits for the state leaving
  its predecessor."""
  kw, _ = _CASES[name]
  monkeypatch.setattr(kernels, "_PUBLISH_PREFIX", prefix)
  _with_config(monkeypatch, num_splits=splits, chained_tile=tile,
               chained_lookback=lookback)
  case = linear_case(key_for("pallas-chained", name), **{**kw, "length": 90})
  assert _chained_kernels(case, chunk_size=16) == {"linear_scan_chained_fwd"}
  check_against_scan(case, "pallas", grads=False, chunk_size=16)
  check_against_scan(case, "pallas", chunk_size=16)


# The chained forward is an opt-in research path (the default never takes
# it); test_pallas_chained_forward_matches_scan covers it in CI, this
# property with `pytest -m long`.
@pytest.mark.long
@settings(max_examples=8, deadline=None)
@given(length=st.integers(17, 130), splits=st.integers(2, 5),
       tile=st.sampled_from([16, 32, 48, 64, 1000]),
       gate=st.sampled_from([None, "scalar"]), segments=st.booleans(),
       prefix=st.booleans())
def test_pallas_chained_forward_property(length, splits, tile, gate,
                                         segments, prefix):
  """Chained forward == scan for any split count, tile size and length
  (a tile size rounded down to a divisor of the split's chunks), walking
  back to a published leaving state or over the tiles' own sums."""
  base = kernels.default_config
  cfg = lambda dtype=jnp.bfloat16, *dims, **kw: dataclasses.replace(  # noqa: E731
      base(dtype, *dims, **kw), num_splits=splits, chained_tile=tile)
  case = linear_case(key_for("pallas-chained-prop", length, splits, tile,
                             gate, segments), length=length, gate=gate,
                     segments=segments, initial_state=True, heads=2,
                     kv_heads=1)
  orig = kernels.default_config, kernels._PUBLISH_PREFIX
  kernels.default_config, kernels._PUBLISH_PREFIX = cfg, prefix
  try:
    check_against_scan(case, "pallas", grads=False, chunk_size=16)
  finally:
    kernels.default_config, kernels._PUBLISH_PREFIX = orig


def test_pallas_split_sequence_and_carry_state(monkeypatch):
  _with_config(monkeypatch, num_splits=2)
  arrays, opts = linear_case(key_for("pallas-split"), length=48,
                             gate="scalar", initial_state=True)
  full_out, full_state = call((arrays, opts), "pallas", chunk_size=16)
  out, state = run_in_two_parts((arrays, opts), "pallas", 21, chunk_size=16)
  assert_matches(out, full_out, F32)
  assert_matches(state, full_state, F32)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("gate", [None, "scalar"])
def test_pallas_fixed_decay_not_learned(splits, gate, monkeypatch):
  """A decay held constant (RetNet / Lightning, fla's g_gamma) is not
  differentiated: the backward skips the gate-gradient kernels' outputs and
  the per-chunk states they store, and q, k, v (and a learned gate beside
  it) still match the scan."""
  _with_config(monkeypatch, num_splits=splits)
  case = linear_case(key_for("pallas-fixed", splits, gate), length=45,
                     gate=gate, log_decay=True, initial_state=True)
  check_against_scan(case, "pallas", chunk_size=16, nondiff=("log_decay",))


def _dq_outputs(fn, *args):
  """Output counts of the linear_scan_dq pallas_calls in fn's jaxpr."""
  counts = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call" and "linear_scan_dq" in str(
          eqn.params.get("name_and_src_info", eqn.params.get("name", ""))):
        counts.append(len(eqn.outvars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


def test_pallas_gate_gradient_only_when_perturbed():
  q = jnp.ones((1, 32, 2, 16))
  decay = jnp.array([-0.1, -0.2])

  def loss(q, k, v, d):
    return jnp.sum(attnjax.linear_attention(
        q, k, v, log_decay=d, implementation="pallas", chunk_size=16))

  learned = _dq_outputs(jax.grad(loss, (0, 1, 2, 3)), q, q, q, decay)
  fixed = _dq_outputs(jax.grad(loss, (0, 1, 2)), q, q, q, decay)
  assert learned == [3] and fixed == [1], (learned, fixed)


def test_pallas_chunk_32_forward(monkeypatch):
  _with_config(monkeypatch, num_splits=1)
  case = linear_case(key_for("pallas-c32"), length=70, gate="scalar",
                     segments=True)
  check_against_scan(case, "pallas", grads=False, chunk_size=32)


@pytest.mark.long  # ~35 s in interpret mode; its GPU twin runs in -m gpu
def test_pallas_interpret_gate_gradient_h128_bf16():
  """The GPU case test_gpu_pallas_matches_scan_h128[None-bfloat16] (8
  splits of 2 chunks here as on an H100): d log_decay sums d gate over t,
  so errors of d gate that are correlated along t add up. They were, when
  d gate came from one reverse cumsum over the sequence of q.dq - k.dk row
  terms rounded differently on the two sides (bf16 states): off by 43 at a
  tolerance of 37."""
  case = linear_case(key_for("gpu-h128", str(BF16), None), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, gate="scalar", log_decay=True,
                     segments=True, initial_state=True, dtype=BF16)
  check_against_scan(case, "pallas")


@pytest.mark.parametrize("splits", [None, 2])
@pytest.mark.parametrize("n,b", [(3, 1), (1, 2), (1, 1), (2, 3)])
def test_flat_call_keeps_the_grid_indices(n, b, splits):
  """_flat_call: with one head or one batch the (g0, heads, [splits,]
  batch) grid runs as (g0, heads * batch[, splits]) (no constant program
  id at batch 1); every program still gets its own blocks, in and out,
  and the splits stay grid axis 2 (pl.program_id(2))."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  g0 = 4
  ns = splits or 1
  x = jnp.arange(b * n * ns * g0 * 8, dtype=F32).reshape(b, n, ns, g0 * 8)
  if splits:
    grid = (g0, n, splits, b)
    spec = pl.BlockSpec((None, None, None, 8),
                        lambda i, n_, sp, b_: (b_, n_, sp, i))
  else:
    grid = (g0, n, b)
    spec = pl.BlockSpec((None, None, None, 8),
                        lambda i, n_, b_: (b_, n_, 0, i))

  def kernel(x_ref, o_ref):
    sp = pl.program_id(2).astype(F32) if splits else 0.0
    o_ref[...] = x_ref[...] * 2.0 + 1000.0 * sp

  out = kernels._flat_call(
      kernel, grid=grid, in_specs=[spec], out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(x.shape, F32), interpret=True)(x)
  want = x * 2.0 + 1000.0 * jnp.arange(ns, dtype=F32)[:, None]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("family", ["scalar", "channel", "delta"])
def test_batch_one_kernels_under_vmap(family):
  """Each kernel family at batch 1 (heads and batch on one grid axis)
  under jax.vmap, whose batching rule adds a grid axis of its own: the
  same outputs as calling it per element."""
  from pallas_kernels.linear_scan import channel, delta  # noqa: PLC0415
  ks = jax.random.split(key_for("vmap-batch-one", family), 5)
  lead, b, t, n, f = 2, 1, 40, 3, 16
  q = jax.random.normal(ks[0], (lead, b, t, n, f))
  k = jax.random.normal(ks[1], (lead, b, t, n, f))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (lead, b, t, n, f))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (lead, b, t, n, f)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (lead, b, t, n)))

  def fn(q, k, v, g, beta):
    if family == "scalar":
      return kernels.chunked_linear_attention(q, k, v, g[..., 0], scale=0.3,
                                              interpret=True)[0]
    if family == "channel":
      return channel.channel_gated_linear_attention(
          q, k, v, g, scale=0.3, interpret=True)[0]
    return delta.delta_rule(q, k, v, beta, g[..., 0], scale=0.3,
                            interpret=True)[0]

  out = jax.vmap(fn)(q, k, v, g, beta)
  want = jnp.stack([fn(q[i], k[i], v[i], g[i], beta[i]) for i in range(lead)])
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


def test_auto_splits():
  # Enough (batch, head) programs to fill whole waves: no split.
  assert kernels._auto_splits(256, 64, 132) == 1
  assert kernels._auto_splits(132, 64, 132) == 1
  # Otherwise ~per_sm programs per SM, preferring a divisor of the chunks.
  assert kernels._auto_splits(64, 256, 132, per_sm=4.0) == 16  # want 9
  assert kernels._auto_splits(16, 1024, 132, per_sm=4.0) == 64
  assert kernels._auto_splits(16, 1024, 132, per_sm=1.0) == 16
  assert kernels._auto_splits(16, 1024, 132) == 8  # default 0.5: want 5
  assert kernels._auto_splits(64, 256, 132) == 2
  assert kernels._auto_splits(16, 1000, 132, per_sm=1.0) == 10
  # At least two chunks per split; a split count that divides nothing.
  assert kernels._auto_splits(4, 6, 132) == 3
  assert kernels._auto_splits(4, 1, 132) == 1
  assert kernels._auto_splits(16, 997, 132, per_sm=1.0) == 9
  # Value blocks count as programs (run49): T = 16k, B = 4, N = 16 with
  # two value blocks is 128 programs on 132 SMs, unsplit; 64k, B = 1 not.
  assert kernels._auto_splits(64, 256, 132, blocks=2) == 1
  assert kernels._auto_splits(16, 1024, 132, blocks=2) == 8
  assert kernels._auto_splits(32, 256, 132, blocks=2) == 4  # 64: want 3


@pytest.mark.parametrize("b,t,v,splits", [(4, 16384, 128, 1),
                                          (1, 65536, 128, 8),
                                          (4, 16384, 64, 2)])
def test_auto_splits_count_value_blocks(b, t, v, splits, monkeypatch):
  """The public call passes its value blocks to the split heuristic."""
  monkeypatch.delenv("ATTNJAX_LINEAR_SCAN_CONFIG", raising=False)
  box = {}
  orig = kernels._core

  def spy(*a):
    box["s"] = a[-1]
    return orig(*a)

  monkeypatch.setattr(kernels, "_core", spy)
  x = jax.ShapeDtypeStruct((b, t, 16, 128), BF16)
  y = jax.ShapeDtypeStruct((b, t, 16, v), BF16)
  jax.eval_shape(lambda q, k, w: kernels.chunked_linear_attention(
      q, k, w, scale=1.0, interpret=True), x, x, y)
  assert box["s"].splits == splits


def test_default_forward_stages_follow_the_gate(monkeypatch):
  """Four pipeline stages only in the ungated bf16/f16 forward (run49);
  the public call tells default_config whether a gate is present."""
  monkeypatch.delenv("ATTNJAX_LINEAR_SCAN_CONFIG", raising=False)
  dc = kernels.default_config
  assert dc(BF16, 128, 128, gated=False).num_stages == 4
  assert dc(jnp.float16, 64, 64, gated=False).num_stages == 4
  assert dc(BF16, 128, 128, gated=True).num_stages == 2
  assert dc(BF16, 128, 128).num_stages == 2
  assert dc(F32, 128, 128, gated=False).num_stages == 2
  assert dc(BF16, 256, 256, gated=False).num_stages == 2
  seen = []

  def spy(*a, **kw):
    seen.append(kw.get("gated"))
    return dc(*a, **kw)

  monkeypatch.setattr(kernels, "default_config", spy)
  x = jnp.ones((1, 32, 1, 16), BF16)
  g = jnp.full((1, 32, 1), -0.1)
  attnjax.linear_attention(x, x, x, implementation="pallas")
  attnjax.linear_attention(x, x, x, gate=g, implementation="pallas")
  kernels.chunked_linear_attention(x, x, x, scale=1.0)
  kernels.chunked_linear_attention(x, x, x, g, scale=1.0)
  assert seen == [False, True, False, True]


def test_pallas_rejects_what_it_cannot_serve():
  q = jnp.ones((1, 32, 1, 16))
  with pytest.raises(NotImplementedError):  # not a power of two
    jax.eval_shape(lambda: attnjax.linear_attention(
        q, q, q, implementation="pallas", chunk_size=24))
  with pytest.raises(NotImplementedError):  # F = 1 + 16 + 256 > 256
    jax.eval_shape(lambda: attnjax.linear_attention(
        q, q, q, feature_map="taylor2", implementation="pallas"))


# ----------------------------------------------------------------------------
# Lowering for an H100 (Triton), checked on CPU.


def _export_for_h100(f, *args):
  from jax._src.mesh import AbstractDevice
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=(
      AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                     platform="gpu")))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
            "__gpu$xla.gpu.triton")])(*args)


_LOWERING = {
    "bf16_gate_1split": dict(dtype=BF16, gate=True, splits=1),
    "bf16_gate_segments_state_8splits": dict(dtype=BF16, gate=True,
                                             segments=True, state=True,
                                             splits=8),
    "bf16_plain_gqa_auto": dict(dtype=BF16, kv_heads=2),
    "f32_decay_normalize": dict(dtype=F32, gate=True, normalize=True,
                                splits=2),
    "bf16_vmapped": dict(dtype=BF16, gate=True, vmap=True, splits=2),
    "bf16_h256": dict(dtype=BF16, gate=True, head_dim=256, splits=1),
    "bf16_h256_3splits": dict(dtype=BF16, head_dim=256, splits=3),
    # The gate held constant: the backward without the gate-gradient outputs.
    "bf16_fixed_gate_4splits": dict(dtype=BF16, gate=True, fixed=True,
                                    splits=4),
    "bf16_gate_segments_prefetch": dict(dtype=BF16, gate=True,
                                        segments=True, splits=2,
                                        prefetch=True),
    "bf16_gate_segments_packed": dict(dtype=BF16, gate=True, segments=True,
                                      splits=2, packed=True),
    "bf16_segments_packed": dict(dtype=BF16, segments=True, splits=1,
                                 packed=True),
}


@pytest.mark.parametrize("name", sorted(_LOWERING))
def test_pallas_lowers_for_h100(name):
  opt = _LOWERING[name]
  b, t, n = 2, 4096, 8
  h = opt.get("head_dim", 128)
  kh = opt.get("kv_heads", n)
  dt = opt["dtype"]
  sd = jax.ShapeDtypeStruct
  lead = (3,) if opt.get("vmap") else ()
  args = [sd(lead + (b, t, n, h), dt), sd(lead + (b, t, kh, h), dt),
          sd(lead + (b, t, kh, h), dt),
          sd(lead + (b, t, n), F32)]
  cfg = kernels.default_config(dt, h, h + 1 if opt.get("normalize") else h,
                               gated=bool(opt.get("gate")),
                               num_splits=opt.get("splits"),
                               prefetch_weights=opt.get("prefetch", False),
                               packed_weights=opt.get("packed", False))
  extra = {}
  if opt.get("state"):
    args.append(sd(lead + (b, n, h, h), F32))
  if opt.get("segments"):
    extra["segment_ids"] = jnp.zeros((b, t), jnp.int32).at[:, 1000:].set(1)

  def loss(q, k, v, g, *s0):
    if not opt.get("gate"):
      g = None
    vv = v
    if opt.get("normalize"):
      vv = jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1)
      s0 = ()
    resets = None
    if opt.get("segments"):
      seg = extra["segment_ids"]
      resets = jnp.concatenate([jnp.zeros((b, 1), bool),
                                seg[:, 1:] != seg[:, :-1]], 1)
    o, st = kernels.chunked_linear_attention(
        q, k, vv, g, resets, scale=0.1,
        initial_state=s0[0] if s0 else None, config=cfg, interpret=False)
    return jnp.sum(o.astype(F32) ** 2) + jnp.sum(st)

  grad = jax.grad(loss, argnums=tuple(
      i for i in range(len(args)) if not (opt.get("fixed") and i == 3)))
  if opt.get("vmap"):
    grad = jax.vmap(grad)
  exported = _export_for_h100(grad, *args)
  text = exported.mlir_module()
  # Forward, dq, dv and dk kernels; with sequence splits, the split-end
  # states and the chain over splits run once for the forward and once more
  # for the backward's reversed scan. (The auto case, B * N = 16 at
  # T = 4096, splits on an H100.)
  names = ["linear_scan_fwd", "linear_scan_dq", "linear_scan_dv",
           "linear_scan_dk"]
  calls = 4
  if opt.get("splits") != 1:
    names += ["linear_scan_split_state", "linear_scan_chain_splits"]
    calls += 4
  found = set(re.findall(r"linear_scan_\w+", text))
  assert found == set(names), found
  assert text.count("__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("gate", [False, True])
def test_pallas_chained_forward_lowers_for_h100(gate):
  """The chained forward (atomics, look-back loops) lowers through Triton
  for an H100 as the only kernel of an undifferentiated call: B = 1,
  T = 64k, where the default splits the sequence."""
  b, t, n, h = 1, 65536, 16, 128
  sd = jax.ShapeDtypeStruct
  args = [sd((b, t, n, h), BF16)] * 3 + [sd((b, t, n), F32)] * gate
  cfg = kernels.default_config(BF16, h, h, gated=gate, chained_tile=512,
                               num_sms=132)

  def fwd(q, k, v, g=None):
    return kernels.chunked_linear_attention(q, k, v, g, scale=0.1,
                                            config=cfg, interpret=False)

  text = _export_for_h100(fwd, *args).mlir_module()
  assert set(re.findall(r"linear_scan_\w+", text)) == {
      "linear_scan_chained_fwd"}
  assert text.count("__gpu$xla.gpu.triton") == 1
  # Differentiated: the chained forward, then the backward's kernels (its
  # reversed split-state pass and chain included).
  grad = jax.grad(lambda *a: jnp.sum(fwd(*a)[0].astype(F32) ** 2),
                  argnums=tuple(range(len(args))))
  text = _export_for_h100(grad, *args).mlir_module()
  assert set(re.findall(r"linear_scan_\w+", text)) == {
      "linear_scan_chained_fwd", "linear_scan_dq", "linear_scan_dv",
      "linear_scan_dk", "linear_scan_split_state",
      "linear_scan_chain_splits"}
  assert text.count("__gpu$xla.gpu.triton") == 6


# ----------------------------------------------------------------------------
# On a GPU: the compiled Triton kernels.


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_CASES))
def test_gpu_pallas_matches_scan_small(name):
  kw, _ = _CASES[name]
  case = linear_case(key_for("gpu-pallas", name), **kw)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("gate,prefix,lookback", [
    (None, True, True), ("scalar", True, True), ("scalar", False, True),
    ("scalar", True, False)])
def test_gpu_pallas_chained_forward_h128(gate, prefix, lookback,
                                         monkeypatch):
  """The chained forward where its tiles run side by side and wait on each
  other: 64 tiles of 128 tokens a head (B = 1, N = 4, T = 8192, 4 splits
  for the backward), forward and gradients against the scan; "prefix"
  False walks every tile back over all earlier tiles' own sums, lookback
  False waits for the predecessor's leaving state alone."""
  monkeypatch.setattr(kernels, "_PUBLISH_PREFIX", prefix)
  _with_config(monkeypatch, num_splits=4, chained_tile=128,
               chained_lookback=lookback)
  case = linear_case(key_for("gpu-chained", gate, prefix, lookback), batch=1,
                     length=8192, heads=4, kv_heads=4, head_dim=128,
                     value_dim=128, gate=gate, segments=True,
                     initial_state=True, dtype=BF16)
  assert _chained_kernels(case) == {"linear_scan_chained_fwd"}
  check_against_scan(case, "pallas", grads=False)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [16, 32, 128])
def test_gpu_pallas_other_chunk_sizes(chunk):
  case = linear_case(key_for("gpu-chunk", chunk), length=300, head_dim=64,
                     value_dim=64, gate="scalar", segments=True,
                     initial_state=True)
  check_against_scan(case, "pallas", chunk_size=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("splits", [1, 5, None])
def test_gpu_pallas_matches_scan_h128(dtype, splits, monkeypatch):
  """Production head size (H = Hv = 128), GQA 8:2, gates, resets, state."""
  _with_config(monkeypatch, num_splits=splits)
  case = linear_case(key_for("gpu-h128", str(dtype), splits), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, gate="scalar", log_decay=True,
                     segments=True, initial_state=True, dtype=dtype)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None])
def test_gpu_pallas_ungated_h128(splits, monkeypatch):
  """H = 128 bf16 without a gate: the default's 4-stage forward."""
  _with_config(monkeypatch, num_splits=splits)
  case = linear_case(key_for("gpu-h128-ungated", splits), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, segments=True, initial_state=True,
                     dtype=BF16)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_pallas_gram_parts_h128(dtype, monkeypatch):
  """KernelConfig(gram_parts=4) compiled at H = 128 with gates, resets,
  a fixed decay, an initial state and 4 splits of 256 rows (4 parts of
  one Gram step each), against the scan."""
  _with_config(monkeypatch, num_splits=4, gram_parts=4)
  case = linear_case(key_for("gpu-gram-parts", str(dtype)), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, gate="scalar", log_decay=True,
                     segments=True, initial_state=True, dtype=dtype)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_pallas_prefetch_weights_h128(dtype, monkeypatch):
  """KernelConfig(prefetch_weights=True) compiled at H = 128 with gates,
  resets, a fixed decay, an initial state and 5 splits, against the
  scan."""
  _with_config(monkeypatch, num_splits=5, prefetch_weights=True)
  case = linear_case(key_for("gpu-prefetch", str(dtype)), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, gate="scalar", log_decay=True,
                     segments=True, initial_state=True, dtype=dtype)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,splits", [(F32, 5), (BF16, 1), (BF16, 5)])
def test_gpu_pallas_packed_weights_h128(dtype, splits, monkeypatch):
  """KernelConfig(packed_weights=True) compiled at H = 128 with gates,
  resets, a fixed decay and an initial state, in one split and in 5,
  against the scan."""
  _with_config(monkeypatch, num_splits=splits, packed_weights=True)
  case = linear_case(key_for("gpu-packed", str(dtype), str(splits)),
                     batch=2, length=1000, heads=8, kv_heads=2,
                     head_dim=128, value_dim=128, gate="scalar",
                     log_decay=True, segments=True, initial_state=True,
                     dtype=dtype)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("gate,splits", [(None, None), ("scalar", 5)])
def test_gpu_pallas_fixed_decay_not_learned(gate, splits, monkeypatch):
  """The backward without the gate-gradient outputs (decay held constant),
  compiled, at H = Hv = 128 in bf16."""
  _with_config(monkeypatch, num_splits=splits)
  case = linear_case(key_for("gpu-fixed", gate, splits), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, gate=gate, log_decay=True,
                     initial_state=True, dtype=BF16)
  check_against_scan(case, "pallas", nondiff=("log_decay",))


@pytest.mark.gpu
def test_gpu_pallas_vmap_and_jit():
  case = linear_case(key_for("gpu-vmap"), length=300, heads=4, kv_heads=4,
                     head_dim=64, value_dim=64, gate="scalar", dtype=BF16)
  a = case[0]
  f = jax.jit(lambda q, k, v, g: attnjax.linear_attention(
      q, k, v, gate=g, implementation="pallas"))
  stacked = [jnp.stack([a[n], a[n] * 0.5]) for n in
             ("query", "key", "value", "gate")]
  out = jax.vmap(f)(*stacked)
  for i in range(2):
    ref = f(*[x[i] for x in stacked])
    testing.assert_close(out[i], ref, BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["fixed", "gate"])
def test_gpu_pallas_long_sequence(decay):
  """T = 65536, B = 1, strong and weak decays (two heads): pallas vs the
  scan, forward and final state, and gradients vs xla_chunked."""
  b, t, n, h = 1, 65536, 2, 64
  ks = jax.random.split(key_for("gpu-long", decay), 5)
  q = jax.random.normal(ks[0], (b, t, n, h), F32)
  k = jax.random.normal(ks[1], (b, t, n, h), F32) / np.sqrt(h)
  v = jax.random.normal(ks[2], (b, t, n, h), F32)
  kw = {}
  if decay == "fixed":
    kw["log_decay"] = jnp.array([-2.0, -1e-4])
  else:
    kw["gate"] = -jnp.array([2.0, 1e-4]) * (
        0.5 + jax.random.uniform(ks[3], (b, t, n)))

  def run(impl):
    return jax.jit(lambda q, k, v: attnjax.linear_attention(
        q, k, v, implementation=impl, return_final_state=True, **kw))(q, k, v)

  out, state = run("pallas")
  ref, ref_state = run("xla")
  testing.assert_finite(out, "out")
  assert_matches(out, ref, F32, name="out", axis=2)
  assert_matches(state, ref_state, F32, name="final_state", axis=1)

  def grads(impl):
    def loss(q, k, v):
      o = attnjax.linear_attention(q, k, v, implementation=impl, **kw)
      return jnp.sum(o * v)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for name, g, rg in zip("qkv", grads("pallas"), grads("xla_chunked")):
    assert_matches(g, rg, F32, grad=True, name=f"d{name}", axis=2)
