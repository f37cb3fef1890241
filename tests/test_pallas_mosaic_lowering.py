"""CPU checks of the Mosaic GPU kernels: they lower for an (abstract) H100.

Mosaic GPU kernels cannot run without an sm_90 GPU, but Pallas lowers them to
Mosaic GPU IR for an abstract H100 on any machine, which catches most layout,
shape, shared-memory and API errors. These tests export the forward pass and
its VJP (dK/dV and dQ kernels) at several configurations, and check that the
backend refuses what it does not support.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice

from attnjax import masks
from attnjax.softmax import pallas_mosaic
from attnjax.softmax.problem import make_problem
from pallas_kernels.flash import mosaic_gpu as fwd_lib
from pallas_kernels.flash import mosaic_gpu_bwd as bwd_lib

_H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                       platform="gpu")


def _export(f, *args):
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
            jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu"),
        ])(*args)


def _lower(*, b=2, t=300, s=None, n=4, kh=2, h=64, dtype=jnp.bfloat16,
           grad=True, segs=False, lens=False, sinks=False, fwd_config=None,
           bwd_config=None, **kw):
  s = s or t
  sds = jax.ShapeDtypeStruct
  args = (sds((b, t, n, h), dtype), sds((b, s, kh, h), dtype),
          sds((b, s, kh, h), dtype),
          sds((b, t), jnp.int32) if segs else None,
          sds((b, s), jnp.int32) if segs else None,
          sds((b,), jnp.int32) if lens else None,
          sds((b,), jnp.int32) if lens else None,
          sds((n,), jnp.float32) if sinks else None)

  plans = []

  def f(q, k, v, qs, ks, ql, kl, sk):
    def g(q, k, v, sk):
      p, _ = make_problem(
          q, k, v, segment_ids=None if qs is None else (qs, ks),
          query_seq_lengths=ql, key_value_seq_lengths=kl, sinks=sk, **kw)
      plans.append(pallas_mosaic.make_plan(p, fwd_config=fwd_config,
                                           bwd_config=bwd_config))
      return pallas_mosaic.mosaic_attention(p, fwd_config=fwd_config,
                                            bwd_config=bwd_config)
    if not grad:
      return g(q, k, v, sk)
    (o, l), vjp = jax.vjp(g, q, k, v, sk)
    return vjp((o, l))

  exported = _export(f, *args)
  text = exported.mlir_module()
  # Forward, dK/dV and dQ each become one Mosaic GPU custom call (dQ joins
  # dK/dV when fused).
  # Without a config the plan picks the tiling (fused at H = 128 for some
  # shapes unless XLA_FLAGS asks for deterministic ops). With
  # dq_head_group the dK/dV/dQ kernel's one call sits in a loop over
  # groups of (batch, K/V head) pairs.
  fused = plans[0].bwd.fused_dq
  want = 1 + (not fused) + 1 if grad else 1
  assert _mosaic_calls(text) == want, (_mosaic_calls(text), want)
  return exported


def _mosaic_calls(text):
  """Mosaic GPU kernels in an exported module (one custom call each)."""
  return text.count("custom_call @mosaic_gpu")


@pytest.mark.parametrize("h,n,kh,causal", [
    (64, 4, 4, True), (128, 4, 2, False), (128, 8, 1, True)],
    ids=["h64-mha-causal", "h128-gqa-full", "h128-mqa-causal"])
def test_lowers_common(h, n, kh, causal):
  _lower(h=h, n=n, kh=kh, t=333, s=333, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_lowers_head_dim_256(causal):
  # Forward, split-head dK/dV (two consumers, P^T and dS^T exchanged through
  # shared memory) and dQ with 32-key blocks.
  _lower(h=256, n=4, kh=2, t=300, s=300, is_causal=causal)


@pytest.mark.parametrize("h", [128, 256])
def test_lowers_all_features(h):
  _lower(h=h, t=200, s=260, is_causal=True, segs=True, lens=True,
         sinks=True, logits_soft_cap=5.0, dtype=jnp.float16)


@pytest.mark.parametrize("kw", [
    dict(local_window_size=(100, 20)),
    dict(mask=masks.ChunkedCausal(64)),
    dict(mask=(masks.LocalWindow(30, 0) | masks.Prefix(3)) & masks.Causal()),
    dict(mask=masks.Causal(offset=50)),
], ids=["window", "chunked", "window-prefix", "causal-offset"])
def test_lowers_masks(kw):
  _lower(t=190, s=250, **kw)


def test_lowers_other_tilings():
  _lower(h=128, t=512, is_causal=True,
         fwd_config=fwd_lib.FwdConfig(block_kv=64, num_stages=3,
                                      pingpong=False),
         bwd_config=bwd_lib.BwdConfig(block_kv_dq=128, num_stages=2))


@pytest.mark.parametrize("h,causal", [(64, False), (128, True)])
def test_lowers_persistent_dkv(h, causal):
  # Both backward kernels on persistent grids (one CTA per SM of the abstract
  # H100), with every feature whose masked loops it compiles.
  _lower(h=h, t=700, s=650, is_causal=causal, segs=True, lens=True,
         bwd_config=bwd_lib.BwdConfig(persistent_dkv=True,
                                      persistent_dq=True))


def test_lowers_staggered_fused_backward():
  _lower(h=128, t=700, is_causal=True,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True, stagger_q=True))
  with pytest.raises(ValueError, match="stagger_q"):
    bwd_lib.BwdConfig(stagger_q=True)


@pytest.mark.parametrize("layout", ["nth", "nct"])
def test_lowers_fused_dq_layouts(layout):
  _lower(h=128, t=400, is_causal=True,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True, dq_layout=layout))
  with pytest.raises(ValueError, match="dq_layout"):
    bwd_lib.BwdConfig(fused_dq=True, dq_layout="bad")


def test_lowers_fused_one_ds_buffer_three_stages():
  # 16 KB of dS^T freed for a third Q/dO stage: fits 227 KB at H = 128;
  # two dS^T buffers with three stages do not.
  _lower(h=128, t=400, is_causal=True,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True, ds_buffers=1,
                                      num_stages=3))
  with pytest.raises(NotImplementedError, match="SMEM"):
    _lower(h=128, t=400,
           bwd_config=bwd_lib.BwdConfig(fused_dq=True, num_stages=3))
  with pytest.raises(ValueError, match="ds_buffers"):
    bwd_lib.BwdConfig(fused_dq=True, ds_buffers=3)


@pytest.mark.parametrize("h", [64, 128])
def test_lowers_fused_early_release(h):
  _lower(h=h, t=400, is_causal=True,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True, early_release=True))
  with pytest.raises(ValueError, match="early_release"):
    bwd_lib.BwdConfig(early_release=True)


@pytest.mark.parametrize("h,layout", [(64, "tnh"), (128, "tnh"),
                                      (128, "nct")])
def test_lowers_fused_dq_evict_last(h, layout):
  # BwdConfig(dq_evict_last=True): the dQ reduce-add emitted through
  # inline Mosaic GPU with an L2 policy (causal, segment ids).
  _lower(h=h, t=400, is_causal=True, segs=True,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True, dq_evict_last=True,
                                      dq_layout=layout))
  with pytest.raises(ValueError, match="dq_evict_last"):
    bwd_lib.BwdConfig(dq_evict_last=True)


@pytest.mark.parametrize("h,layout,ahead", [
    (64, "tnh", 0), (128, "tnh", 2), (128, "nth", 1), (128, "nct", 2)])
def test_lowers_fused_dq_prefetch(h, layout, ahead):
  # BwdConfig(dq_prefetch): the producer's TMA prefetch of the dQ
  # accumulator rows `ahead` steps on (causal, segment ids).
  _lower(h=h, t=400, is_causal=True, segs=True,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True, dq_prefetch=ahead,
                                      dq_layout=layout))
  with pytest.raises(ValueError, match="dq_prefetch"):
    bwd_lib.BwdConfig(dq_prefetch=0)
  with pytest.raises(ValueError, match="dq_prefetch"):
    bwd_lib.BwdConfig(fused_dq=True, dq_prefetch=-1)
  with pytest.raises(ValueError, match="dq_prefetch_every"):
    bwd_lib.BwdConfig(fused_dq=True, dq_prefetch=1, dq_prefetch_every=0)
  # Only every 3rd key tile's CTA prefetching.
  _lower(h=h, t=400, bwd_config=bwd_lib.BwdConfig(
      fused_dq=True, dq_prefetch=ahead, dq_prefetch_every=3,
      dq_layout=layout))


@pytest.mark.parametrize("h,causal,group", [(64, True, 1), (128, False, 2),
                                             (128, True, 4)])
def test_lowers_fused_dq_head_group(h, causal, group):
  # BwdConfig(dq_head_group): one launch per group of (batch, K/V head)
  # pairs, each into its own accumulator (B = 2, K = 2: groups of 1, 2
  # and 4 pairs, the last spanning both batch entries).
  exported = _lower(h=h, t=400, is_causal=causal, segs=causal,
                    bwd_config=bwd_lib.BwdConfig(fused_dq=True,
                                                 dq_head_group=group))
  # The launch sits in a loop over the groups, after the zeroing of the
  # accumulator and before its conversion (unrolled, XLA zeroed every
  # group's accumulator up front: AOT-compiled HLO for an H100).
  text = exported.mlir_module()
  body = text[text.index("stablehlo.while"):]
  assert _mosaic_calls(body) == 1
  with pytest.raises(ValueError, match="dq_head_group"):
    bwd_lib.BwdConfig(dq_head_group=2)
  with pytest.raises(ValueError, match="dq_head_group"):
    bwd_lib.BwdConfig(fused_dq=True, dq_head_group=0)
  with pytest.raises(ValueError, match="dq_head_group"):
    bwd_lib.BwdConfig(fused_dq=True, dq_head_group=2, dq_layout="nct")


@pytest.mark.parametrize("want,b,kh,got", [
    (None, 4, 16, None), (8, 4, 16, 8), (6, 4, 16, 4), (16, 4, 16, 16),
    (40, 4, 16, 32), (64, 4, 16, 64), (100, 4, 16, 64), (3, 1, 2, 2),
    (1, 3, 5, 1), (7, 3, 5, 5), (12, 3, 5, 5), (15, 3, 5, 15)])
def test_head_group_sizes(want, b, kh, got):
  # The largest pair count <= want that divides K or is K times a divisor
  # of B (a launch's pairs are then contiguous heads of one batch entry or
  # whole batch entries).
  assert bwd_lib._head_group(want, b, kh) == got


def test_hinted_reduce_instruction():
  # The rewrite of Mosaic GPU's TMA reduce-add (jax 0.11's form): the
  # L2::cache_hint qualifier, the policy operand and its createpolicy.
  asm = ("@$0 cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile"
         ".bulk_group [$2,{$3,$4}], [$1];")
  assert bwd_lib._hinted_reduce(asm) == (
      "{ .reg .b64 attnjax_l2p; createpolicy.fractional.L2::evict_last.b64 "
      "attnjax_l2p, 1.0; @$0 cp.reduce.async.bulk.tensor.2d.global."
      "shared::cta.add.tile.bulk_group.L2::cache_hint [$2,{$3,$4}], [$1], "
      "attnjax_l2p; }")
  for other in (asm[4:], asm.replace(".bulk_group", ""), asm[:-1],
                bwd_lib._hinted_reduce(asm)):
    with pytest.raises(NotImplementedError, match="TMA reduce-add"):
      bwd_lib._hinted_reduce(other)


def test_hinting_llvm_is_per_thread():
  # The L2 hint goes only on the reduce-adds the flagged thread emits; a
  # thread lowering at the same time passes its asm through unchanged, and
  # installing the wrapper twice wraps once.
  import threading  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  seen = []
  real = types.SimpleNamespace(
      inline_asm=lambda res, ops, asm, cons, *a, **k: seen.append(asm),
      other="passed through")
  module = types.SimpleNamespace(llvm=real)
  bwd_lib._install_hinting(module)
  bwd_lib._install_hinting(module)
  assert isinstance(module.llvm, bwd_lib._HintingLLVM)
  assert module.llvm._real is real and module.llvm.other == "passed through"
  asm = ("@$0 cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile"
         ".bulk_group [$2,{$3,$4}], [$1];")
  flagged, done = threading.Event(), threading.Event()

  def hinting():
    bwd_lib._HINT.on = True
    try:
      flagged.set()
      assert done.wait(10)
      module.llvm.inline_asm(None, [], asm, "")
    finally:
      bwd_lib._HINT.on = False

  def plain():
    assert flagged.wait(10)
    module.llvm.inline_asm(None, [], asm, "")
    done.set()

  threads = [threading.Thread(target=hinting), threading.Thread(target=plain)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert seen == [asm, bwd_lib._hinted_reduce(asm)]
  module.llvm.inline_asm(None, [], asm, "")  # this thread: never flagged
  assert seen[-1] == asm


def test_lowers_evict_last_in_threads():
  # The bench lowers its kernels 8 threads at once: dQ copies with the L2
  # policy (fused, causal) beside ones without, all lowering.
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  cfgs = [bwd_lib.BwdConfig(fused_dq=True, dq_evict_last=e)
          for e in (True, False)]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    list(pool.map(lambda c: _lower(h=64, t=300, is_causal=True,
                                   bwd_config=c), cfgs))


@pytest.mark.parametrize("drop", [{"join"}, {"reduce"}, {"dq"}, {"slots"}])
def test_lowers_fused_timing_diagnostics(monkeypatch, drop):
  # scripts/gpu/mosaic_check.py's fusednj / fusednr / fusednodq / fusedsl.
  monkeypatch.setattr(bwd_lib, "_FUSED_DROP", frozenset(drop))
  _lower(h=128, t=400, bwd_config=bwd_lib.BwdConfig(fused_dq=True))


@pytest.mark.parametrize("h,causal", [(64, False), (128, True), (256, True)])
def test_lowers_serial_turn_forward(monkeypatch, h, causal):
  # mosaic_gpu._SERIAL_TURN (opt-in; mosaic_check.py's "serialturn").
  monkeypatch.setattr(fwd_lib, "_SERIAL_TURN", True)
  _lower(h=h, t=400, is_causal=causal)


@pytest.mark.parametrize("causal,early", [(False, False), (True, True)])
def test_lowers_four_consumers(causal, early):
  # FwdConfig(num_compute_wgs=4) at H = 64 (opt-in; mosaic_check.py's
  # "wg4", "wg4e"), forward and the backward that reads its LSE.
  _lower(h=64, t=700, is_causal=causal, segs=True, lens=True,
         fwd_config=fwd_lib.FwdConfig(block_kv=64, num_stages=4,
                                      num_compute_wgs=4, consumer_regs=112,
                                      producer_regs=24,
                                      early_q_release=early))


@pytest.mark.parametrize("h,causal,early", [(64, False, True),
                                            (128, True, False),
                                            (256, False, True)])
def test_lowers_no_auto_barriers(h, causal, early):
  # FwdConfig(no_auto_barriers=True) (opt-in; mosaic_check.py's "nabdef",
  # "serialnab"): no SMEM barriers beyond the kernel's own, with the early
  # Q release's O slots and without (O through the Q buffer, the LSE
  # through its SMEM buffer).
  base = fwd_lib.default_fwd_config(h, causal, kv_len=400)
  _lower(h=h, t=400, is_causal=causal, segs=h != 256, lens=True,
         fwd_config=dataclasses.replace(base, early_q_release=early,
                                        no_auto_barriers=True))


@pytest.mark.parametrize("h,causal,serial", [(64, False, False),
                                             (64, True, False),
                                             (128, True, False),
                                             (64, True, True)])
def test_lowers_p_in_smem_forward(monkeypatch, h, causal, serial):
  # mosaic_gpu._P_SMEM (opt-in; mosaic_check.py's "psmem"), H = 64 and 128,
  # and with the serial turn (_SERIAL_TURN) beside it.
  monkeypatch.setattr(fwd_lib, "_P_SMEM", True)
  monkeypatch.setattr(fwd_lib, "_SERIAL_TURN", serial)
  _lower(h=h, t=400, is_causal=causal)


@pytest.mark.parametrize("h,causal", [(64, False), (128, True)])
def test_lowers_fused_backward(h, causal):
  # dQ inside the dK/dV kernel: two Mosaic GPU kernels (forward, dK/dV/dQ).
  _lower(h=h, t=333, is_causal=causal, segs=causal,
         bwd_config=bwd_lib.BwdConfig(fused_dq=True))


@pytest.mark.parametrize("flags,deterministic", [
    ("", False),
    ("--xla_force_host_platform_device_count=8", False),
    ("--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops=1 --xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_exclude_nondeterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=False "
     "--xla_gpu_exclude_nondeterministic_ops", True),
])
def test_default_backward_follows_determinism_flags(monkeypatch, flags,
                                                    deterministic):
  # H = 64 and 128 have a faster backward that is not bitwise repeatable
  # (at T = 16k causal here, measured faster); H = 256 has none.
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert pallas_mosaic.deterministic_ops() is deterministic
  for h in (64, 128, 256):
    bwd = _plan((1, 16384, 2, h), (1, 16384, 2, h), is_causal=True).bwd
    assert bwd.fused_dq is (h <= 128 and not deterministic), h
    if not bwd.fused_dq:
      assert bwd == bwd_lib.default_bwd_config(h), h


# (H, T, N, K, causal, form): the H100 measurements behind the rule
# (docs/pallas_mosaic_gpu.md; run43-run58: fused / two kernels,
# forward+backward TFLOP/s) and the rule's edges. form: "two" kernels,
# "one" fused launch, or the fused kernel launched per group of that many
# (batch, K/V head) pairs (BwdConfig.dq_head_group).
_FUSED_SHAPES = [
    (128, 16384, 2, 2, False, 1),      # full MHA 16k: 575 / 535 (2: 543)
    (128, 16384, 2, 2, True, "one"),   # causal 16k: 546; grouped 531-542
    (128, 8192, 2, 2, False, 4),       # full MHA 8k: 544 / 514 (one: 522)
    (128, 8192, 2, 2, True, "one"),    # causal MHA 8k: 506 / 471
    (128, 4096, 2, 2, False, 8),       # full MHA 4k: 511 / 461 (4: 507)
    (128, 4096, 2, 2, True, 8),        # causal MHA 4k: 444 / 416 (4: 306)
    (128, 2048, 2, 2, False, 16),      # full MHA 2k: 462 / 411 (32: 450)
    (128, 2048, 2, 2, True, 16),       # causal MHA 2k: 364 / 355
    (128, 2047, 2, 2, False, "two"),   # one row short of GROUPED_MIN_LEN
    (128, 1024, 2, 2, False, "two"),   # full MHA 1k: 381 / 381 (32)
    (128, 1024, 2, 2, True, "two"),    # causal MHA 1k: 254 / 283 (32)
    (128, 8191, 2, 2, True, 4),        # one row short of FUSED_MIN_ROWS
    (128, 4100, 2, 2, False, 8),       # a little over 4k: still 8
    (128, 3000, 2, 2, True, 11),       # 24 key tiles: two waves
    (128, 4096, 4, 1, False, "one"),   # full GQA 4:1, 4k: 519 / 516
    (128, 2048, 4, 1, False, "one"),   # full GQA 4:1, 2k: 479 / 467
    (128, 4096, 4, 1, True, "two"),    # causal GQA 4k: 409 / 444
    (128, 1024, 4, 1, False, "two"),   # full GQA 1k: 357 / 446
    (128, 4096, 4, 2, False, "one"),   # 2 x 4096 rows per CTA, full
    (128, 4095, 4, 2, False, "two"),
    (64, 16384, 2, 2, False, 1),       # H = 64 full 16k: 439 / 381
    (64, 16384, 2, 2, True, 4),        # causal 16k: 410 / 371 (16: 414)
    (64, 8192, 2, 2, True, 8),         # causal 8k: 389 / 348
    (64, 4096, 2, 2, False, 16),       # full 4k: 387 / 331 (8: 391)
    (64, 4096, 2, 2, True, 16),        # causal 4k: 350 / 311
    (64, 2048, 2, 2, False, 32),       # full 2k: 354 / 317
    (64, 1024, 2, 2, False, "two"),    # full 1k: 296 / 299 (64)
    (64, 4096, 4, 1, False, "one"),    # full GQA 4:1, 4k: 389 / 349
    (64, 4096, 4, 1, True, "one"),     # causal GQA 4k: 357 / 339
    (64, 16384, 4, 1, True, "one"),    # causal GQA 16k: 407 / 381
    (64, 4095, 4, 1, False, "two"),    # a row short of FUSED_MIN_ROWS_H64
    (64, 8192, 2, 1, False, "one"),    # 2 x 8192 rows per CTA
    (64, 1024, 4, 1, False, "two"),    # GQA 1k: unmeasured
]


def _plan(q_shape, kv_shape, **kw):
  """The default plan of abstract bf16 inputs (make_problem under tracing)."""
  plans = []

  def f(q, k):
    p, _ = make_problem(q, k, k, **kw)
    plans.append(pallas_mosaic.make_plan(p))
    return q

  sds = jax.ShapeDtypeStruct
  jax.eval_shape(f, sds(q_shape, jnp.bfloat16), sds(kv_shape, jnp.bfloat16))
  return plans[0]


@pytest.mark.parametrize("h,t,n,kh,causal,form", _FUSED_SHAPES)
def test_default_backward_picks_fused_by_shape(monkeypatch, h, t, n, kh,
                                               causal, form):
  monkeypatch.setenv("XLA_FLAGS", "")
  shapes = (2, t, n, h), (2, t, kh, h)
  bwd = _plan(*shapes, is_causal=causal).bwd
  two = bwd_lib.default_bwd_config(h, q_len=t, groups=n // kh,
                                   masked=causal)
  if form == "two":
    # The two-kernel tiling of the deterministic default.
    assert bwd == two
  else:
    assert bwd == bwd_lib.BwdConfig(
        fused_dq=True, dq_head_group=None if form == "one" else form)
  # A local window skips blocks as a causal mask does.
  if not causal:
    window = _plan(*shapes, local_window_size=(t // 2, t // 2))
    assert window.bwd == _plan(*shapes, is_causal=True).bwd
  # With the determinism flags, two kernels.
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert _plan(*shapes, is_causal=causal).bwd == two


def test_short_h64_backward_tiles_dq_by_128_queries():
  # H = 64 below GROUPED_MIN_LEN (two kernels, with or without the
  # determinism flags): 128-query dQ tiles besides the dK/dV kernel's
  # 128-query blocks (run64); from GROUPED_MIN_LEN and at an unknown
  # length the dQ kernel keeps 64.
  persist = dict(persistent_dkv=True, persistent_dq=True)
  short = bwd_lib.BwdConfig(block_q_dkv=128, block_q_dq=128, **persist)
  for deterministic in (True, False):
    for t in (1, 1000, bwd_lib.GROUPED_MIN_LEN - 1):
      assert bwd_lib.default_bwd_config(
          64, deterministic, q_len=t, masked=True) == short
  long = bwd_lib.BwdConfig(block_q_dkv=128, **persist)
  assert bwd_lib.default_bwd_config(64) == long
  assert bwd_lib.default_bwd_config(
      64, q_len=bwd_lib.GROUPED_MIN_LEN) == long
  # H = 128 is unchanged at short lengths.
  assert bwd_lib.default_bwd_config(128, q_len=1000) == bwd_lib.BwdConfig(
      block_kv_dq=128, **persist)


@pytest.mark.parametrize("h", [64, 128, 256])
def test_default_two_kernel_backward_is_persistent_but_masked_gqa(h):
  # run92-run97 (H100): persistent grids for both backward kernels win for
  # MHA (1k full 465 / 378 TFLOP/s at H = 128) and unmasked GQA; for
  # causal GQA the dQ kernel's wins (4k 480 -> 491) and the dK/dV
  # kernel's loses (-> 442); at H = 256 the split-head dK/dV kernel's
  # wins too (1k full MHA 309 -> 360).
  for groups, masked in [(1, False), (1, True), (4, False), (4, True)]:
    for t in (None, 1024, 4096):
      cfg = bwd_lib.default_bwd_config(h, q_len=t, groups=groups,
                                       masked=masked)
      assert cfg.persistent_dq, (groups, masked, t)
      assert cfg.persistent_dkv == (not (groups > 1 and masked)), (
          groups, masked, t)
      assert cfg.split_head == (h > 128)
  # The fused form has none.
  assert not bwd_lib.default_bwd_config(
      128, False, q_len=16384).persistent_dkv
  # The split-head dK/dV kernel on a persistent grid (H = 256's default).
  _lower(h=256, t=300, is_causal=True, segs=True, lens=True,
         bwd_config=bwd_lib.default_bwd_config(256, q_len=300))


def test_group_want_fills_a_wave():
  # Every launch of the default grouped form has at least a wave of CTAs
  # (two masked) unless the problem has fewer, and its accumulator is
  # GROUP_ACC_BYTES at most unless one wave needs more.
  for h in (64, 128):
    for t in range(1024, 40000, 1000):
      for masked in (False, True):
        want = bwd_lib._group_want(t, 1, h, masked, 128)
        tiles = -(-t // 128)
        waves = 2 if masked else 1
        assert want >= 1
        if not masked and tiles >= bwd_lib.WAVE_CTAS:
          assert want == 1
          continue
        assert want * tiles >= waves * bwd_lib.WAVE_CTAS
        if (want - 1) * tiles >= waves * bwd_lib.WAVE_CTAS:
          # Not raised for the wave: the largest power of two that fits.
          assert want & (want - 1) == 0
          assert want * t * h * 4 <= bwd_lib.GROUP_ACC_BYTES
          assert 2 * want * t * h * 4 > bwd_lib.GROUP_ACC_BYTES


@pytest.mark.parametrize("h,t,s,kw,wgs", [
    (64, 16384, 16384, {}, 3),          # full 16k: 475 / 420 TFLOP/s
    (64, 4096, 4096, {}, 3),            # full 4k: 444.5 / 410.4 (run104)
    (64, 4095, 4096, {}, 2),            # one query row short
    (64, 16384, 4095, {}, 2),           # short keys
    (64, 16384, 16384, dict(is_causal=True), 3),  # 468.1 / 445.3
    (64, 16384, 16384, dict(local_window_size=(512, 512)), 2),
    (64, 8192, 8192, dict(is_causal=True), 3),  # 432.2 / 419.4 (run108)
    (64, 8191, 8192, dict(is_causal=True), 2),  # one query row short
    (64, 4096, 4096, dict(is_causal=True), 2),  # 373.4 / 388.2
    (64, 16384, 16384, dict(logits_soft_cap=20.0), 2),
    (64, 1024, 1024, {}, 2),            # 302.9 / 383.0
    (128, 16384, 16384, {}, 2),
], ids=["h64-16k", "h64-4k", "t-short", "s-short", "causal-16k",
        "window-16k", "causal-8k", "causal-t-short", "causal-4k", "soft-cap",
        "h64-1k", "h128-16k"])
def test_default_forward_picks_three_consumers_by_shape(h, t, s, kw, wgs):
  fwd = _plan((1, t, 2, h), (1, s, 2, h), **kw).fwd
  assert fwd.num_compute_wgs == wgs, fwd
  if wgs == 3:
    assert (fwd.consumer_regs, fwd.producer_regs, fwd.num_stages) == (
        160, 32, 3)
  else:
    # Two consumers: the shape-free tiling, with the Q buffer released
    # early at H = 64 up to EARLY_Q_MAX_LEN_H64 keys.
    assert fwd.early_q_release == (h <= 64
                                   and s <= fwd_lib.EARLY_Q_MAX_LEN_H64)
    assert (dataclasses.replace(fwd, early_q_release=False)
            == fwd_lib.default_fwd_config(h))


def test_lowers_default_three_consumer_forward():
  # The plan's three-consumer forward through the default path, with the
  # backward over the 384-row padding (lcm of the 192-row tile and 128).
  _lower(h=64, n=2, kh=2, b=1, t=16384)


def test_lowers_default_nondeterministic_backward(monkeypatch):
  # The plan's fused tiling lowers through the default path (no config):
  # full GQA 4:1 at T = 4096 (16384 query rows per dK/dV CTA).
  monkeypatch.setenv("XLA_FLAGS", "")
  # Forward + fused backward: two kernels (the deterministic plan: three).
  text = _lower(h=128, n=4, kh=1, t=4096).mlir_module()
  assert _mosaic_calls(text) == 2, _mosaic_calls(text)
  text = _lower(h=128, n=4, kh=1, t=4096, is_causal=True).mlir_module()
  assert _mosaic_calls(text) == 3, _mosaic_calls(text)


@pytest.mark.parametrize("case", ["f32", "bias", "h80", "h256_hv128",
                                  "dense_mask",
                                  "block_sparse", "per_head"])
def test_refuses_unsupported(case):
  dtype = jnp.float32 if case == "f32" else jnp.bfloat16
  h = 80 if case == "h80" else 64
  q = jnp.zeros((1, 64, 2, h), dtype)
  kw = {}
  if case == "h256_hv128":
    p, _ = make_problem(jnp.zeros((1, 64, 2, 256), dtype),
                        jnp.zeros((1, 64, 2, 256), dtype),
                        jnp.zeros((1, 64, 2, 128), dtype))
    with pytest.raises(NotImplementedError):
      pallas_mosaic.check_supported(p)
    return
  if case == "bias":
    kw["bias"] = jnp.zeros((64, 64), dtype)
  if case == "dense_mask":
    kw["mask"] = jnp.ones((64, 64), bool)
  if case == "block_sparse":
    kw["mask"] = masks.BlockSparse(np.ones((1, 1), bool), (64, 64))
  if case == "per_head":
    kw["mask"] = masks.BlockSparse(np.ones((2, 1, 1), bool), (64, 64))
  p, _ = make_problem(q, q, q, **kw)
  with pytest.raises(NotImplementedError):
    pallas_mosaic.check_supported(p)


def test_needs_hopper_here():
  if pallas_mosaic._on_hopper():  # pylint: disable=protected-access
    pytest.skip("running on a Hopper GPU")
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  p, _ = make_problem(q, q, q)
  with pytest.raises(NotImplementedError, match="sm_90"):
    pallas_mosaic.mosaic_gpu_attention(p)


def test_block_ranges():
  kinds = np.array([[2, 1, 0, 0],
                    [2, 2, 1, 0],
                    [0, 0, 0, 0],
                    [1, 2, 2, 1],
                    [1, 0, 1, 0]])
  got = fwd_lib.kv_block_ranges(kinds)
  want = np.array([[0, 0, 1, 2],
                   [0, 0, 2, 3],
                   [0, 0, 0, 0],
                   [0, 1, 3, 4],
                   [0, 0, 0, 3]]).T
  np.testing.assert_array_equal(got, want)
