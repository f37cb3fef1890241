"""The Mosaic GPU kernels run on CPU in Pallas' GPU interpreter.

``tests/mosaic_interpret.py`` adds what the interpreter lacks
(see there). Each case runs the real kernels (forward, and dK/dV + dQ where
gradients are checked) on small shapes and compares them with autodiff of the
float32 reference through the shared suite's ``check_against_reference``.
Persistent grids are shrunk (``num_ctas``) so that every CTA walks several
work items, as on a GPU with many more tiles than SMs. The shim models the
named barriers (the forward's ping-pong, the fused backward's pair
barrier), so a protocol bug deadlocks and the watchdog fails the test. The
interpreter runs matmuls synchronously, so timing hazards stay the GPU
tests' business (``tests/test_pallas_mosaic_gpu.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mosaic_interpret
from attnjax import masks, testing
from attnjax.softmax import pallas_mosaic
from pallas_kernels.flash import mosaic_gpu as fwd_lib
from pallas_kernels.flash import mosaic_gpu_bwd as mosaic_bwd
from softmax_suite import BF16, F16, _key, check_against_reference

_WHY_NOT = mosaic_interpret.available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None,
                                reason=str(_WHY_NOT))


def _impl(fwd_config=None, bwd_config=None):
  def impl(p):
    # need_backward keeps the custom VJP: check_against_reference linearises
    # even when it compares the forward only (then no backward kernel runs).
    return pallas_mosaic.mosaic_attention(p, fwd_config=fwd_config,
                                          bwd_config=bwd_config)
  return impl


def _inputs(name, *, b=2, t=300, s=None, n=2, kh=1, h=64, dtype=BF16):
  return testing.attention_inputs(_key("interp", name), batch=b, q_len=t,
                                  kv_len=s, num_heads=n, num_kv_heads=kh,
                                  head_dim=h, dtype=dtype)


def _check(name, *, fwd_config=None, bwd_config=None, grads=True, dtype=BF16,
           shape=None, **kw):
  inp = _inputs(name, dtype=dtype, **(shape or {}))
  with mosaic_interpret.interpret_mode():
    return check_against_reference(
        _impl(fwd_config, bwd_config), inp, dtype=dtype,
        grads=grads, **kw)


def _fwd_cfg(h, **kw):
  base = fwd_lib.default_fwd_config(h)
  fields = {f: getattr(base, f) for f in ("block_q", "block_kv", "num_stages")}
  fields.update(kw)
  return fwd_lib.FwdConfig(**fields)


def test_segments_and_causal_persistent():
  # The H100 failure (run2-diag-features.log): segment ids with is_causal.
  # Four key blocks per tile (more than the 3-stage ring) and five CTAs
  # walking 20 items.
  seg = testing.random_segment_ids(_key("sc"), 2, 520, 3)
  _check("seg_causal", shape=dict(t=520, n=4, kh=2), grads=False,
         fwd_config=_fwd_cfg(64, num_ctas=5), is_causal=True,
         arrays={"segment_ids": seg})


def test_segments_and_window():
  seg = testing.random_segment_ids(_key("sw"), 2, 470, 4)
  _check("seg_window", shape=dict(t=470), grads=False,
         fwd_config=_fwd_cfg(64, num_ctas=4), local_window_size=(90, 20),
         arrays={"segment_ids": seg})


def test_segments_and_lengths_h128():
  seg = testing.random_segment_ids(_key("sl"), 2, 470, 4)
  out, _ = _check("seg_len", shape=dict(t=470, h=128), grads=False,
                  fwd_config=_fwd_cfg(128, num_ctas=4),
                  arrays={"segment_ids": seg,
                          "kv_lengths": jnp.array([300, 470], jnp.int32),
                          "q_lengths": jnp.array([470, 201], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(out[1, 201:], np.float32), 0.0)


def test_head_dim_256_forward():
  # Forward only, straight through the kernel wrapper (no custom VJP).
  from attnjax.softmax import xla  # pylint: disable=g-import-not-at-top
  from attnjax.softmax.problem import make_problem  # pylint: disable=g-import-not-at-top
  inp = _inputs("h256", t=300, h=256)
  cfg = _fwd_cfg(256, num_ctas=3)
  p, _ = make_problem(inp.q, inp.k, inp.v, is_causal=True)
  with mosaic_interpret.interpret_mode():
    out, lse = pallas_mosaic.mosaic_attention(p, fwd_config=cfg,
                                              need_backward=False)
    out, lse = jax.block_until_ready((out, lse))
  up = lambda x: x.astype(jnp.float32)
  p32, _ = make_problem(up(inp.q), up(inp.k), up(inp.v), is_causal=True)
  out_r, lse_r = xla.xla_attention(p32)
  testing.assert_close(out, out_r, BF16, name="out")
  testing.assert_close(lse, lse_r, BF16, name="lse")


def test_gradients_gqa_causal_h128():
  _check("g128", shape=dict(t=130, n=4, kh=2, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3), is_causal=True)


def test_gradients_segments_causal():
  seg = testing.random_segment_ids(_key("gsc"), 2, 200, 3)
  _check("gseg", shape=dict(t=200), is_causal=True,
         arrays={"segment_ids": seg})


@pytest.mark.long
@pytest.mark.parametrize("kw", [
    dict(local_window_size=(50, 30)),
    dict(is_causal=True, local_window_size=(70, 0)),
    dict(mask=masks.Causal(offset=80)),
    dict(mask=masks.ChunkedCausal(100)),
    dict(mask=(masks.LocalWindow(60, 0) | masks.Prefix(3)) & masks.Causal()),
], ids=["window", "causal_window", "offset", "chunked", "window_prefix"])
def test_static_masks(kw):
  _check("static", shape=dict(t=450, s=530), grads=False,
         fwd_config=_fwd_cfg(64, num_ctas=3), **kw)


@pytest.mark.long
@pytest.mark.parametrize("qbufs,persistent", [(1, True), (2, False)])
def test_q_buffers_and_grid(qbufs, persistent):
  _check("qb", shape=dict(t=300, s=410, n=4, kh=2, h=128), grads=False,
         fwd_config=_fwd_cfg(128, q_buffers=qbufs, persistent=persistent,
                             num_ctas=3), is_causal=True)


def test_fully_masked_rows_and_zero_length():
  qs = jnp.zeros((2, 240), jnp.int32).at[0, :100].set(7)
  out, lse = _check("empty", shape=dict(t=240),
                    fwd_config=_fwd_cfg(64, num_ctas=3),
                    arrays={"segment_ids": (qs, jnp.zeros((2, 240),
                                                          jnp.int32)),
                            "kv_lengths": jnp.array([240, 0], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(out[0, :100], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
  assert np.all(np.isneginf(np.asarray(lse[1])))


@pytest.mark.long
def test_everything_at_once():
  seg = testing.random_segment_ids(_key("all"), 2, 470, 4)
  _check("all", shape=dict(t=470, n=4, kh=2, h=128), dtype=F16,
         fwd_config=_fwd_cfg(128, num_ctas=5),
         sinks=jax.random.normal(_key("allk"), (4,)), logits_soft_cap=5.0,
         is_causal=True, local_window_size=(200, 0),
         arrays={"segment_ids": seg,
                 "kv_lengths": jnp.array([470, 400], jnp.int32)})


def test_gradients_key_lengths_cut_a_key_tile():
  # No causal mask or segment ids: the query blocks of a key tile that the
  # key length cuts through are otherwise all "unmasked" ones (the H100
  # failure of test_seq_lengths: dK/dV of keys past the length were not 0).
  out, _ = _check("glen", shape=dict(t=330, s=400),
                  arrays={"q_lengths": jnp.array([330, 200], jnp.int32),
                          "kv_lengths": jnp.array([170, 400], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(out[1, 200:], np.float32), 0.0)


def test_gradients_head_dim_256():
  # dK/dV with the head dim split over the two consumers, dQ on 32-key
  # blocks.
  _check("g256", shape=dict(t=130, s=150, n=2, kh=1, h=256), is_causal=True)


@pytest.mark.long
def test_gradients_head_dim_256_everything():
  seg = testing.random_segment_ids(_key("g256all"), 2, 300, 3)
  _check("g256all", shape=dict(t=300, n=4, kh=2, h=256),
         sinks=jax.random.normal(_key("g256k"), (4,)), logits_soft_cap=5.0,
         is_causal=True, local_window_size=(150, 0),
         arrays={"segment_ids": seg,
                 "kv_lengths": jnp.array([300, 250], jnp.int32)})


def _fused(h):
  return mosaic_bwd.BwdConfig(fused_dq=True) if h > 64 else (
      mosaic_bwd.BwdConfig(block_q_dkv=64, fused_dq=True))


@pytest.mark.parametrize("h", [64, 128])
def test_gradients_fused_dq_gqa_causal(h):
  # The fused backward (the H = 128 default without XLA's determinism
  # flags): dS^T exchanged through SMEM behind the consumers' named
  # barrier, dQ TMA-reduce-added into the float32 accumulator. H = 128
  # splits dQ's columns over the two consumers, H = 64 alternates whole
  # blocks. Causal GQA with 3 query blocks per key tile on a ragged T.
  _check(f"fused{h}", shape=dict(t=170, n=4, kh=2, h=h),
         fwd_config=_fwd_cfg(h, num_ctas=3), bwd_config=_fused(h),
         is_causal=True)


@pytest.mark.parametrize("h,layout", [
    # (The suite's time: one opt-in layout in the default run, "nct" at
    # H = 128, two column blocks; the others under -m long.)
    pytest.param(128, "nth", marks=pytest.mark.long), (128, "nct"),
    pytest.param(64, "nth", marks=pytest.mark.long),
    # At H = 64 "nct" has one column block: "nth" with a unit axis.
    pytest.param(64, "nct", marks=pytest.mark.long)])
def test_gradients_fused_dq_layouts(h, layout):
  # BwdConfig(dq_layout): the float32 dQ accumulator head-major ("nth") or
  # in contiguous per-consumer column blocks ("nct", H = 128: two blocks of
  # 64 columns; H = 64: one), read back into [B, T, N, H] after the kernel.
  # Causal GQA on a ragged T with segment ids.
  seg = testing.random_segment_ids(_key(f"lay{h}{layout}"), 2, 170, 2)
  cfg = dataclasses.replace(_fused(h), dq_layout=layout)
  _check(f"fused{h}{layout}", shape=dict(t=170, n=4, kh=2, h=h),
         fwd_config=_fwd_cfg(h, num_ctas=3), bwd_config=cfg,
         is_causal=True, arrays={"segment_ids": seg})


def test_gradients_fused_dq_evict_last():
  # BwdConfig(dq_evict_last=True) emits its dQ reduce-add through inline
  # Mosaic GPU, which the interpreter skips: under the interpreter the kernel
  # must take the plain reduce-add (else dQ stays zero). GQA, causal, ragged.
  cfg = dataclasses.replace(_fused(128), dq_evict_last=True)
  _check("fusedev", shape=dict(t=170, n=4, kh=2, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3), bwd_config=cfg,
         is_causal=True)


def test_gradients_fused_dq_prefetch():
  # BwdConfig(dq_prefetch): the producer prefetches the dQ rows of a later
  # step into L2. The prefetch itself is a no-op in the interpreter (and
  # cannot change results on the GPU); this checks that the producer's
  # extra work leaves its rings' barrier phases and the dQ indexing (shared
  # with the reduce-add) intact. Causal GQA on a ragged T, column blocks.
  cfg = dataclasses.replace(_fused(128), dq_prefetch=2, dq_layout="nct")
  _check("fusedpf", shape=dict(t=170, n=4, kh=2, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3), bwd_config=cfg,
         is_causal=True)


@pytest.mark.parametrize("kh,group", [(2, 1), (1, 1)])
def test_gradients_fused_dq_head_group(kh, group):
  # BwdConfig(dq_head_group): one launch per group of (batch, K/V head)
  # pairs, each reduce-adding into its own zeroed accumulator, converted
  # into its heads' dQ after the launch; dK, dV written in place. B = 2:
  # K = 2 gives four launches of one K/V head within a batch entry, K = 1
  # (GQA 4:1) two launches of a whole batch entry. Causal, ragged T, with
  # segment ids.
  seg = testing.random_segment_ids(_key(f"hg{kh}"), 2, 170, 2)
  cfg = dataclasses.replace(_fused(128), dq_head_group=group)
  _check(f"fusedhg{kh}", shape=dict(t=170, n=4, kh=kh, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3), bwd_config=cfg,
         is_causal=True, arrays={"segment_ids": seg})


@pytest.mark.long  # a timing diagnostic's indexing (mosaic_check "fusedsl")
def test_fused_dq_slots_diagnostic_indexing(monkeypatch):
  # _FUSED_DROP "slots" sends head hh of batch bb to accumulator head
  # (bb * N + hh) mod 8 of batch 0: with B = 1 and N <= 8 that is hh
  # itself, so dQ must still be right (any other B is wrong by design).
  monkeypatch.setattr(mosaic_bwd, "_FUSED_DROP", frozenset({"slots"}))
  _check("slots", shape=dict(b=1, t=170, n=4, kh=2, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3), bwd_config=_fused(128),
         is_causal=True)


@pytest.mark.parametrize("h,stages", [
    (64, 2), pytest.param(128, 3, marks=pytest.mark.long)])
def test_gradients_fused_dq_early_release(h, stages):
  # BwdConfig(early_release=True): a consumer frees the step's Q and dO
  # slots right after its dQ product (H = 64: the consumer whose turn it
  # is not at the end of the step), before the dQ store and reduce-add;
  # with one dS^T buffer (at H = 128 and a third Q/dO stage).
  # The interpreter checks the slots' barrier phases; a release before the
  # reads would fail on the GPU only (the interpreter's matmuls are
  # synchronous). With segment ids, causal GQA.
  seg = testing.random_segment_ids(_key(f"early{h}"), 2, 170, 2)
  cfg = dataclasses.replace(_fused(h), early_release=True, num_stages=stages,
                            ds_buffers=1)
  _check(f"fusedel{h}", shape=dict(t=170, n=4, kh=2, h=h),
         fwd_config=_fwd_cfg(h, num_ctas=3), bwd_config=cfg,
         is_causal=True, arrays={"segment_ids": seg})


@pytest.mark.parametrize("h,stages", [
    (128, 3),
    # H = 64 runs with early_release in the default run (above).
    pytest.param(64, 2, marks=pytest.mark.long)])
def test_gradients_fused_dq_one_ds_buffer(h, stages):
  # BwdConfig(ds_buffers=1): one dS^T buffer, the consumers joined a second
  # time per step before it is overwritten (H = 64: one consumer's dQ
  # product reads both halves each step, alternating), and at H = 128 the
  # freed SMEM spent on a third Q/dO stage. Causal GQA, ragged T.
  cfg = dataclasses.replace(_fused(h), ds_buffers=1, num_stages=stages)
  _check(f"fused1ds{h}", shape=dict(t=170, n=4, kh=2, h=h),
         fwd_config=_fwd_cfg(h, num_ctas=3), bwd_config=cfg,
         is_causal=True)


# stagger_q is an opt-in diagnostic (run44: no faster); its cases run with
# `pytest -m long` (CI's suite stays under 20 minutes; its lowering test,
# test_lowers_staggered_fused_backward, runs in CI).
@pytest.mark.parametrize("t,kw", [
    pytest.param(384, dict(), marks=pytest.mark.long),
    pytest.param(430, dict(is_causal=True), marks=pytest.mark.long)],
    ids=["full", "causal"])
def test_gradients_fused_dq_staggered(t, kw):
  # BwdConfig(stagger_q=True): each key tile walks its unmasked query
  # blocks from an offset of its own (the producer's step_coords, the
  # consumers' loop wrapping around). Full GQA on whole tiles (3 key
  # tiles, offsets 0, 1, 2 of 6 query blocks; no masked loop compiled),
  # and causal, whose key tiles start with masked diagonal blocks before
  # the unmasked ones that are rotated (a rotation over the masked blocks
  # too fails the causal case).
  _check("fusedst", shape=dict(t=t, n=4, kh=2, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3),
         bwd_config=mosaic_bwd.BwdConfig(fused_dq=True, stagger_q=True),
         **kw)


@pytest.mark.parametrize("fused", [False, True], ids=["two", "fused"])
@pytest.mark.parametrize("lengths", [False, True], ids=["", "lengths"])
def test_gradients_full_whole_tiles(fused, lengths):
  # Full attention on whole key tiles: without segments or lengths no
  # block needs the element mask, so the backward kernels compile no
  # masked loop (the ragged cases keep them for the padded key block).
  # Key lengths that cut a tile bring them back at run time: dK/dV masks
  # the whole tile, dQ the blocks from the cut on.
  arrays = {"kv_lengths": jnp.array([256, 150], jnp.int32)} if lengths else {}
  _check(f"whole{fused}{lengths}", shape=dict(t=256, n=4, kh=2, h=128),
         fwd_config=_fwd_cfg(128, num_ctas=3),
         bwd_config=mosaic_bwd.BwdConfig(fused_dq=fused), arrays=arrays)


_PERSISTENT_DKV = {
    # Causal GQA at H = 128 with key lengths: items of unequal work, some
    # empty (key tiles past a length), every CTA walking several.
    "causal_gqa_lengths": dict(
        shape=dict(t=330, n=4, kh=2, h=128), is_causal=True,
        arrays={"kv_lengths": jnp.array([330, 140], jnp.int32)}),
    # H = 64 MHA with segment ids and a window: masked steps before and
    # after the unmasked ones, items of one head back to back.
    "segments_window": dict(shape=dict(t=300, n=2, kh=2, h=64),
                            local_window_size=(90, 40), segments=True),
    # Full attention on whole tiles: no masked loop at all.
    "full_whole": dict(shape=dict(t=256, n=2, kh=1, h=128)),
    # H = 256: the split-head dK/dV kernel, each consumer reloading its
    # halves of K and V (MHA: causal items of odd step counts, so a ring
    # slot off by the earlier items' steps shows).
    "h256_causal_lengths": dict(
        shape=dict(t=200, n=2, kh=2, h=256), is_causal=True,
        arrays={"kv_lengths": jnp.array([200, 70], jnp.int32)}),
    # lpt_schedule: the items heaviest first over all heads, so a CTA's
    # consecutive items belong to different heads and batches.
    "causal_gqa_lpt": dict(
        shape=dict(t=330, n=4, kh=2, h=128), is_causal=True, lpt=True,
        arrays={"kv_lengths": jnp.array([330, 140], jnp.int32)}),
}


# lpt_schedule is opt-in (run103); its case runs with `pytest -m long`
# (test_lpt_work_table checks its work table in CI).
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.long) if c.endswith("_lpt") else c
    for c in _PERSISTENT_DKV])
def test_gradients_persistent_dkv(case):
  # BwdConfig(persistent_dkv, persistent_dq): 3 CTAs of each backward
  # kernel walk every item (dK/dV: (batch, K/V head, key tile); dQ:
  # (batch, head, query tile)), one ring across them; the consumers reload
  # their resident tiles into the buffers that the previous item's results
  # left through.
  kw = dict(_PERSISTENT_DKV[case])
  if kw.pop("segments", False):
    kw["arrays"] = {"segment_ids": testing.random_segment_ids(
        _key("pdkvseg"), 2, kw["shape"]["t"], 3)}
  h = kw["shape"]["h"]
  cfg = mosaic_bwd.default_bwd_config(h)
  cfg = dataclasses.replace(cfg, fused_dq=False, dq_head_group=None,
                            persistent_dkv=True, persistent_dq=True,
                            num_ctas=3, lpt_schedule=kw.pop("lpt", False))
  _check(f"pdkv{case}", bwd_config=cfg, **kw)


def test_persistent_dkv_work_table():
  # Every (batch, K/V head, key tile) item exactly once, counts in row 0,
  # the heaviest causal tiles first, the CTAs' loads within one item's cost.
  nkt, b, kh = 5, 2, 3
  lo = np.arange(nkt, dtype=np.int32)
  hi = np.full((nkt,), 10, np.int32)
  rng = np.stack([lo, lo, hi, hi])
  table = np.asarray(mosaic_bwd._work_table(rng, b, kh, kh, 4))
  counts = table[:, 0, 0]
  items = [tuple(table[c, 1 + i, :3]) for c in range(4)
           for i in range(counts[c])]
  assert sorted(items) == sorted(
      (bb, hh, kt) for bb in range(b) for hh in range(kh)
      for kt in range(nkt))
  for c in range(4):
    kts = table[c, 1:1 + counts[c], 2]
    np.testing.assert_array_equal(table[c, 1:1 + counts[c], 3], lo[kts])
    np.testing.assert_array_equal(table[c, 1:1 + counts[c], 6], hi[kts])
  loads = [sum(10 - kt + 2 for kt in table[c, 1:1 + counts[c], 2])
           for c in range(4)]
  assert max(loads) - min(loads) <= 12


def _makespan(table, cost):
  counts = table[:, 0, 0]
  return max(sum(cost[kt] for kt in table[c, 1:1 + counts[c], 2])
             for c in range(table.shape[0]))


def test_lpt_work_table():
  # lpt_schedule: every item exactly once, handed out heaviest first over
  # all heads; for causal GQA 4:1 at T = 4k (32 key tiles of 128 keys,
  # 64-row query blocks, B = 4, 4 K/V heads, 132 CTAs) the longest CTA's
  # work is within 2% of the bound where head by head it is 27% over.
  nkt, b, kh, ctas = 32, 4, 4, 132
  lo = 2 * np.arange(nkt, dtype=np.int32)
  hi = np.full((nkt,), 64, np.int32)
  rng = np.stack([lo, lo, hi, hi])
  cost = hi - lo + 2
  head = np.asarray(mosaic_bwd._work_table(rng, b, kh, kh, ctas))
  lpt = np.asarray(mosaic_bwd._work_table(rng, b, kh, kh, ctas, lpt=True))
  items = lambda t: sorted(tuple(t[c, 1 + i, :3]) for c in range(ctas)
                           for i in range(t[c, 0, 0]))
  assert items(lpt) == items(head) and len(items(lpt)) == b * kh * nkt
  bound = b * kh * cost.sum() / ctas
  assert _makespan(lpt, cost) <= 1.02 * bound
  assert _makespan(head, cost) >= 1.25 * bound
  # Each CTA's items heaviest first.
  for c in range(ctas):
    w = cost[lpt[c, 1:1 + lpt[c, 0, 0], 2]]
    assert np.all(np.diff(w) <= 0), w
  with pytest.raises(ValueError, match="lpt_schedule"):
    mosaic_bwd.BwdConfig(lpt_schedule=True)


def test_persistent_dkv_needs_two_kernels():
  cfg = mosaic_bwd.BwdConfig(fused_dq=True, persistent_dkv=True)
  with pytest.raises(NotImplementedError, match="persistent_dkv"):
    _check("pdkvfused", shape=dict(t=128, n=2, kh=1, h=128), bwd_config=cfg)
  with pytest.raises(ValueError, match="num_ctas"):
    mosaic_bwd.BwdConfig(num_ctas=-1)


@pytest.mark.parametrize("lengths", [False, True], ids=["", "lengths"])
def test_gradients_head_dim_256_whole_tiles(lengths):
  # The split-head dK/dV kernel on whole key tiles: its masked loops too
  # are compiled only where the ranges or key lengths need them.
  arrays = {"kv_lengths": jnp.array([128, 70], jnp.int32)} if lengths else {}
  _check(f"w256{lengths}", shape=dict(t=128, n=2, kh=1, h=256),
         arrays=arrays)


@pytest.mark.long
def test_gradients_fused_dq_everything():
  seg = testing.random_segment_ids(_key("fusedall"), 2, 300, 3)
  _check("fusedall", shape=dict(t=300, s=330, n=4, kh=1, h=128), dtype=F16,
         bwd_config=_fused(128),
         sinks=jax.random.normal(_key("fusedk"), (4,)), logits_soft_cap=5.0,
         local_window_size=(150, 40),
         arrays={"segment_ids": (seg, jnp.pad(seg, ((0, 0), (0, 30)),
                                              constant_values=2)),
                 "kv_lengths": jnp.array([330, 250], jnp.int32)})


def _former_forms(monkeypatch):
  """The step forms that were the defaults before run77 and stay as
  switches for timing (see mosaic_gpu._L_PARTIAL, mosaic_gpu_bwd._DP_INIT
  and _DQ_TURN)."""
  monkeypatch.setattr(fwd_lib, "_L_PARTIAL", False)
  monkeypatch.setattr(mosaic_bwd, "_DP_INIT", "zero")
  monkeypatch.setattr(mosaic_bwd, "_DQ_TURN", "static")


# The opt-in forms below were timed slower on an H100 (former forms run77,
# serial turn run88, P ring run91); their heaviest interpreter cases run
# with `pytest -m long` (CI's suite stays under 20 minutes).
@pytest.mark.parametrize("case", [
    pytest.param("h128_segments", marks=pytest.mark.long),
    pytest.param("h64_fused", marks=pytest.mark.long),
    pytest.param("h256", marks=pytest.mark.long), "sinks_cap"])
def test_former_step_forms(monkeypatch, case):
  # Forward and gradients with the former forms (the defaults run every
  # other test): P's row sums reduced across lanes every block, Delta
  # subtracted after dP's matmul (two-kernel, fused and split-head dK/dV,
  # dQ), the fused H = 64 dQ from one static branch per consumer.
  _former_forms(monkeypatch)
  seg = testing.random_segment_ids(_key("pf", case), 2, 260, 3)
  kw = {"h128_segments": dict(shape=dict(t=260, n=4, kh=2, h=128),
                              arrays={"segment_ids": seg}, is_causal=True),
        "h64_fused": dict(shape=dict(t=260, n=4, kh=2, h=64),
                          bwd_config=_fused(64), is_causal=True),
        "h256": dict(shape=dict(t=130, n=2, kh=1, h=256)),
        "sinks_cap": dict(shape=dict(t=200, n=4, kh=2, h=64),
                          sinks=jax.random.normal(_key("pfk"), (4,)),
                          logits_soft_cap=5.0,
                          arrays={"kv_lengths": jnp.array([200, 150],
                                                          jnp.int32)})}[case]
  _check(f"pf{case}", **kw)


@pytest.mark.parametrize("case", [
    "h64_segments", pytest.param("h128_causal", marks=pytest.mark.long),
    "h256_sinks_cap", "h64_early"])
def test_serial_turn_forward(monkeypatch, case):
  # mosaic_gpu._SERIAL_TURN (opt-in; mosaic_check variant "serialturn"):
  # each step waits for its P V inside the consumer's turn before issuing
  # the next Q K^T. Forward against the reference, masked and unmasked
  # steps, several blocks a tile, persistent CTAs over several items.
  monkeypatch.setattr(fwd_lib, "_SERIAL_TURN", True)
  seg = testing.random_segment_ids(_key("st", case), 2, 430, 3)
  kw = {"h64_segments": dict(shape=dict(t=430, n=4, kh=2, h=64),
                             arrays={"segment_ids": seg},
                             fwd_config=_fwd_cfg(64, num_ctas=3)),
        "h128_causal": dict(shape=dict(t=430, n=4, kh=2, h=128),
                            is_causal=True,
                            fwd_config=_fwd_cfg(128, num_ctas=3)),
        "h256_sinks_cap": dict(shape=dict(t=300, n=2, kh=1, h=256),
                               sinks=jax.random.normal(_key("stk"), (2,)),
                               logits_soft_cap=5.0,
                               arrays={"kv_lengths": jnp.array(
                                   [300, 170], jnp.int32)}),
        # With the early Q release (the default at H = 64 up to 1k keys):
        # the last block's P V after the Q buffer went back, O out through
        # the consumers' slots; lengths leave tiles with no block.
        "h64_early": dict(shape=dict(t=430, n=4, kh=2, h=64),
                          fwd_config=_fwd_cfg(64, num_ctas=3,
                                              early_q_release=True),
                          arrays={"q_lengths": jnp.array([430, 300],
                                                         jnp.int32),
                                  "kv_lengths": jnp.array([0, 430],
                                                          jnp.int32)})}[case]
  # Gradients once: the backward reads the forward's log-sum-exp.
  _check(f"st{case}", grads=case == "h128_causal", **kw)


@pytest.mark.parametrize("case", [
    "h64_segments", pytest.param("h64_causal", marks=pytest.mark.long),
    pytest.param("h64_three_consumers", marks=pytest.mark.long),
    pytest.param("h128_lengths", marks=pytest.mark.long)])
def test_p_in_smem_forward(monkeypatch, case):
  # mosaic_gpu._P_SMEM (opt-in; mosaic_check variant "psmem"): P_j in a
  # two-slot SMEM ring, stored while P_{j-1} V_{j-1} may still run. Masked
  # and unmasked steps, several blocks a tile (both slots reused), tiles
  # of one block (the last block reads the first block's slot),
  # persistent CTAs over several items.
  monkeypatch.setattr(fwd_lib, "_P_SMEM", True)
  seg = testing.random_segment_ids(_key("ps", case), 2, 430, 3)
  cfg = {"h64_segments": _fwd_cfg(64, num_ctas=3),
         "h64_causal": _fwd_cfg(64, num_ctas=3),
         "h64_three_consumers": _fwd_cfg(
             64, num_compute_wgs=3, num_stages=3, consumer_regs=160,
             producer_regs=32, num_ctas=3),
         "h128_lengths": _fwd_cfg(128, num_ctas=3)}[case]
  h = 128 if case == "h128_lengths" else 64
  assert fwd_lib._use_p_smem(cfg, h, h, 2, case == "h64_segments")  # pylint: disable=protected-access
  kw = {"h64_segments": dict(arrays={"segment_ids": seg}),
        "h64_causal": dict(is_causal=True),
        "h64_three_consumers": dict(is_causal=True),
        # The LSE from registers, rows past a query length masked.
        "h128_lengths": dict(arrays={
            "q_lengths": jnp.array([430, 250], jnp.int32),
            "kv_lengths": jnp.array([300, 430], jnp.int32)})}[case]
  # Gradients where the backward reads the forward's log-sum-exp.
  _check(f"ps{case}", shape=dict(t=430, n=4, kh=2, h=h),
         grads=case in ("h64_causal", "h128_lengths"), fwd_config=cfg, **kw)


def test_p_in_smem_only_where_it_fits(monkeypatch):
  # The P ring (64 KB with two consumers) fits beside H = 64's buffers,
  # and H = 128's without segment ids (its LSE then leaves from
  # registers); H = 256 keeps P in registers (it would spill).
  monkeypatch.setattr(fwd_lib, "_P_SMEM", True)
  fits = {(h, seg): fwd_lib._use_p_smem(fwd_lib.default_fwd_config(h), h,  # pylint: disable=protected-access
                                        h, 2, seg)
          for h in (64, 128, 256) for seg in (False, True)}
  assert fits == {(64, False): True, (64, True): True, (128, False): True,
                  (128, True): False, (256, False): False,
                  (256, True): False}
  # Not where the config needs two Q buffers beside three consumers'
  # rings (FwdConfig(overlap_epilogue=True) asks for the second buffer).
  wg3 = _fwd_cfg(64, num_compute_wgs=3, num_stages=3, consumer_regs=160,
                 producer_regs=32)
  assert fwd_lib._use_p_smem(wg3, 64, 64, 2, True)  # pylint: disable=protected-access
  assert not fwd_lib._use_p_smem(  # pylint: disable=protected-access
      dataclasses.replace(wg3, overlap_epilogue=True), 64, 64, 2, False)
  assert not fwd_lib._use_p_smem(  # pylint: disable=protected-access
      dataclasses.replace(wg3, q_buffers=2), 64, 64, 2, False)
  monkeypatch.setattr(fwd_lib, "_P_SMEM", False)
  assert not fwd_lib._use_p_smem(fwd_lib.default_fwd_config(64), 64, 64, 2,  # pylint: disable=protected-access
                                 False)


@pytest.mark.parametrize("causal", [False, True])
def test_key_blocks_192(causal):
  # FwdConfig(block_kv=192) at H = 64 (mosaic_check.py variant kv192):
  # the last key block part-filled, a ring of three 192-key stages.
  seg = testing.random_segment_ids(_key("kv192"), 2, 430, 3)
  _check("kv192", shape=dict(t=430, n=4, kh=2), grads=False,
         fwd_config=_fwd_cfg(64, block_kv=192, num_stages=3, num_ctas=3),
         is_causal=causal, arrays={"segment_ids": seg})


@pytest.mark.parametrize("block_kv,stages,causal", [
    (128, 3, True),  # the default tile's
    pytest.param(64, 4, False, marks=pytest.mark.long)])  # opt-in
def test_three_consumer_warpgroups(block_kv, stages, causal):
  # FA3's H = 64 forward tile: 3 x 64 query rows per CTA, each consumer
  # handing the scheduling barrier on to the next (the `wg3` variants of
  # scripts/gpu/mosaic_check.py; both compile without spills for an H100).
  seg = testing.random_segment_ids(_key("wg3"), 2, 430, 3)
  _check("wg3", shape=dict(t=430, n=4, kh=2), grads=False,
         fwd_config=_fwd_cfg(64, block_kv=block_kv, num_stages=stages,
                             num_compute_wgs=3, consumer_regs=160,
                             producer_regs=32, num_ctas=3),
         is_causal=causal, arrays={"segment_ids": seg})


@pytest.mark.parametrize("causal", [
    True, pytest.param(False, marks=pytest.mark.long)])
def test_four_consumer_warpgroups(causal):
  # Four consumers of 64 rows over 64-key blocks at H = 64 (opt-in;
  # mosaic_check.py's "wg4"; 112 registers each, no spills compiled for an
  # H100): the ping-pong barrier handed round four, a 256-row tile (T =
  # 430 ends inside the second tile), several items per CTA.
  seg = testing.random_segment_ids(_key("wg4"), 2, 430, 3)
  _check("wg4", shape=dict(t=430, n=4, kh=2), grads=False,
         fwd_config=_fwd_cfg(64, block_kv=64, num_stages=4,
                             num_compute_wgs=4, consumer_regs=112,
                             producer_regs=24, num_ctas=3),
         is_causal=causal, arrays={"segment_ids": seg})


def test_fwd_config_register_pool():
  # setmaxnreg's increases come out of the launch's equal share (65536
  # registers over the CTA's threads, a multiple of 8 each): 96 a thread
  # with five warpgroups, so four consumers get at most 112 beside a
  # producer at 24; 120 would block for ever on the GPU.
  fwd_lib.FwdConfig(num_compute_wgs=4, block_kv=64, consumer_regs=112,
                    producer_regs=24)
  with pytest.raises(ValueError, match="consumer_regs=120"):
    fwd_lib.FwdConfig(num_compute_wgs=4, block_kv=64, consumer_regs=120,
                      producer_regs=24)
  # The defaults sit exactly at their pools (168 x 3, 128 x 4).
  fwd_lib.FwdConfig(consumer_regs=240, producer_regs=24)
  fwd_lib.FwdConfig(num_compute_wgs=3, consumer_regs=160, producer_regs=32)
  with pytest.raises(ValueError, match="consumer_regs=248"):
    fwd_lib.FwdConfig(consumer_regs=248, producer_regs=24)
  with pytest.raises(ValueError, match="num_compute_wgs"):
    fwd_lib.FwdConfig(num_compute_wgs=5, consumer_regs=80)


def test_deadlock_fails_instead_of_hanging():
  # A warpgroup that waits for a turn nobody hands it (the ping-pong's
  # named barrier, modelled by the shim): the watchdog fails the kernel,
  # and the interpreter runs the next kernel normally.
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  def make(wait):
    def kernel(x_ref, o_ref):
      if wait:
        fwd_lib._sched_barrier("sync", other=False, num_wgs=2)  # pylint: disable=protected-access
      o_ref[...] = x_ref[...] + 1.0
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(
        (128,), jnp.float32), num_threads=1, thread_name="wg")

  x = jnp.arange(128, dtype=jnp.float32)
  with pytest.raises(Exception, match="deadlock"):
    with mosaic_interpret.interpret_mode(deadlock_seconds=5):
      jax.block_until_ready(make(True)(x))
  with mosaic_interpret.interpret_mode():
    np.testing.assert_array_equal(make(False)(x), x + 1.0)


@pytest.mark.parametrize("h,wgs", [(64, 2), (128, 2), (64, 3)])
def test_overlap_epilogue(h, wgs):
  """FwdConfig(overlap_epilogue=True): each consumer issues the next item's
  first Q K^T beside its last P V. Several items per CTA (3 CTAs), causal
  with segment ids, a key length of 0 for one sequence (items with no
  block: the next item's first block then runs as usual) and a query
  length that cuts a tile."""
  seg = testing.random_segment_ids(_key("ov"), 2, 330, 3)
  kw = dict(num_compute_wgs=wgs, consumer_regs=160,
            producer_regs=32) if wgs == 3 else {}
  cfg = _fwd_cfg(h, num_ctas=3, q_buffers=2, overlap_epilogue=True, **kw)
  out, _ = _check(f"ov{h}{wgs}", shape=dict(t=330, n=4, kh=2, h=h),
                  grads=False, fwd_config=cfg, is_causal=True,
                  arrays={"segment_ids": seg,
                          "kv_lengths": jnp.array([330, 0], jnp.int32),
                          "q_lengths": jnp.array([250, 330], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)


@pytest.mark.parametrize("h,wgs", [
    (256, 2), (64, 2),  # the defaults' forms (H = 64 up to 1k keys)
    pytest.param(64, 3, marks=pytest.mark.long)])
def test_early_q_release(h, wgs):
  """FwdConfig(early_q_release=True): one Q buffer handed back after each
  item's last Q K^T, O out through the consumers' SMEM slots (four slot
  stores an item at H = 256, two at H = 64: each slot reused within an
  item and across items) and the LSE from registers. Several items per
  CTA (3 CTAs), causal with segment ids, a key length of 0 for one
  sequence (items with no block release the buffer at once) and a query
  length that cuts a tile."""
  # At H = 256 segment ids leave no room for O's slots (the kernel then
  # runs without the early release): none there.
  seg = {} if h == 256 else {
      "segment_ids": testing.random_segment_ids(_key("eq"), 2, 330, 3)}
  kw = dict(num_compute_wgs=wgs, consumer_regs=160,
            producer_regs=32) if wgs == 3 else {}
  cfg = _fwd_cfg(h, num_ctas=3, early_q_release=True, **kw)
  out, lse = _check(f"eq{h}{wgs}", shape=dict(t=330, n=4, kh=2, h=h),
                    grads=False, fwd_config=cfg, is_causal=True,
                    arrays={**seg,
                            "kv_lengths": jnp.array([330, 0], jnp.int32),
                            "q_lengths": jnp.array([250, 330], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(out[0, 250:], np.float32), 0.0)


def test_early_q_release_config():
  with pytest.raises(ValueError, match="early_q_release"):
    fwd_lib.FwdConfig(early_q_release=True, q_buffers=2)
  with pytest.raises(ValueError, match="early_q_release"):
    fwd_lib.FwdConfig(early_q_release=True, overlap_epilogue=True)
  cfg = fwd_lib.FwdConfig(block_kv=64, early_q_release=True)
  # One Q buffer, O's slots instead of the LSE buffer.
  base = dataclasses.replace(cfg, early_q_release=False)
  assert (fwd_lib.smem_bytes(cfg, 256, 256)
          - fwd_lib.smem_bytes(base, 256, 256, q_buffers=1)
          == 2 * 2 * 64 * 64 * 2 - 1024)


def test_early_q_release_default_and_fit():
  # The default at H = 256 up to EARLY_Q_MAX_LEN keys, at H = 64 up to
  # EARLY_Q_MAX_LEN_H64 (not with three consumers), never at H = 128.
  short = fwd_lib.EARLY_Q_MAX_LEN_H64
  assert fwd_lib.default_fwd_config(64, kv_len=short).early_q_release
  assert fwd_lib.default_fwd_config(64, True, q_len=short,
                                    kv_len=short).early_q_release
  assert not fwd_lib.default_fwd_config(64, kv_len=short + 1).early_q_release
  assert not fwd_lib.default_fwd_config(64).early_q_release
  assert fwd_lib.default_fwd_config(256, kv_len=1024).early_q_release
  assert fwd_lib.default_fwd_config(
      256, True, kv_len=fwd_lib.EARLY_Q_MAX_LEN).early_q_release
  assert not fwd_lib.default_fwd_config(
      256, kv_len=fwd_lib.EARLY_Q_MAX_LEN + 1).early_q_release
  assert not fwd_lib.default_fwd_config(256).early_q_release
  assert not fwd_lib.default_fwd_config(128, kv_len=1024).early_q_release
  # With segment ids at H = 256 O's slots leave no room (an H100 refused
  # 233,552 bytes, run119): flash_forward then runs without the release.
  cfg = fwd_lib.default_fwd_config(256, kv_len=1024)
  slack = fwd_lib._SMEM_SLACK  # pylint: disable=protected-access
  assert (fwd_lib.smem_bytes(cfg, 256, 256, segments=True) + slack
          > fwd_lib.SMEM_BYTES)
  assert fwd_lib.smem_bytes(cfg, 256, 256) + slack <= fwd_lib.SMEM_BYTES


@pytest.mark.parametrize("causal", [
    pytest.param(False, marks=pytest.mark.long), True])
def test_query_blocks_128(causal):
  """FwdConfig(block_q=128) at H = 64 (mosaic_check variant bq128kv64):
  128 query rows a consumer (two 64-row wgmma halves, 256-row tiles) over
  64-key blocks, several items per CTA, GQA, segment ids, a key length
  that cuts a block and a query length that cuts a tile."""
  seg = testing.random_segment_ids(_key("bq128"), 2, 600, 3)
  cfg = _fwd_cfg(64, block_q=128, block_kv=64, num_stages=4, num_ctas=3)
  out, _ = _check(f"bq128{causal}", shape=dict(t=600, n=4, kh=2),
                  grads=False, fwd_config=cfg, is_causal=causal,
                  arrays={"segment_ids": seg,
                          "kv_lengths": jnp.array([600, 333], jnp.int32),
                          "q_lengths": jnp.array([450, 600], jnp.int32)})
  np.testing.assert_array_equal(np.asarray(out[0, 450:], np.float32), 0.0)
