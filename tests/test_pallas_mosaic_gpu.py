"""pallas_mosaic_gpu against the reference on an H100 (``pytest -m gpu``).

The shared ``SoftmaxSuite`` runs float32 at head dims 16-80, which this
backend refuses by design (it raises NotImplementedError so dispatch falls
back), so this file runs the same checks (forward, log-sum-exp and the VJP
under random cotangents, via ``softmax_suite.check_against_reference``) in
bfloat16/float16 at head dims 64, 128 and 256 with T and S in the hundreds to
thousands, plus determinism and NaN checks. CPU CI skips every test here
(see conftest); ``tests/test_pallas_mosaic_lowering.py`` covers CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, testing
from attnjax.softmax import pallas_mosaic
from attnjax.softmax.api import dot_product_attention
from attnjax.softmax.problem import make_problem
from softmax_suite import BF16, F16, _key, check_against_reference

pytestmark = pytest.mark.gpu


def impl(problem):
  return pallas_mosaic.mosaic_gpu_attention(problem)


def check(inp, **kw):
  return check_against_reference(impl, inp, **kw)


def inputs(name, *, t=300, s=None, n=4, kh=2, h=64, b=2, dtype=BF16):
  return testing.attention_inputs(_key(name, t, s, n, kh, h), batch=b,
                                  q_len=t, kv_len=s, num_heads=n,
                                  num_kv_heads=kh, head_dim=h, dtype=dtype)


class TestMosaicGPU:
  """The softmax suite's cases at sizes and dtypes the kernels serve."""

  @pytest.mark.parametrize("h", [64, 128])
  @pytest.mark.parametrize("n,kh", [(4, 4), (4, 2), (6, 1)])
  @pytest.mark.parametrize("t,s", [(384, 384), (190, 450), (640, 230)])
  def test_shapes_gqa(self, h, n, kh, t, s):
    check(inputs("shapes", t=t, s=s, n=n, kh=kh, h=h), dtype=BF16)

  @pytest.mark.parametrize("causal", [False, True])
  @pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
  def test_dtypes(self, causal, dtype):
    check(inputs("dt", h=128, dtype=dtype), dtype=dtype, is_causal=causal)

  def test_long_causal(self):
    check(inputs("long", b=1, t=2048, n=4, kh=1, h=128), dtype=BF16,
          is_causal=True)

  @pytest.mark.parametrize("kw", [
      dict(is_causal=True),
      dict(local_window_size=(50, 30)),
      dict(local_window_size=40),
      dict(is_causal=True, local_window_size=(70, 0)),
      dict(mask=masks.Causal(offset=80)),
      dict(mask=masks.ChunkedCausal(100)),
      dict(mask=(masks.LocalWindow(60, 0) | masks.Prefix(3))
           & masks.Causal()),
  ], ids=lambda kw: ",".join(kw))
  def test_static_masks(self, kw):
    check(inputs("static", t=450, s=530), dtype=BF16, **kw)

  def test_segment_ids_self(self):
    seg = testing.random_segment_ids(_key("ids"), 2, 470, 4)
    check(inputs("seg", t=470), dtype=BF16, arrays={"segment_ids": seg},
          is_causal=True)

  def test_segment_ids_cross(self):
    qs = testing.random_segment_ids(_key("qi"), 2, 230, 3)
    ks = testing.random_segment_ids(_key("ki"), 2, 410, 3)
    check(inputs("segx", t=230, s=410), dtype=BF16,
          arrays={"segment_ids": (qs, ks)})

  def test_segment_ids_causal_diag_case(self):
    # The first H100 run's failure (docs/dev/gpu-runs/run2-diag-features.log).
    seg = testing.random_segment_ids(jax.random.key(2), 2, 777, 3)
    check(inputs("segc", t=777, n=6, kh=3, h=64), dtype=BF16,
          arrays={"segment_ids": seg}, is_causal=True)

  @pytest.mark.parametrize("h", [64, 128])
  @pytest.mark.parametrize("kw", [
      dict(is_causal=True),
      dict(local_window_size=(300, 0)),
      dict(local_window_size=(100, 60)),
      dict(is_causal=True, local_window_size=(200, 0)),
  ], ids=["causal", "window_left", "window_sym", "causal_window"])
  def test_segment_ids_with_masks(self, h, kw):
    seg = testing.random_segment_ids(_key("segm", h), 2, 900, 4)
    check(inputs("segm", t=900, h=h), dtype=BF16,
          arrays={"segment_ids": seg}, **kw)

  @pytest.mark.parametrize("causal", [False, True])
  def test_segment_ids_with_lengths(self, causal):
    seg = testing.random_segment_ids(_key("segl"), 2, 777, 3)
    arrays = {"segment_ids": seg,
              "q_lengths": jnp.array([777, 500], jnp.int32),
              "kv_lengths": jnp.array([600, 777], jnp.int32)}
    out, _ = check(inputs("segl", t=777, h=128), dtype=BF16, arrays=arrays,
                   is_causal=causal)
    np.testing.assert_array_equal(np.asarray(out[1, 500:], np.float32), 0.0)

  @pytest.mark.parametrize("persistent,num_ctas", [(True, 7), (False, 0)])
  def test_forward_grids(self, persistent, num_ctas):
    # Few persistent CTAs walk many tiles each; or one CTA per tile.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    cfg = fwd_lib.FwdConfig(persistent=persistent, num_ctas=num_ctas)
    seg = testing.random_segment_ids(_key("grid"), 2, 1500, 5)
    check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("grid", t=1500, n=4, kh=2, h=128), dtype=BF16,
        arrays={"segment_ids": seg}, is_causal=True)

  @pytest.mark.parametrize("causal", [False, True])
  def test_query_blocks_128(self, causal):
    # FwdConfig(block_q=128, block_kv=64) at H = 64 (mosaic_check variant
    # bq128kv64, opt-in): 128 query rows a consumer, two 64-row wgmma
    # halves in flight at once (asynchronous here; the CPU interpreter runs
    # them synchronously). Few persistent CTAs; lengths cut tiles.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    cfg = fwd_lib.FwdConfig(block_q=128, block_kv=64, num_stages=4,
                            num_ctas=7)
    seg = testing.random_segment_ids(_key("bq128"), 2, 1500, 5)
    check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("bq128", t=1500, n=4, kh=2, h=64), dtype=BF16,
        arrays={"segment_ids": seg,
                "q_lengths": jnp.array([1500, 1100], jnp.int32),
                "kv_lengths": jnp.array([900, 1500], jnp.int32)},
        is_causal=causal)

  @pytest.mark.parametrize("block_kv,stages,causal",
                           [(128, 3, True), (64, 4, False)])
  def test_three_consumer_warpgroups(self, block_kv, stages, causal):
    # The wg3 / wg3kv64 variants of scripts/gpu/mosaic_check.py (H = 64):
    # the ping-pong barrier handed round three consumers, with wgmma
    # running asynchronously (the CPU interpreter runs it synchronously).
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    cfg = fwd_lib.FwdConfig(block_kv=block_kv, num_stages=stages,
                            num_compute_wgs=3, consumer_regs=160,
                            producer_regs=32)
    seg = testing.random_segment_ids(_key("wg3"), 2, 1500, 5)
    check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("wg3", t=1500, n=4, kh=2, h=64), dtype=BF16,
        arrays={"segment_ids": seg}, is_causal=causal)

  @pytest.mark.parametrize("causal,early", [(False, False), (True, False),
                                            (False, True)])
  def test_four_consumer_warpgroups(self, causal, early):
    # The wg4 / wg4e variants of scripts/gpu/mosaic_check.py (H = 64, 64-key
    # blocks, 112 registers a consumer): the ping-pong barrier handed round
    # four consumers with asynchronous wgmma, 256-row tiles, 7 persistent
    # CTAs over many tiles, lengths that cut tiles and leave some empty;
    # forward and gradients.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    cfg = fwd_lib.FwdConfig(block_kv=64, num_stages=4, num_compute_wgs=4,
                            consumer_regs=112, producer_regs=24, num_ctas=7,
                            early_q_release=early)
    seg = testing.random_segment_ids(_key("wg4", causal), 2, 1500, 5)
    out, _ = check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("wg4", t=1500, n=4, kh=2, h=64), dtype=BF16,
        arrays={"segment_ids": seg,
                "q_lengths": jnp.array([1500, 1100], jnp.int32),
                "kv_lengths": jnp.array([0, 1500], jnp.int32)},
        is_causal=causal)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)

  @pytest.mark.parametrize("h,causal", [(64, False), (64, True),
                                         (128, True)])
  def test_overlap_epilogue(self, h, causal):
    # FwdConfig(overlap_epilogue=True): the next tile's first Q K^T in
    # flight under this tile's epilogue (asynchronous wgmma here; the CPU
    # interpreter runs it synchronously). Few persistent CTAs, many tiles
    # each; query and key lengths make tiles with no block.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    base = fwd_lib.default_fwd_config(h)
    cfg = dataclasses.replace(base, q_buffers=2, overlap_epilogue=True,
                              num_ctas=7)
    seg = testing.random_segment_ids(_key("ovl", h), 2, 1500, 5)
    out, _ = check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("ovl", t=1500, n=4, kh=2, h=h), dtype=BF16,
        arrays={"segment_ids": seg,
                "q_lengths": jnp.array([1500, 1100], jnp.int32),
                "kv_lengths": jnp.array([0, 1500], jnp.int32)},
        is_causal=causal)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)

  @pytest.mark.parametrize("h,causal", [(256, False), (256, True),
                                         (128, True), (64, False),
                                         (64, True)])
  def test_early_q_release(self, h, causal):
    # FwdConfig(early_q_release=True): the Q buffer handed back after a
    # tile's last Q K^T while its last P V runs asynchronously (the CPU
    # interpreter runs wgmma synchronously), the next Q loaded under it,
    # O out through the consumers' SMEM slots. Few persistent CTAs, many
    # tiles each; lengths make tiles with no block.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    base = fwd_lib.default_fwd_config(h)
    cfg = dataclasses.replace(base, early_q_release=True, num_ctas=7)
    # (At H = 256 segment ids leave no room for O's slots: the kernel
    # then runs without the early release, so none here.)
    arrays = {} if h == 256 else {
        "segment_ids": testing.random_segment_ids(_key("eqr", h), 2, 1500,
                                                  5)}
    out, _ = check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("eqr", t=1500, n=4, kh=2, h=h), dtype=BF16,
        arrays={**arrays,
                "q_lengths": jnp.array([1500, 1100], jnp.int32),
                "kv_lengths": jnp.array([0, 1500], jnp.int32)},
        is_causal=causal)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)

  @pytest.mark.parametrize("h,causal,early", [(64, False, True),
                                              (64, True, True),
                                              (64, True, False),
                                              (128, False, False),
                                              (256, False, True)])
  def test_no_auto_barriers(self, h, causal, early):
    # FwdConfig(no_auto_barriers=True) (opt-in; mosaic_check.py's "nabdef",
    # "serialnab"): Pallas inserts no SMEM barriers of its own, so the
    # kernel's waits must order every reuse of an SMEM buffer (O's slots
    # after their TMA stores, the Q buffer after its output, the LSE
    # buffer). Few persistent CTAs, many tiles each; lengths make tiles
    # with no block; forward and gradients.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    cfg = dataclasses.replace(fwd_lib.default_fwd_config(h, causal),
                              early_q_release=early, num_ctas=7,
                              no_auto_barriers=True)
    arrays = {} if h == 256 else {
        "segment_ids": testing.random_segment_ids(_key("nab", h), 2, 1500,
                                                  5)}
    kw = dict(sinks=jax.random.normal(_key("nabk"), (4,)),
              logits_soft_cap=5.0) if h == 256 else {}
    out, _ = check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs(f"nab{h}", t=1500, n=4, kh=2, h=h), dtype=BF16,
        arrays={**arrays,
                "q_lengths": jnp.array([1500, 1100], jnp.int32),
                "kv_lengths": jnp.array([0, 1500], jnp.int32)},
        is_causal=causal, **kw)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)

  @pytest.mark.parametrize("case", ["h128", "h64_fused", "h256",
                                    "sinks_cap"])
  def test_former_step_forms(self, monkeypatch, case):
    # The step forms that were the defaults before run77 and stay as
    # switches for timing (mosaic_gpu._L_PARTIAL, mosaic_gpu_bwd._DP_INIT
    # and _DQ_TURN; mosaic_check.py variant "oldforms"), forward and
    # gradients, with asynchronous wgmma (the CPU interpreter runs it
    # synchronously).
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    from pallas_kernels.flash import mosaic_gpu_bwd as bwd_lib  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(fwd_lib, "_L_PARTIAL", False)
    monkeypatch.setattr(bwd_lib, "_DP_INIT", "zero")
    monkeypatch.setattr(bwd_lib, "_DQ_TURN", "static")
    seg = testing.random_segment_ids(_key("pf", case), 2, 1300, 4)
    bwd = bwd_lib.BwdConfig(fused_dq=True) if case == "h64_fused" else None
    impl = lambda p: pallas_mosaic.mosaic_attention(p, bwd_config=bwd)
    kw = {"h128": dict(arrays={"segment_ids": seg}, is_causal=True),
          "h64_fused": dict(is_causal=True),
          "h256": dict(),
          "sinks_cap": dict(sinks=jax.random.normal(_key("pfk"), (4,)),
                            logits_soft_cap=5.0,
                            arrays={"kv_lengths": jnp.array([1300, 777],
                                                            jnp.int32)})}
    h = {"h128": 128, "h256": 256}.get(case, 64)
    check_against_reference(impl, inputs(f"pf{case}", t=1300, n=4, kh=2, h=h),
                            dtype=BF16, **kw[case])

  @pytest.mark.parametrize("case", ["h64", "h128_causal", "h256_sinks",
                                    "h64_early", "h64_early_nab"])
  def test_serial_turn_forward(self, monkeypatch, case):
    # mosaic_gpu._SERIAL_TURN (opt-in; mosaic_check.py variant
    # "serialturn"): P V waited for inside the consumer's turn, as
    # tokamax's sm90 forward does; forward and gradients (the backward
    # reads the forward's LSE). "h64_early": with the early Q release
    # (the default at H = 64 up to 1k keys; mosaic_check's "serialturn"
    # there), few CTAs; "h64_early_nab" also without automatic SMEM
    # barriers ("serialnab").
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(fwd_lib, "_SERIAL_TURN", True)
    if case.startswith("h64_early"):
      cfg = dataclasses.replace(fwd_lib.default_fwd_config(64),
                                early_q_release=True, num_ctas=7,
                                no_auto_barriers=case.endswith("nab"))
      out, _ = check_against_reference(
          lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
          inputs(f"st{case}", t=1000, n=4, kh=2, h=64), dtype=BF16,
          arrays={"q_lengths": jnp.array([1000, 700], jnp.int32),
                  "kv_lengths": jnp.array([0, 1000], jnp.int32)})
      np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
      return
    seg = testing.random_segment_ids(_key("st", case), 2, 1300, 4)
    kw = {"h64": dict(arrays={"segment_ids": seg}),
          "h128_causal": dict(is_causal=True),
          "h256_sinks": dict(sinks=jax.random.normal(_key("stk"), (4,)),
                             logits_soft_cap=5.0,
                             arrays={"kv_lengths": jnp.array([1300, 777],
                                                             jnp.int32)})}
    h = {"h128_causal": 128, "h256_sinks": 256}.get(case, 64)
    check_against_reference(pallas_mosaic.mosaic_attention,
                            inputs(f"st{case}", t=1300, n=4, kh=2, h=h),
                            dtype=BF16, **kw[case])

  @pytest.mark.parametrize("case", ["h64", "h64_causal", "h64_wg3",
                                    "h128_lengths"])
  def test_p_in_smem_forward(self, monkeypatch, case):
    # mosaic_gpu._P_SMEM (opt-in; mosaic_check.py variant "psmem"): P_j in
    # a two-slot SMEM ring so that the softmax runs under P_{j-1} V_{j-1};
    # forward and gradients (the backward reads the forward's LSE, which
    # then leaves from registers), with segment ids, causal, FA3's
    # three-consumer tile at 16k, and H = 128 with sequence lengths.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(fwd_lib, "_P_SMEM", True)
    if case == "h64_wg3":
      t = fwd_lib.WG3_MIN_LEN + 50
      inp = inputs("ps_wg3", b=1, t=t, n=2, kh=1, h=64)
      p, _ = make_problem(inp.q, inp.k, inp.v)
      assert pallas_mosaic.make_plan(p).fwd.num_compute_wgs == 3
      seg = testing.random_segment_ids(_key("ps_wg3s"), 1, t, 3)
      kw = dict(arrays={"segment_ids": seg})
    elif case == "h128_lengths":
      inp = inputs("ps_h128", t=1300, n=4, kh=2, h=128)
      kw = dict(is_causal=True,
                arrays={"q_lengths": jnp.array([1300, 777], jnp.int32),
                        "kv_lengths": jnp.array([1000, 1300], jnp.int32)})
    else:
      inp = inputs(f"ps{case}", t=1300, n=4, kh=2, h=64)
      seg = testing.random_segment_ids(_key("ps", case), 2, 1300, 4)
      kw = (dict(is_causal=True) if case == "h64_causal"
            else dict(arrays={"segment_ids": seg}))
    check_against_reference(pallas_mosaic.mosaic_gpu_attention, inp,
                            dtype=BF16, **kw)

  @pytest.mark.parametrize("case", ["h128_causal_lengths", "h64_segments",
                                    "h128_full_sms", "h256_causal_lengths",
                                    "h128_causal_lpt"])
  def test_persistent_dkv(self, case):
    # BwdConfig(persistent_dkv, persistent_dq) (the two-kernel default but
    # for masked GQA, whose dK/dV kernel keeps one CTA per tile;
    # mosaic_check.py variants "pdkv", "pdq", "pbwd"): both backward
    # kernels on persistent grids, one streamed ring across a CTA's items,
    # the resident tiles reloaded (and prefetched into L2) per item.
    # 5 CTAs for the small cases (several items each); "h128_full_sms"
    # one per SM at T = 1k, the shape it is for; "h128_causal_lpt" the
    # items heaviest first over all heads (lpt_schedule).
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top
    ctas = 0 if case == "h128_full_sms" else 5
    h = {"h64_segments": 64, "h256_causal_lengths": 256}.get(case, 128)
    cfg = dataclasses.replace(mosaic_gpu_bwd.default_bwd_config(h),
                              persistent_dkv=True, persistent_dq=True,
                              num_ctas=ctas,
                              lpt_schedule=case == "h128_causal_lpt")
    kw = dict(dtype=BF16)
    if case in ("h128_causal_lengths", "h256_causal_lengths",
                "h128_causal_lpt"):
      # (H = 256: the split-head dK/dV kernel's persistent form.)
      inp = inputs(f"pdkv1{h}", t=1300, n=4, kh=2, h=h)
      kw.update(is_causal=True, arrays={
          "q_lengths": jnp.array([1300, 777], jnp.int32),
          "kv_lengths": jnp.array([1000, 1300], jnp.int32)})
    elif case == "h64_segments":
      inp = inputs("pdkv2", t=1300, n=4, kh=4, h=64)
      kw.update(arrays={"segment_ids": testing.random_segment_ids(
          _key("pdkv2s"), 2, 1300, 4)}, local_window_size=(300, 100))
    else:
      inp = inputs("pdkv3", b=8, t=1024, n=16, kh=16, h=128)
    check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, bwd_config=cfg), inp,
        **kw)

  @pytest.mark.parametrize("stages,causal", [(3, False), (2, True)])
  def test_key_blocks_192(self, stages, causal):
    # FwdConfig(block_kv=192) at H = 64 (variants kv192 / kv192s2 of
    # scripts/gpu/mosaic_check.py): T and S not multiples of 192, with
    # segment ids and key lengths.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    cfg = fwd_lib.FwdConfig(block_kv=192, num_stages=stages)
    seg = testing.random_segment_ids(_key("kv192"), 2, 1300, 4)
    check_against_reference(
        lambda p: pallas_mosaic.mosaic_attention(p, fwd_config=cfg),
        inputs("kv192", t=1300, n=4, kh=2, h=64), dtype=BF16,
        arrays={"segment_ids": seg,
                "kv_lengths": jnp.array([1300, 777], jnp.int32)},
        is_causal=causal)

  @pytest.mark.parametrize("causal", [False, True])
  def test_head_dim_256_forward(self, causal):
    inp = inputs("h256", t=700, s=900 if not causal else 700, h=256)
    p, _ = make_problem(inp.q, inp.k, inp.v, is_causal=causal)
    out, lse = pallas_mosaic.mosaic_attention(p, need_backward=False)
    up = lambda x: x.astype(jnp.float32)
    p32, _ = make_problem(up(inp.q), up(inp.k), up(inp.v), is_causal=causal)
    from attnjax.softmax import xla  # pylint: disable=g-import-not-at-top
    out_r, lse_r = xla.xla_attention(p32)
    testing.assert_close(out, out_r, BF16, name="out")
    testing.assert_close(lse, lse_r, BF16, name="lse")

  @pytest.mark.parametrize("causal", [False, True])
  def test_head_dim_256_gradients(self, causal):
    # Split-head dK/dV (two consumers exchange P^T and dS^T through SMEM)
    # and 32-key dQ blocks, with GQA, segment ids and key lengths.
    t = 700
    seg = testing.random_segment_ids(_key("h256gs"), 2, t, 3)
    check(inputs("h256g", t=t, n=4, kh=2, h=256), dtype=BF16,
          arrays={"segment_ids": seg,
                  "kv_lengths": jnp.array([t, 530], jnp.int32)},
          is_causal=causal)

  def test_seq_lengths(self):
    arrays = {"q_lengths": jnp.array([330, 200], jnp.int32),
              "kv_lengths": jnp.array([170, 400], jnp.int32)}
    out, _ = check(inputs("len", t=330, s=400), dtype=BF16, arrays=arrays)
    np.testing.assert_array_equal(np.asarray(out[1, 200:], np.float32), 0.0)

  def test_zero_kv_length(self):
    arrays = {"kv_lengths": jnp.array([0, 150], jnp.int32)}
    out, lse = check(inputs("len0", t=200), dtype=BF16, arrays=arrays)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[0])))

  def test_sinks(self):
    sinks = jax.random.normal(_key("s"), (4,)) * 2
    check(inputs("sinks", h=128), dtype=BF16, sinks=sinks, is_causal=True)

  def test_soft_cap(self):
    check(inputs("cap"), dtype=BF16, logits_soft_cap=2.5,
          local_window_size=(90, 20))

  def test_everything_at_once(self):
    inp = inputs("all", t=510, n=6, kh=3, h=128)
    seg = testing.random_segment_ids(_key("alls"), 2, 510, 3)
    sinks = jax.random.normal(_key("allk"), (6,))
    check(inp, dtype=BF16, sinks=sinks, logits_soft_cap=5.0,
          arrays={"segment_ids": seg,
                  "kv_lengths": jnp.array([510, 400], jnp.int32)},
          is_causal=True, local_window_size=(200, 0))

  def test_fully_masked_rows_are_zero(self):
    inp = inputs("empty", t=240)
    qs = jnp.zeros((2, 240), jnp.int32).at[0, :100].set(7)
    ks = jnp.zeros((2, 240), jnp.int32)
    p, _ = make_problem(inp.q, inp.k, inp.v, segment_ids=(qs, ks))
    out, lse = impl(p)
    np.testing.assert_array_equal(np.asarray(out[0, :100], np.float32), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[0, :, :100])))

    def loss(q, k, v):
      p, _ = make_problem(q, k, v, segment_ids=(qs, ks))
      o, _ = impl(p)
      return jnp.sum(o.astype(jnp.float32) * inp.d_out.astype(jnp.float32))

    dq, dk, dv = jax.grad(loss, (0, 1, 2))(inp.q, inp.k, inp.v)
    testing.assert_finite((dq, dk, dv), "grads")
    np.testing.assert_array_equal(np.asarray(dq[0, :100], np.float32), 0.0)
    check(inp, dtype=BF16, arrays={"segment_ids": (qs, ks)})

  def test_fully_masked_with_sinks(self):
    qs = jnp.zeros((2, 160), jnp.int32).at[1, 30:80].set(5)
    sinks = jnp.linspace(-1.0, 1.0, 4)
    check(inputs("emptys", t=160), dtype=BF16, sinks=sinks,
          arrays={"segment_ids": (qs, jnp.zeros((2, 160), jnp.int32))})

  def test_large_logits(self):
    inp = inputs("large", t=310)
    big = testing.AttentionInputs((inp.q.astype(jnp.float32) * 10).astype(
        BF16), (inp.k.astype(jnp.float32) * 10).astype(BF16), inp.v,
                                  inp.d_out)
    # Logits reach ~1e3: finite, and as close as bf16 logits allow.
    _, lse = check(big, dtype=BF16, is_causal=True, grads=False, scale=1e3)
    assert float(jnp.max(jnp.abs(lse))) > 1e2

  def test_determinism_and_no_nan(self):
    inp = inputs("det", t=700, n=4, kh=2, h=128)

    @functools.partial(jax.jit, static_argnames="causal")
    def f(q, k, v, do, causal):
      def g(q, k, v):
        return impl(make_problem(q, k, v, is_causal=causal)[0])[0]
      out, vjp = jax.vjp(g, q, k, v)
      return out, vjp(do)

    for causal in (False, True):
      a = f(inp.q, inp.k, inp.v, inp.d_out, causal)
      b = f(inp.q, inp.k, inp.v, inp.d_out, causal)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      testing.assert_finite(a, "out and grads")

  def test_dispatch_selects_it(self):
    inp = inputs("disp", h=128)
    got = dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                implementation="pallas")
    want = dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                 implementation="pallas_mosaic_gpu")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class TestMosaicGPUFusedBackward:
  """The FA3 backward (dQ reduced inside the dK/dV kernel)."""

  @staticmethod
  def impl(problem):
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top
    return pallas_mosaic.mosaic_attention(
        problem, bwd_config=mosaic_gpu_bwd.BwdConfig(fused_dq=True))

  @pytest.mark.parametrize("h", [64, 128])
  @pytest.mark.parametrize("causal", [False, True])
  def test_gqa_ragged(self, h, causal):
    check_against_reference(self.impl, inputs("fused", t=450, s=390, h=h),
                            dtype=BF16, is_causal=causal)

  @pytest.mark.parametrize("causal", [False, True])
  def test_staggered(self, causal):
    # BwdConfig(stagger_q=True) (opt-in): key tiles start their unmasked
    # query blocks at offsets of their own.
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(fused_dq=True,
                                                       stagger_q=True))
    check_against_reference(impl, inputs("fused_st", t=1100, n=4, kh=2,
                                         h=128),
                            dtype=BF16, is_causal=causal)

  @pytest.mark.parametrize("layout", ["nth", "nct"])
  @pytest.mark.parametrize("h", [64, 128])
  def test_dq_layouts(self, layout, h):
    # The float32 dQ accumulator head-major ("nth") or in contiguous
    # per-consumer column blocks ("nct"), converted back after the kernel:
    # GQA with ragged lengths, causal, forward and gradients.
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(fused_dq=True,
                                                       dq_layout=layout))
    check_against_reference(impl, inputs(f"fused_{layout}", t=450, s=390,
                                         n=6, kh=2, h=h),
                            dtype=BF16, is_causal=True)

  @pytest.mark.parametrize("h", [64, 128])
  def test_early_release(self, h):
    # BwdConfig(early_release=True): Q and dO slots freed after the dQ
    # product, before the reduce-add (the producer's next loads overwrite
    # them while the step's dQ is still being stored).
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(
              fused_dq=True, early_release=True))
    check_against_reference(impl, inputs(f"fused_el{h}", t=1100, n=4,
                                         kh=2, h=h),
                            dtype=BF16, is_causal=True)

  @pytest.mark.parametrize("h,layout", [(64, "tnh"), (128, "tnh"),
                                        (128, "nct")])
  def test_dq_evict_last(self, h, layout):
    # BwdConfig(dq_evict_last=True): the dQ reduce-add emitted through
    # inline Mosaic GPU with an L2 cache policy (its coordinates computed
    # there, not by Pallas).
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(
              fused_dq=True, dq_evict_last=True, dq_layout=layout))
    check_against_reference(impl, inputs(f"fused_ev{h}{layout}", t=1100,
                                         n=4, kh=2, h=h),
                            dtype=BF16, is_causal=True)

  @pytest.mark.parametrize("h,layout,ahead,every", [(64, "tnh", 0, 1),
                                                    (128, "tnh", 2, 1),
                                                    (128, "nct", 1, 1),
                                                    (128, "tnh", 1, 4)])
  def test_dq_prefetch(self, h, layout, ahead, every):
    # BwdConfig(dq_prefetch): the producer's TMA prefetches of the dQ
    # accumulator rows into L2 (a no-op in the CPU interpreter).
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(
              fused_dq=True, dq_prefetch=ahead, dq_layout=layout,
              dq_prefetch_every=every))
    check_against_reference(impl, inputs(f"fused_pf{h}{layout}", t=1100,
                                         n=4, kh=2, h=h),
                            dtype=BF16, is_causal=True)

  @pytest.mark.parametrize("h,kh,group", [(128, 2, 1), (128, 1, 1),
                                          (64, 2, 2)])
  def test_dq_head_group(self, h, kh, group):
    # BwdConfig(dq_head_group): a launch per group of (batch, K/V head)
    # pairs into its own accumulator (B = 2: four launches of one K/V head,
    # two of a whole batch entry (GQA 4:1), one of both).
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(
              fused_dq=True, dq_head_group=group))
    check_against_reference(impl, inputs(f"fused_hg{h}{kh}", t=1100, n=4,
                                         kh=kh, h=h),
                            dtype=BF16, is_causal=True)

  @pytest.mark.parametrize("h,stages", [(64, 2), (128, 3)])
  def test_one_ds_buffer(self, h, stages):
    # BwdConfig(ds_buffers=1): one dS^T buffer behind a second consumer
    # join per step (wgmma reads it asynchronously here, unlike in the
    # CPU interpreter), at H = 128 with a third Q/dO stage.
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top

    def impl(problem):
      return pallas_mosaic.mosaic_attention(
          problem, bwd_config=mosaic_gpu_bwd.BwdConfig(
              fused_dq=True, ds_buffers=1, num_stages=stages))
    check_against_reference(impl, inputs(f"fused_1ds{h}", t=1100, n=4,
                                         kh=2, h=h),
                            dtype=BF16, is_causal=True)

  @pytest.mark.parametrize("h,t,n,kh,causal,group", [
      (128, 2050, 4, 1, False, None), (128, 8200, 2, 2, True, None),
      (128, 8200, 8, 8, False, 4), (64, 4100, 4, 4, True, 16),
      (64, 8200, 2, 2, True, 8), (64, 4100, 4, 1, True, None)])
  def test_default_without_determinism_flags(self, monkeypatch, h, t, n, kh,
                                             causal, group):
    # XLA_FLAGS without --xla_gpu_deterministic_ops: the default plan takes
    # the fused backward (default_bwd_config): in one launch for full GQA
    # 4:1 at T = 2050 and causal MHA at 8200; launched per group of heads
    # for MHA from T = 2k (two launches of 4 heads at 8200 full, H = 128;
    # one of 4 at 4100 causal, H = 64, and masked from 8k at H = 64); at
    # H = 64 GQA in one launch from 16k query rows a CTA (4:1, 4100).
    # conftest sets the flag for the rest.
    monkeypatch.setenv("XLA_FLAGS", "")
    inp = inputs(f"fused_default{h}_{t}", b=1, t=t, n=n, kh=kh, h=h)
    p, _ = make_problem(inp.q, inp.k, inp.v, is_causal=causal)
    bwd = pallas_mosaic.make_plan(p).bwd
    assert bwd.fused_dq and bwd.dq_head_group == group
    check_against_reference(pallas_mosaic.mosaic_gpu_attention, inp,
                            dtype=BF16, is_causal=causal)

  @pytest.mark.parametrize("case", ["full_segments", "causal"])
  def test_default_three_consumer_forward(self, case):
    # H = 64 at T = S >= 4k without a mask (>= 8k under a causal one):
    # the default plan's forward runs three consumer warpgroups (the
    # backward the 384-row padding), with segment ids or causal, forward
    # and gradients.
    from pallas_kernels.flash import mosaic_gpu as fwd_lib  # pylint: disable=g-import-not-at-top
    causal = case == "causal"
    t = (fwd_lib.WG3_MIN_LEN_MASKED if causal else fwd_lib.WG3_MIN_LEN) + 50
    inp = inputs(f"wg3_default_{case}", b=1, t=t, n=2, kh=1, h=64)
    p, _ = make_problem(inp.q, inp.k, inp.v, is_causal=causal)
    assert pallas_mosaic.make_plan(p).fwd.num_compute_wgs == 3
    if causal:
      kw = dict(is_causal=True)
    else:
      kw = dict(arrays={"segment_ids": testing.random_segment_ids(
          _key("wg3d"), 1, t, 3)})
    check_against_reference(pallas_mosaic.mosaic_gpu_attention, inp,
                            dtype=BF16, **kw)

  def test_everything_at_once(self):
    inp = inputs("fused_all", t=510, n=6, kh=3, h=128)
    seg = testing.random_segment_ids(_key("falls"), 2, 510, 3)
    sinks = jax.random.normal(_key("fallk"), (6,))
    check_against_reference(
        self.impl, inp, dtype=BF16, sinks=sinks, logits_soft_cap=5.0,
        arrays={"segment_ids": seg,
                "kv_lengths": jnp.array([510, 400], jnp.int32)},
        is_causal=True, local_window_size=(200, 0))
