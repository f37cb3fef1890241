"""Per-key-channel gates (GLA) through the Pallas kernels
(``pallas_kernels/linear_scan/channel.py``): interpret mode vs the scan on
CPU, H100 lowering, and the compiled kernels on a GPU (``-m gpu``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnjax
from attnjax import testing
from linear_suite import (BF16, F32, assert_matches, call, check_against_scan,
                          key_for, linear_case, run_in_two_parts)
from pallas_kernels.linear_scan import channel, reference
from test_linear_pallas import _export_for_h100

_CASES = {
    # GQA 4:2, F and V padded inside (12 -> 16, 20 -> 32), odd length, a
    # fixed decay added to the gate, initial state.
    "gqa_decay_state": dict(gate="channel", log_decay=True, head_dim=12,
                            value_dim=20, length=45, initial_state=True),
    # Normalised elu+1 (V + 1 value columns), MQA.
    "normalize_mqa": dict(gate="channel", normalize=True, kv_heads=1,
                          feature_map="elu_plus_one", length=40),
    # Strong decays (|g| up to ~60 a step): a factored exp(G_i) exp(-G_j)
    # would overflow; every exponent here stays <= 0.
    "strong": dict(gate="channel", gate_strength=30.0, length=37),
    "bf16": dict(gate="channel", dtype=BF16, length=40, initial_state=True),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_channel_interpret_matches_scan(name):
  case = linear_case(key_for("channel", name), **_CASES[name])
  check_against_scan(case, "pallas", chunk_size=16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channel_bf16_decay_gradient(seed):
  """bf16 with the default configuration (chunk 32, factored diagonal
  blocks), gates of every sub-chunk within the factor bound (strength 2,
  a fixed decay of 0.1 a step), an initial state, T = 1000. The fixed
  decay's gradient sums q dq - k dk over every token and channel, large
  terms cancelling: with bf16 operands in the gradient kernel's
  diagonal-block matmuls it came out 5-25% off (first seen on the H200 in
  the H = 128 GPU test, docs/dev/gpu-runs/run31); float32 operands there
  fix it."""
  arrays, opts = linear_case(key_for("channel-bf16-decay", str(seed)),
                             batch=1, length=1000, heads=4, kv_heads=2,
                             head_dim=64, value_dim=32, gate="channel",
                             gate_strength=2.0, log_decay=True,
                             initial_state=True, dtype=BF16)
  arrays["log_decay"] = jnp.full_like(arrays["log_decay"], -0.1)
  g, rg = check_against_scan((arrays, opts), "pallas")
  # The bf16 gradient tolerance (0.04 of the largest entry) leaves a thin
  # margin for this regression, so the decay gradient gets its own bound.
  # On CPU (interpret) the three seeds are within 0.9% of the largest
  # head's gradient; with bf16 operands in the diagonal matmuls, 7-12%.
  got, want = g["log_decay"], rg["log_decay"]
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert err < 0.02, err


def test_channel_chunk_32_and_split_sequence_carries_state():
  arrays, opts = linear_case(key_for("channel-split"), length=70,
                             gate="channel", initial_state=True)
  full_out, full_state = call((arrays, opts), "pallas", chunk_size=32)
  ref_out, ref_state = call((arrays, opts), "xla")
  assert_matches(full_out, ref_out, F32)
  assert_matches(full_state, ref_state, F32)
  out, state = run_in_two_parts((arrays, opts), "pallas", 29, chunk_size=16)
  assert_matches(out, full_out, F32)
  assert_matches(state, full_state, F32)


@settings(max_examples=4)
@given(length=st.integers(1, 40), chunk=st.sampled_from([16, 32]),
       kv_heads=st.sampled_from([1, 2, 4]), strength=st.floats(0.01, 20.0))
def test_channel_forward_property(length, chunk, kv_heads, strength):
  case = linear_case(key_for("channel-prop", length, chunk, kv_heads),
                     length=length, kv_heads=kv_heads, gate="channel",
                     gate_strength=strength)
  check_against_scan(case, "pallas", grads=False, chunk_size=chunk)


@settings(max_examples=3, deadline=None)
# A case that fails with chunk-level cumulative gates (decay exponents as
# differences of large sums) and passes with the sub-chunk-local ones.
@example(length=62, chunk=64, kv_heads=1, strength=16.5, resets_p=0.0,
         splits=1, unroll=1, kcs=False, separate=False)
# Resets on the first token, on sub-chunk and chunk boundaries and inside.
@example(length=70, chunk=32, kv_heads=2, strength=3.0, resets_p=0.3,
         splits=1, unroll=2, kcs=True, separate=False)
# Resets across sequence splits, a sweep remainder in each split, in
# either layout.
@example(length=200, chunk=32, kv_heads=2, strength=1.0, resets_p=0.05,
         splits=3, unroll=3, kcs=False, separate=True)
@example(length=200, chunk=32, kv_heads=2, strength=1.0, resets_p=0.05,
         splits=3, unroll=3, kcs=True, separate=False)
@given(length=st.integers(1, 70), chunk=st.sampled_from([32, 64]),
       kv_heads=st.sampled_from([1, 2, 4]), strength=st.floats(0.01, 20.0),
       resets_p=st.sampled_from([0.0, 0.05, 0.3]),
       splits=st.sampled_from([1, 2, 3]), unroll=st.sampled_from([1, 2, 3]),
       kcs=st.booleans(), separate=st.booleans())
def test_channel_chunk_parallel_forward_property(length, chunk, kv_heads,
                                                 strength, resets_p, splits,
                                                 unroll, kcs, separate):
  """The chunk-parallel layout's output and final state against the scan
  for any length (partial sub-chunks and chunks), GQA ratio, gate strength,
  density of resets, sweep unrolling, number of sequence splits, fused or
  separate output, and gate sums read or formed in the kernels."""
  key = key_for("chunk-par-prop", length, chunk, kv_heads, resets_p)
  arrays, _ = linear_case(key, length=length, kv_heads=kv_heads,
                          gate="channel", gate_strength=strength,
                          initial_state=True)
  q, k, v, g, s0 = (arrays[x] for x in ("query", "key", "value", "gate",
                                        "initial_state"))
  resets = None
  if resets_p:
    resets = jax.random.bernoulli(jax.random.fold_in(key, 7), resets_p,
                                  (q.shape[0], length))
  cfg = channel.ChannelConfig(chunk=chunk, chunk_parallel=True, block_f=16,
                              block_v=16, sweep_unroll=unroll,
                              seq_splits=splits,
                              separate_output=separate,
                              kernel_cumsum=kcs)
  out, fin = jax.jit(lambda *a: channel.channel_gated_linear_attention(
      *a[:4], a[5], scale=0.5, initial_state=a[4], config=cfg,
      interpret=True))(q, k, v, g, s0, resets)
  ref, ref_fin = reference.linear_attention_reference(
      q, k, v, log_gate=g, scale=0.5, initial_state=s0, resets=resets)
  assert_matches(out, ref, F32, name="out")
  assert_matches(fin, ref_fin, F32, name="final state")


def test_channel_auto_layout():
  """With no config, on a GPU whose multiprocessors the forward sweep's
  programs fill at most half of (long sequences at batch 1), the default
  becomes the states-only sweep split by 64 rows plus the output kernel,
  4 chunks per sweep iteration (on 4 sequence splits when four times the
  programs still fit and each split gets >= 128 chunks); otherwise (more
  programs, no SM count, the sweep layout) it stays."""
  d = channel.ChannelConfig()
  sep = channel._auto_layout(d, 32, 132)
  assert sep.separate_output and sep.block_f_state == 64
  assert sep.sweep_unroll == 4
  assert sep.chunk == d.chunk and sep.block_v == d.block_v
  assert sep.seq_splits == 1  # no chunk count given: no splits
  # 4 splits when they still fit the multiprocessors and each has at
  # least 128 chunks.
  assert channel._auto_layout(d, 33, 132, 2048).seq_splits == 4
  assert channel._auto_layout(d, 34, 132, 2048).seq_splits == 1
  assert channel._auto_layout(d, 34, 132, 2048).separate_output
  assert channel._auto_layout(d, 32, 132, 512).seq_splits == 4
  assert channel._auto_layout(d, 32, 132, 511).seq_splits == 1
  assert channel._auto_layout(d, 66, 132).separate_output
  assert channel._auto_layout(d, 67, 132) == d
  assert channel._auto_layout(d, 512, 132) == d
  assert channel._auto_layout(d, 32, 0) == d
  sweep = channel.ChannelConfig(chunk=16, chunk_parallel=False)
  assert channel._auto_layout(sweep, 32, 132) == sweep


def test_channel_direct_call_and_errors():
  x = jnp.ones((1, 32, 1, 16))
  g = jnp.full((1, 32, 1, 16), -0.5)
  out, state = channel.channel_gated_linear_attention(
      x, x, x, g, scale=1.0, interpret=True)
  ref, ref_state = reference.linear_attention_reference(
      x, x, x, log_gate=g, scale=1.0)
  testing.assert_close(out, ref, F32)
  testing.assert_close(state, ref_state, F32)
  with pytest.raises(NotImplementedError, match="resets"):
    channel.channel_gated_linear_attention(
        x, x, x, g, jnp.zeros((1, 32), bool), scale=1.0,
        config=channel.ChannelConfig(chunk=16, chunk_parallel=False))
  with pytest.raises(ValueError, match="resets"):
    channel.channel_gated_linear_attention(
        x, x, x, g, jnp.zeros((1, 31), bool), scale=1.0)
  for match, bad in (("config.diag", dict(diag="rows")),
                     ("block_f_state", dict(block_f_state=24)),
                     ("sweep_unroll", dict(sweep_unroll=0)),
                     ("seq_splits", dict(seq_splits=0)),
                     ("chunk_parallel", dict(seq_splits=2, chunk=16,
                                             chunk_parallel=False)),
                     ("kernel_cumsum", dict(kernel_cumsum=True,
                                            chunk_parallel=False,
                                            chunk=16))):
    with pytest.raises(ValueError, match=match):
      channel.channel_gated_linear_attention(
          x, x, x, g, scale=1.0, config=channel.ChannelConfig(**bad))
  with pytest.raises(NotImplementedError, match="power of two"):
    channel.channel_gated_linear_attention(
        x, x, x, g, scale=1.0, config=channel.ChannelConfig(chunk=24))
  with pytest.raises(NotImplementedError, match="per-channel"):
    channel.channel_gated_linear_attention(x, x, x, g[..., 0], scale=1.0)


@pytest.mark.parametrize("name,opts", [
    # Packed sequences (3 segments), GQA 4:2, initial state, odd length.
    ("gqa_state", dict(kv_heads=2, initial_state=True, length=75)),
    # Strong gates, MQA, chunk 64, bf16.
    ("strong_mqa_bf16_c64", dict(kv_heads=1, gate_strength=20.0, length=70,
                                 dtype=BF16, chunk=64)),
    # The separate output kernel and row-split state sweeps.
    ("separate_rows", dict(length=50, separate=True))])
def test_channel_resets_match_scan(name, opts):
  """Resets (segment ids) in the chunk-parallel layout: output, final
  state and every gradient against autodiff of the scan."""
  opts = dict(opts)
  chunk = opts.pop("chunk", 32)
  separate = opts.pop("separate", False)
  case = linear_case(key_for("channel-resets", name), gate="channel",
                     segments=True, **opts)
  if separate:
    cfg = channel.ChannelConfig(separate_output=True, block_f_state=16,
                                block_f=16, block_v=16)
    _direct_matches_scan(name, cfg, b=2, t=opts["length"], n=4, kh=2, f=24,
                         vd=20, strength=5.0, segments=True)
    return
  check_against_scan(case, "pallas", chunk_size=chunk)


@pytest.mark.parametrize("diag", ["factored", "factored_rows"])
def test_channel_factored_diag_resets(diag):
  """Factored diagonal blocks with packed sequences (the scores and dA
  masks at segment boundaries apply to either branch, and to either
  fallback)."""
  cfg = channel.ChannelConfig(diag=diag, block_f=16, block_v=16)
  _direct_matches_scan(f"factored_resets_{diag}", cfg, b=2, t=70, n=4, kh=2,
                       f=24, vd=20, strength=2.5, segments=True)


def test_channel_xla_gate_sums_resets():
  """Gates summed by XLA passes (not the kernels) with packed sequences."""
  cfg = channel.ChannelConfig(kernel_cumsum=False, block_f=16, block_v=16)
  _direct_matches_scan("xla_sums_resets", cfg, b=2, t=70, n=4, kh=2, f=24,
                       vd=20, strength=2.5, segments=True)


@pytest.mark.parametrize("opts", [{}, dict(seq_splits=3)],
                         ids=["fused", "fused_split3"])
def test_channel_batch_one_matches_scan(opts):
  """Batch 1 (heads and batch on one grid axis, kernels._flat_call), the
  fused layout with and without sequence splits: output, final state and
  every gradient against autodiff of the scan."""
  cfg = channel.ChannelConfig(block_f=16, block_v=16, **opts)
  _direct_matches_scan(f"batch-one-{opts}", cfg, b=1, t=100, n=4, kh=2,
                       f=24, vd=20, strength=1.5, segments=True)


@pytest.mark.parametrize("opts", [
    dict(), dict(separate_output=True, block_f_state=16, sweep_unroll=3),
    dict(seq_splits=2, sweep_unroll=1)], ids=["fused", "separate_u3",
                                              "fsplit2_u1"])
def test_channel_early_decay_matches_scan(opts):
  """early_decay: the sweeps load each chunk's decay with its
  state-independent work (unrolled 1, 2 or 3 chunks, with a remainder
  loop). 100 tokens in chunks of 16 (7 chunks), resets: output, final
  state and every gradient against autodiff of the scan."""
  cfg = channel.ChannelConfig(chunk=16, block_f=16, block_v=16,
                              early_decay=True, **opts)
  _direct_matches_scan(f"early-decay-{sorted(opts)}", cfg, b=2, t=100, n=4,
                       kh=2, f=24, vd=20, strength=1.5, segments=True)


def test_channel_config_environment_override(monkeypatch):
  """ATTNJAX_CHANNEL_CONFIG (JSON fields over the defaults) reaches the
  kernels where no config is given: the separate layout's output kernel
  appears, and the forward still matches the scan; a bad field value is
  a ValueError naming it."""
  arrays, _ = linear_case(key_for("channel-env"), length=40, head_dim=16,
                          value_dim=16, gate="channel")
  args = (arrays["query"], arrays["key"], arrays["value"])

  def run(impl):
    return attnjax.linear_attention(*args, gate=arrays["gate"],
                                    implementation=impl)

  def names():
    return set(re.findall(r"linear_scan_channel_\w+",
                          str(jax.make_jaxpr(lambda: run("pallas"))())))

  assert "linear_scan_channel_output" not in names()
  monkeypatch.setenv("ATTNJAX_CHANNEL_CONFIG", '{"separate_output": true, '
                     '"block_f_state": 16, "early_decay": true}')
  assert "linear_scan_channel_output" in names()
  assert_matches(run("pallas"), run("xla"), F32)
  monkeypatch.setenv("ATTNJAX_CHANNEL_CONFIG", '{"sweep_unroll": 0}')
  with pytest.raises(ValueError, match="sweep_unroll"):
    run("pallas")


@pytest.mark.parametrize("separate", [True, False])
def test_channel_split_resets(separate):
  """Sequence splits with packed sequences: a reset zeroes the decay
  products that carry a split's entering state (and gradient) onward;
  joined into the stored states (separate layout) or carried into a
  second sweep (fused layout)."""
  cfg = channel.ChannelConfig(separate_output=separate, block_f_state=16,
                              block_f=16, block_v=16, seq_splits=3)
  _direct_matches_scan(f"split_resets_{separate}", cfg, b=2, t=100, n=4,
                       kh=2, f=24, vd=20, strength=2.0, segments=True)


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("name,dtype,splits,strength,segments", [
    ("f32_split3_resets", F32, 3, 2.0, True),
    ("bf16_split2_strong", BF16, 2, 20.0, False)])
def test_channel_split_forward_only(name, dtype, splits, strength,
                                    segments, separate):
  """The forward alone with sequence splits (no residuals; separate
  layout: the output kernel adds each split's entering state itself
  instead of a pass over the stored states; fused layout: the second
  sweep starts from it): output and final state against the scan, with
  the initial state; the same numbers as the forward under
  differentiation up to rounding."""
  cfg = channel.ChannelConfig(separate_output=separate, block_f_state=16,
                              block_f=16, block_v=16, seq_splits=splits)
  b, t, n, kh, f, vd = 2, 100, 4, 2, 24, 20
  ks = jax.random.split(key_for("split-fwd", name), 6)
  q = jax.random.normal(ks[0], (b, t, n, f)).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, kh, f)) / np.sqrt(f)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, kh, vd)).astype(dtype)
  g = -strength * jax.nn.softplus(jax.random.normal(ks[3], (b, t, n, f))
                                  - 1.0)
  s0 = jax.random.normal(ks[4], (b, n, f, vd))
  seg = resets = None
  if segments:
    seg = testing.random_segment_ids(ks[5], b, t, num_segments=4)
    resets = jnp.concatenate([jnp.zeros((b, 1), bool),
                              seg[:, 1:] != seg[:, :-1]], axis=1)

  def kernel(q, k, v, g, s0):
    return channel.channel_gated_linear_attention(
        q, k, v, g, resets, scale=0.3, initial_state=s0, config=cfg,
        interpret=True)

  out, fin = jax.jit(kernel)(q, k, v, g, s0)
  (out_d, fin_d), _ = jax.vjp(kernel, q, k, v, g, s0)
  ref, ref_fin = attnjax.linear_attention(
      *(x.astype(F32) for x in (q, k, v)), gate=g, scale=0.3,
      initial_state=s0, segment_ids=seg, return_final_state=True,
      implementation="xla")
  assert out.dtype == dtype
  assert_matches(out, ref, dtype, name="out")
  assert_matches(fin, ref_fin, dtype, name="final state")
  assert_matches(out, out_d.astype(F32), dtype, name="out vs vjp forward")
  np.testing.assert_array_equal(np.asarray(fin), np.asarray(fin_d))


def _direct_matches_scan(name, cfg, *, b, t, n, kh, f, vd, strength=1.0,
                         dtype=F32, interpret=True, segments=False):
  """channel_gated_linear_attention with ``cfg``: output, final state and
  the VJP of every input (random cotangents for both outputs) against
  autodiff of the scan on the same rounded values; with ``segments``,
  packed sequences (the kernel gets resets where the scan gets the ids)."""
  ks = jax.random.split(key_for("chunk-par", name, str(dtype)), 7)
  q = jax.random.normal(ks[0], (b, t, n, f))
  k = jax.random.normal(ks[1], (b, t, kh, f)) / np.sqrt(f)
  v = jax.random.normal(ks[2], (b, t, kh, vd))
  q, k, v = (x.astype(dtype).astype(F32) for x in (q, k, v))
  g = -strength * jax.nn.softplus(jax.random.normal(ks[3], (b, t, n, f))
                                  - 1.0)
  s0 = jax.random.normal(ks[4], (b, n, f, vd))
  ct = jax.random.normal(ks[5], (b, t, n, vd)).astype(dtype).astype(F32)
  ct_s = jax.random.normal(ks[6], (b, n, f, vd))
  seg = resets = None
  if segments:
    seg = testing.random_segment_ids(jax.random.fold_in(ks[6], 1), b, t,
                                     num_segments=4)
    resets = jnp.concatenate([jnp.zeros((b, 1), bool),
                              seg[:, 1:] != seg[:, :-1]], axis=1)

  def kernel(q, k, v, g, s0):
    return channel.channel_gated_linear_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), g, resets,
        scale=0.3, initial_state=s0, config=cfg, interpret=interpret)

  def scan(q, k, v, g, s0):
    return attnjax.linear_attention(
        q, k, v, gate=g, scale=0.3, initial_state=s0, segment_ids=seg,
        return_final_state=True, implementation="xla")

  def run(fn):
    (out, fin), pull = jax.vjp(fn, q, k, v, g, s0)
    return out, fin, pull((ct.astype(out.dtype), ct_s))

  out, fin, grads = jax.jit(lambda: run(kernel))()
  ref, ref_fin, ref_grads = jax.jit(lambda: run(scan))()
  assert_matches(out, ref, dtype, name="out")
  assert_matches(fin, ref_fin, dtype, name="final state")
  for gname, a, r in zip(("q", "k", "v", "gate", "state"), grads,
                         ref_grads):
    testing.assert_finite(a, name=f"d{gname}")
    assert_matches(a, r, dtype, grad=True, name=f"d{gname}")


_SEP = dict(separate_output=True, block_f_state=16, block_v=16)
_PAIRS = dict(diag="pairs")


@pytest.mark.parametrize("name,chunk,dtype,kh,strength,opts", [
    # Four sub-chunks, GQA 4:2, F and V padded inside (24 -> 32, 20 -> 32).
    # Elementwise diagonal blocks (diag="pairs").
    ("c64_gqa_pairs", 64, F32, 2, 1.0, _PAIRS),
    # Strong gates (up to ~60 a step), MQA, two sub-chunks.
    ("c32_strong_mqa_pairs", 32, F32, 1, 20.0, _PAIRS),
    # Factored diagonal blocks: weak gates (the matmul branch), strong
    # gates (the elementwise branch), and gates that take both.
    ("c64_gqa_factored", 64, F32, 2, 1.0, dict(diag="factored")),
    ("c32_strong_mqa_factored", 32, F32, 1, 20.0, dict(diag="factored")),
    ("c32_mixed_factored", 32, F32, 2, 2.5, dict(diag="factored")),
    ("c64_bf16_factored", 64, BF16, 2, 1.0, dict(diag="factored")),
    # The same with the elementwise fallback as a loop over key rows
    # (diag="factored_rows"): strong gates (the fallback everywhere),
    # mixed, bf16 strong with four sub-chunks.
    ("c32_strong_mqa_factored_rows", 32, F32, 1, 20.0,
     dict(diag="factored_rows")),
    ("c32_mixed_factored_rows", 32, F32, 2, 2.5, dict(diag="factored_rows")),
    ("c64_bf16_strong_factored_rows", 64, BF16, 2, 20.0,
     dict(diag="factored_rows")),
    ("c64_bf16_pairs", 64, BF16, 2, 1.0, _PAIRS),
    # One sub-chunk per chunk (no off-diagonal blocks).
    ("c16_gqa", 16, F32, 2, 1.0, {}),
    # The output from stored states; state sweeps split into 2 row blocks.
    ("c32_separate_rows_gqa", 32, F32, 2, 1.0, _SEP),
    ("c32_separate_rows_bf16_mqa", 32, BF16, 1, 20.0, _SEP),
    # The state-gradient sweep split into row blocks, the fused forward.
    ("c32_rows_only", 32, F32, 2, 1.0, dict(block_f_state=16)),
    # Sweeps with several chunks per loop iteration (3 chunks at 2 a
    # step; 5 chunks at 4 a step): the loop and its remainder.
    ("c32_unroll2_separate", 32, F32, 2, 1.0, dict(sweep_unroll=2, **_SEP)),
    ("c16_unroll4_bf16_mqa", 16, BF16, 1, 20.0, dict(sweep_unroll=4)),
    ("c16_unroll4_separate", 16, F32, 2, 1.0, dict(sweep_unroll=4, **_SEP)),
    # The state sweeps on sequence splits (5 chunks padded to 6 in 3
    # splits; 3 chunks padded to 4 in 2), with the initial state.
    ("c16_split3_separate", 16, F32, 2, 1.0,
     dict(seq_splits=3, sweep_unroll=2, **_SEP)),
    ("c32_split2_bf16_strong_mqa", 32, BF16, 1, 20.0,
     dict(seq_splits=2, **_SEP)),
    # The fused sweep on sequence splits: a states-only sweep of each
    # split for its end, the carries, then the fused sweep from them (and
    # the state-gradient sweep the same way backwards).
    ("c16_split3_fused", 16, F32, 2, 1.0,
     dict(seq_splits=3, sweep_unroll=2)),
    ("c32_split2_bf16_strong_mqa_fused", 32, BF16, 1, 20.0,
     dict(seq_splits=2, block_f_state=16)),
    # The gates summed within sub-chunks by XLA passes (kernel_cumsum=False;
    # the cases above sum them in the kernels): factored with both
    # branches (mixed gates), pairs with strong gates in bf16, four
    # sub-chunks with the separate layout on splits.
    ("c32_xla_sums_mixed_factored", 32, F32, 2, 2.5,
     dict(kernel_cumsum=False)),
    ("c32_xla_sums_bf16_strong_pairs", 32, BF16, 1, 20.0,
     dict(kernel_cumsum=False, **_PAIRS)),
    ("c64_xla_sums_split2_separate", 64, F32, 2, 1.0,
     dict(kernel_cumsum=False, seq_splits=2, **_SEP)),
    # The sweep layout.
    ("sweep_c16_strong_gqa", 16, F32, 2, 20.0, dict(chunk_parallel=False)),
    ("sweep_c16_bf16_mqa", 16, BF16, 1, 1.0, dict(chunk_parallel=False))])
def test_channel_direct_matches_scan(name, chunk, dtype, kh, strength, opts):
  """Either layout called directly. Chunk-parallel: the scores kernel
  (secondary chunking), the sweeps with stored states (or the states
  sweep and the output kernel), the state-gradient sweep and the
  per-chunk gradient kernels; odd length (75: a partial last chunk)."""
  cfg = channel.ChannelConfig(**{"chunk": chunk, "block_f": 16,
                                 "block_v": 32, **opts})
  _direct_matches_scan(name, cfg, b=2, t=75, n=4, kh=kh, f=24, vd=20,
                       strength=strength, dtype=dtype)


_SWEEP_KERNELS = ("fwd", "dq", "dk", "dv")
_PARALLEL_KERNELS = ("scores", "sweep_states", "dstate", "dadv", "grads")


_SEPARATE_KERNELS = ("scores", "states", "output", "dstate", "dadv", "grads")
# The fused layout on sequence splits: each sweep twice (ends, then stores).
_FUSED_SPLIT_KERNELS = ("scores", "states_ends", "sweep_states",
                        "dstate_ends", "dstate", "dadv", "grads")


@pytest.mark.parametrize("dtype,h,layout,chunk", [
    (BF16, 128, "sweep", 16), (F32, 64, "sweep", 16), (BF16, 256, "sweep", 16),
    (BF16, 128, "parallel", 32), (BF16, 256, "parallel", 32),
    (F32, 64, "parallel", 64), (BF16, 128, "separate", 32),
    (BF16, 128, "resets", 32), (F32, 64, "resets", 64),
    (BF16, 128, "factored", 32), (BF16, 128, "unroll3", 32),
    (BF16, 128, "split2", 32), (BF16, 128, "fused_split2", 32),
    (BF16, 128, "xla_sums", 32)])
def test_channel_lowers_for_h100(dtype, h, layout, chunk):
  """Forward and backward lower for sm_90a, in either layout (the sweep
  one at chunk 16; the chunk-parallel default at 32, and at 64; with the
  output from stored states and the state sweeps split by rows; with
  resets; with 3 chunks per sweep iteration, 4 chunks: a remainder; with
  the state sweeps on 2 sequence splits, in either layout; with the gates
  summed by XLA passes, not the kernels)."""
  b, t, n, kh = 1, 100, 4, 2
  sd = jax.ShapeDtypeStruct
  args = (sd((b, t, n, h), dtype), sd((b, t, kh, h), dtype),
          sd((b, t, kh, h), dtype), sd((b, t, n, h), F32),
          sd((b, n, h, h), F32), sd((b, t), jnp.bool_))
  cfg = channel.ChannelConfig(chunk=chunk, chunk_parallel=layout != "sweep",
                              block_f=32 if dtype == BF16 else 16,
                              separate_output=layout in ("separate",
                                                         "unroll3", "split2"),
                              seq_splits=2 if "split2" in layout else 1,
                              block_f_state=64 if layout == "separate"
                              else None,
                              diag="factored" if layout == "factored"
                              else "pairs",
                              kernel_cumsum=(False if layout == "xla_sums"
                                             else None),
                              **({"sweep_unroll": 3} if layout == "unroll3"
                                 else {}))
  with_resets = layout == "resets"

  def grad(q, k, v, g, s0, resets):
    def f(q, k, v, g, s0):
      o, st = channel.channel_gated_linear_attention(
          q, k, v, g, resets if with_resets else None, scale=0.1,
          initial_state=s0, config=cfg, interpret=False)
      return jnp.sum(o.astype(F32)) + jnp.sum(st)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)

  text = _export_for_h100(grad, *args).mlir_module()
  names = {"sweep": _SWEEP_KERNELS, "parallel": _PARALLEL_KERNELS,
           "resets": _PARALLEL_KERNELS, "factored": _PARALLEL_KERNELS,
           "xla_sums": _PARALLEL_KERNELS,
           "separate": _SEPARATE_KERNELS, "unroll3": _SEPARATE_KERNELS,
           "split2": _SEPARATE_KERNELS,
           "fused_split2": _FUSED_SPLIT_KERNELS}[layout]
  for name in names:
    assert f"linear_scan_channel_{name}" in text, name
  assert text.count("__gpu$xla.gpu.triton") == len(names)


@pytest.mark.parametrize("separate", [True, False])
def test_channel_split_forward_lowers_for_h100(separate):
  """The forward alone with sequence splits lowers for sm_90a as three
  kernels (separate layout: scores, states, the output kernel adding the
  carries; fused: scores, the split ends, the fused sweep from the
  carries), with resets and an initial state."""
  b, t, n, kh, h = 1, 300, 4, 2, 128
  sd = jax.ShapeDtypeStruct
  cfg = channel.ChannelConfig(separate_output=separate, block_f_state=64,
                              sweep_unroll=4, seq_splits=4)
  rs = jnp.zeros((b, t), bool).at[:, 150].set(True)

  def fwd(q, k, v, g, s0):
    return channel.channel_gated_linear_attention(
        q, k, v, g, rs, scale=0.1, initial_state=s0, config=cfg,
        interpret=False)

  text = _export_for_h100(
      fwd, sd((b, t, n, h), BF16), sd((b, t, kh, h), BF16),
      sd((b, t, kh, h), BF16), sd((b, t, n, h), F32),
      sd((b, n, h, h), F32)).mlir_module()
  names = (("scores", "states", "output") if separate else
           ("scores", "states_ends", "sweep"))
  for name in names:
    assert f"linear_scan_channel_{name}" in text, name
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("kernel_cumsum", [None, False])
def test_channel_default_forward_has_no_xla_gate_sums(kernel_cumsum):
  """The default (kernel_cumsum=None) forward is its kernels plus pads and
  slices: no XLA pass over the float32 gates (on the H200 that pass and
  its re-read cost 1.2 ms of 2.6 at T = 4k, run38); False keeps it."""
  b, t, n, kh, h = 2, 300, 4, 2, 128
  sd = jax.ShapeDtypeStruct
  cfg = channel.ChannelConfig(kernel_cumsum=kernel_cumsum)

  def fwd(q, k, v, g):
    return channel.channel_gated_linear_attention(
        q, k, v, g, scale=0.1, config=cfg, interpret=False)[0]

  def grad(q, k, v, g):
    return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(F32)),
                    argnums=(0, 1, 2, 3))(q, k, v, g)

  args = (sd((b, t, n, h), BF16), sd((b, t, kh, h), BF16),
          sd((b, t, kh, h), BF16), sd((b, t, n, h), F32))
  text = _export_for_h100(fwd, *args).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 2  # scores, sweep
  sums = lambda text: re.search(r"func\.func private @cumsum", text)  # noqa: E731
  assert (sums(text) is None) is (kernel_cumsum is None)
  # The backward's reverse sums of the gate gradient too.
  assert (sums(_export_for_h100(grad, *args).mlir_module()) is None) is (
      kernel_cumsum is None)
  if kernel_cumsum is None:
    ops = set(re.findall(r"stablehlo\.(\w+)", text))
    assert ops <= {"constant", "convert", "custom_call", "mesh", "pad",
                   "slice"}, ops


# ----------------------------------------------------------------------------
# On a GPU: the compiled Triton kernels.


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_CASES))
def test_gpu_channel_matches_scan_small(name):
  case = linear_case(key_for("gpu-channel", name), **_CASES[name])
  check_against_scan(case, "pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_channel_matches_scan_h128(dtype):
  """Production head size (H = Hv = 128), GQA 8:2, gates + fixed decay,
  initial state, T = 1000."""
  case = linear_case(key_for("gpu-channel-h128", str(dtype)), batch=2,
                     length=1000, heads=8, kv_heads=2, head_dim=128,
                     value_dim=128, gate="channel", log_decay=True,
                     initial_state=True, dtype=dtype)
  check_against_scan(case, "pallas")


@pytest.mark.gpu
def test_gpu_channel_long_sequence_deterministic():
  """T = 16384 with strong and weak gates: forward and final state vs the
  scan, bit-identical repeats, no NaN in the gradients."""
  b, t, n, h = 1, 16384, 2, 64
  ks = jax.random.split(key_for("gpu-channel-long"), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), BF16)
  k = (jax.random.normal(ks[1], (b, t, n, h)) / np.sqrt(h)).astype(BF16)
  v = jax.random.normal(ks[2], (b, t, n, h), BF16)
  g = -jnp.array([3.0, 1e-3])[:, None] * jax.random.uniform(
      ks[3], (b, t, n, h))
  f = jax.jit(lambda q, k, v, g: attnjax.linear_attention(
      q, k, v, gate=g, implementation="pallas", return_final_state=True))
  out, state = f(q, k, v, g)
  out2, state2 = f(q, k, v, g)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(out2, np.float32))
  np.testing.assert_array_equal(np.asarray(state), np.asarray(state2))
  ref, ref_state = jax.jit(lambda q, k, v, g: attnjax.linear_attention(
      q, k, v, gate=g, implementation="xla", return_final_state=True))(
          q, k, v, g)
  assert_matches(out, ref, BF16, name="out", axis=2)
  assert_matches(state, ref_state, BF16, name="final_state", axis=1)
  grads = jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(
      f(q, k, v, g)[0].astype(F32)), argnums=(0, 1, 2, 3)))(q, k, v, g)
  for x in grads:
    assert np.isfinite(np.asarray(x, np.float32)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{}, dict(seq_splits=4),
                                  dict(separate_output=True, block_f_state=64,
                                       sweep_unroll=4, seq_splits=4)],
                         ids=["fused", "fused_split4", "separate_split4"])
def test_gpu_channel_batch_one(opts):
  """Batch 1 compiled (heads and batch on one grid axis) at H = 128, bf16,
  in the fused layout, on fused splits and in the batch-1 auto layout's
  form: output, final state and every gradient against the scan."""
  cfg = channel.ChannelConfig(block_f=32, block_v=64, **opts)
  _direct_matches_scan(f"gpu-batch-one-{opts}", cfg, b=1, t=300, n=8, kh=2,
                       f=128, vd=128, dtype=BF16, interpret=False,
                       segments=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("layout", ["sweep16", "parallel32", "parallel64",
                                    "separate32", "resets32", "factored32",
                                    "unroll32", "split32", "fsplit32",
                                    "xla_sums32", "rows32", "early32",
                                    "early_split32"])
def test_gpu_channel_direct(dtype, layout):
  """Each layout's kernels compiled at the benchmark's head size
  (H = Hv = 128), GQA 8:2, T = 300, against the scan."""
  opts = {"sweep16": dict(chunk=16, chunk_parallel=False),
          "parallel32": dict(chunk=32, diag="pairs"),
          "parallel64": dict(chunk=64, diag="pairs"),
          "separate32": dict(chunk=32, separate_output=True,
                             block_f_state=64),
          "resets32": dict(chunk=32),
          "factored32": dict(chunk=32, diag="factored"),
          "unroll32": dict(chunk=32, separate_output=True,
                           block_f_state=64, sweep_unroll=2),
          "split32": dict(chunk=32, separate_output=True, block_f_state=64,
                          sweep_unroll=4, seq_splits=4),
          "fsplit32": dict(chunk=32, sweep_unroll=2, seq_splits=4),
          "rows32": dict(chunk=32, diag="factored_rows"),
          "xla_sums32": dict(chunk=32, kernel_cumsum=False),
          "early32": dict(chunk=32, early_decay=True),
          "early_split32": dict(chunk=32, separate_output=True,
                                block_f_state=64, sweep_unroll=4,
                                seq_splits=4, early_decay=True)}[layout]
  cfg = channel.ChannelConfig(block_f=32 if dtype == BF16 else 16,
                              block_v=64 if dtype == BF16 else 32, **opts)
  # rows32: gates strong enough that some diagonal blocks take the
  # fallback (the loop over key rows) and some the matmul.
  _direct_matches_scan(f"gpu-{layout}", cfg, b=2, t=300, n=8, kh=2, f=128,
                       vd=128, dtype=dtype, interpret=False,
                       strength=2.5 if layout == "rows32" else 1.0,
                       segments=layout in ("resets32", "xla_sums32",
                                           "fsplit32", "early32"))
