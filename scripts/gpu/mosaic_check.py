"""Checks and times the Pallas Mosaic GPU attention kernels on one GPU.

Run from the repository root on an H100 (jax 0.11.2, CUDA, no network), e.g.::

    PYTHONPATH=$PWD python3 scripts/gpu/mosaic_check.py \
        --sections smoke,correct --budget 500
    PYTHONPATH=$PWD python3 scripts/gpu/mosaic_check.py --sections time \
        --configs "128:1024:*:*,128:4096:*:*" --budget 500

Each section runs in its own subprocess with a timeout, so a kernel that
hangs (a barrier deadlock) or crashes costs only its section; results go to
``$OUT/mosaic_check.jsonl`` (or ./mosaic_check_out/) one record at a time
(partial runs keep what finished) and a summary table is printed last
(``--summary a.jsonl b.jsonl`` reprints the merged table of several runs).
Sections:

* ``smoke``: one tiny causal forward, then forward + backward.
* ``correct``: forward, lse and gradients (q, k, v, sinks) against autodiff of
  the float32 reference (``pallas_kernels.flash.reference``) for the common
  path (bf16/f16, H 64/128/256, causal/full, MHA/GQA/MQA, ragged T/S) and
  every feature (windows, chunked/prefix/offset masks, segment ids alone and
  with causal / windows / lengths, lengths, sinks, soft cap, fully masked
  rows, large logits), with determinism and NaN checks. ``--cases a,b`` runs
  the cases whose names contain a or b.
* ``time``: grid points (B*T = 16384, N*H = 2048; ``--configs
  H:T:causal|full:mha|gqa,...`` with ``*`` wildcards, default the whole grid
  of H 64/128/256, T 1k/4k/16k, causal and full, MHA and GQA 16:4),
  forward and forward+backward TFLOP/s of our kernels (``--variants``, default
  ``ours``) next to cuDNN (``jax.nn.dot_product_attention``) and tokamax
  "mosaic". Each function compiles once and is timed with few repetitions.
  ``time128``/``time64``/``time256`` are the per-head-dim slices.
* ``tune``: our variants only (persistent vs not, one Q buffer, no ping-pong,
  3 stages, 64-key blocks, fused backward; with ``--variants`` also the
  backward tilings bqdkv128, bkvdq128, bqdq128, bst3) at a few grid points.

Options: ``--budget SECONDS`` (default 540) total wall time after which the
remaining sections are skipped, ``--no-tokamax``, ``--no-cudnn``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import functools
import traceback
import zlib

SECTIONS = {  # per-section timeout (seconds), also cut by --budget
    "smoke": 180,
    "correct": 540,
    "time": 540,
    "time128": 540,
    "time64": 540,
    "time256": 540,
    "tune": 540,
}


def out_dir():
  d = os.environ.get("OUT") or os.path.join(os.getcwd(), "mosaic_check_out")
  os.makedirs(d, exist_ok=True)
  return d


def record(**kw):
  kw["ts"] = round(time.time(), 1)
  with open(os.path.join(out_dir(), "mosaic_check.jsonl"), "a") as f:
    f.write(json.dumps(kw) + "\n")
  print("  " + json.dumps(kw), flush=True)


# ---------------------------------------------------------------------------
# Helpers that run inside a section subprocess.


def _imports():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax, jnp


def _inputs(key, b, t, s, n, kh, h, dtype):
  jax, jnp = _imports()
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, h), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, n, h), jnp.float32).astype(dtype)
  dlse = jax.random.normal(ks[4], (b, n, t), jnp.float32)
  return q, k, v, do, dlse


def _attn_fn(impl, kw, arrays):
  """(q, k, v, sinks) -> (out, lse) through make_problem and a backend."""
  from attnjax.softmax.problem import make_problem  # pylint: disable=g-import-not-at-top

  def f(q, k, v, sinks):
    p, _ = make_problem(q, k, v, sinks=sinks,
                        segment_ids=arrays.get("segment_ids"),
                        query_seq_lengths=arrays.get("q_lengths"),
                        key_value_seq_lengths=arrays.get("kv_lengths"), **kw)
    return impl(p)
  return f


def _err_ratio(a, e, dtype, grad, scale=None):
  """max |a-e| / (atol + rtol |e|) (<= 1 passes), NaN count, max abs err."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from attnjax import testing  # pylint: disable=g-import-not-at-top
  atol, rtol = testing.tolerance(dtype, grad=grad)
  a = np.asarray(a, np.float32)
  e = np.asarray(e, np.float32)
  s = 1.0 if scale is None else max(float(scale), 1.0)
  nan = int(np.isnan(a).sum())
  both_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
  with np.errstate(invalid="ignore"):
    err = np.where(both_inf, 0.0, np.abs(a - e))
    bound = atol * s + rtol * np.where(both_inf, 0.0, np.abs(e))
    ratio = float(np.nanmax(err / bound)) if err.size else 0.0
  return ratio, nan, float(np.nanmax(err)) if err.size else 0.0


def check_case(name, *, b=2, t=300, s=None, n=4, kh=2, h=64, dtype="bf16",
               grads=True, sinks=False, arrays=None, big=1.0, determinism=False,
               zero_rows=None, fused=False, **kw):
  """Forward + VJP of pallas_mosaic_gpu vs autodiff of the f32 reference."""
  jax, jnp = _imports()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from attnjax.softmax import pallas_mosaic, xla  # pylint: disable=g-import-not-at-top
  dt = {"bf16": jnp.bfloat16, "f16": jnp.float16}[dtype]
  s = s or t
  q, k, v, do, dlse = _inputs(jax.random.key(zlib.crc32(name.encode())), b, t, s,
                              n, kh, h, dt)
  if big != 1.0:
    q, k = (q.astype(jnp.float32) * big).astype(dt), (
        k.astype(jnp.float32) * big).astype(dt)
  sk = (jax.random.normal(jax.random.key(7), (n,)) * 2) if sinks else None
  arrays = arrays or {}
  impl = pallas_mosaic.mosaic_gpu_attention
  fwd_only = grads is None  # no custom VJP at all (e.g. H=256 forward)
  if fwd_only:
    impl = lambda p: pallas_mosaic.mosaic_attention(p, need_backward=False)
  if fused:
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top
    impl = lambda p: pallas_mosaic.mosaic_attention(
        p, bwd_config=mosaic_gpu_bwd.BwdConfig(fused_dq=True))
  if os.environ.get("MOSAIC_CHECK_DRY"):  # harness self-test off GPU
    from attnjax.softmax import xla_chunked  # pylint: disable=g-import-not-at-top
    impl = lambda p: xla_chunked.xla_chunked_attention(p, block_q=64,
                                                       block_kv=64)
  f = _attn_fn(impl, kw, arrays)
  fr = _attn_fn(xla.xla_attention, kw, arrays)
  up = lambda x: None if x is None else x.astype(jnp.float32)

  @jax.jit
  def run(q, k, v, sk, do, dlse):
    if fwd_only:
      o, l = f(q, k, v, sk)
      return o, l, None
    (o, l), vjp = jax.vjp(f, q, k, v, sk)
    dl = jnp.where(jnp.isfinite(l), dlse, 0.0)
    g = vjp((do, dl)) if grads else None
    return o, l, g

  @jax.jit
  def run_ref(q, k, v, sk, do, dlse):
    if fwd_only:
      o, l = fr(up(q), up(k), up(v), up(sk))
      return o, l, None
    (o, l), vjp = jax.vjp(fr, up(q), up(k), up(v), up(sk))
    dl = jnp.where(jnp.isfinite(l), dlse, 0.0)
    g = vjp((up(do), dl)) if grads else None
    return o, l, g

  t0 = time.time()
  o, l, g = jax.block_until_ready(run(q, k, v, sk, do, dlse))
  compile_s = time.time() - t0
  o_r, l_r, g_r = run_ref(q, k, v, sk, do, dlse)
  res = {}
  scale = 1e3 if big != 1.0 else None
  res["out"] = _err_ratio(o, o_r, dt, False, scale)
  res["lse"] = _err_ratio(l, l_r, dt, False, scale)
  if grads:
    for nm, a, e in zip(["dq", "dk", "dv", "dsinks"], g, g_r):
      if e is None:
        continue
      sc = float(jnp.max(jnp.abs(e))) if nm == "dsinks" else None
      res[nm] = _err_ratio(a, e, dt, True, sc)
  worst = max(r[0] for r in res.values())
  nans = sum(r[1] for r in res.values())
  extra = {}
  if zero_rows is not None:
    bi, r0, r1 = zero_rows
    extra["zero_rows_ok"] = bool(np.all(np.asarray(o[bi, r0:r1]) == 0))
  if determinism:
    o2, l2, g2 = run(q, k, v, sk, do, dlse)
    same = bool(np.array_equal(np.asarray(o), np.asarray(o2)))
    if grads:
      same = same and all(
          np.array_equal(np.asarray(x), np.asarray(y))
          for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g2)))
    extra["deterministic"] = same
  ok = worst <= 1.0 and nans == 0 and all(extra.values())
  record(section="correct", case=name, ok=ok, worst_ratio=round(worst, 3),
         nans=nans, compile_s=round(compile_s, 1),
         detail={k_: [round(x, 4) for x in v_] for k_, v_ in res.items()},
         **extra)
  return ok


def section_smoke(_):
  jax, jnp = _imports()
  from attnjax.softmax import pallas_mosaic  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  record(section="env", jax=jax.__version__, device=dev.device_kind,
         cc=getattr(dev, "compute_capability", None),
         hopper=pallas_mosaic._on_hopper())  # pylint: disable=protected-access
  # Forward alone first, so a hang in the backward is told apart.
  check_case("smoke_fwd_causal_h128", b=1, t=256, n=2, kh=2, h=128,
             is_causal=True, grads=False)
  check_case("smoke_fwdbwd_causal_h128", b=1, t=256, n=2, kh=2, h=128,
             is_causal=True)


def section_correct(args):
  jax, jnp = _imports()
  from attnjax import masks, testing  # pylint: disable=g-import-not-at-top
  cases = [
      ("h64_mha_causal", dict(h=64, n=4, kh=4, is_causal=True,
                              determinism=True)),
      ("h128_gqa_full", dict(h=128, n=4, kh=2, determinism=True)),
      ("h128_mqa_causal_ragged", dict(h=128, n=6, kh=1, t=190, s=450,
                                      is_causal=True)),
      ("h64_full_ragged", dict(h=64, t=640, s=230)),
      ("h128_f16_causal", dict(h=128, dtype="f16", is_causal=True)),
      ("h64_f16_gqa_full", dict(h=64, dtype="f16", n=4, kh=1)),
      ("h128_long_causal", dict(b=1, t=2048, n=4, kh=1, h=128,
                                is_causal=True)),
      ("window_5_3", dict(local_window_size=(50, 30), t=450)),
      ("window_sym", dict(local_window_size=40, t=300)),
      ("causal_window", dict(is_causal=True, local_window_size=(70, 0),
                             t=500)),
      ("causal_offset", dict(mask=masks.Causal(offset=80), t=250, s=330)),
      ("chunked", dict(mask=masks.ChunkedCausal(100), t=450)),
      ("window_or_prefix", dict(
          mask=(masks.LocalWindow(60, 0) | masks.Prefix(3)) & masks.Causal(),
          t=400)),
  ]
  key = jax.random.key(3)
  seg = testing.random_segment_ids(key, 2, 470, 4)
  seg777 = testing.random_segment_ids(jax.random.key(2), 2, 777, 3)
  seg900 = testing.random_segment_ids(jax.random.key(5), 2, 900, 4)
  seg500 = testing.random_segment_ids(jax.random.key(6), 2, 500, 3)
  cases += [
      ("segments_self_causal", dict(t=470, is_causal=True,
                                    arrays={"segment_ids": seg})),
      ("segments_cross", dict(t=230, s=410, arrays={"segment_ids": (
          testing.random_segment_ids(key, 2, 230, 3),
          testing.random_segment_ids(jax.random.key(4), 2, 410, 3))})),
      ("seq_lengths", dict(t=330, s=400, arrays={
          "q_lengths": jnp.array([330, 200], jnp.int32),
          "kv_lengths": jnp.array([170, 400], jnp.int32)},
                           zero_rows=(1, 200, 330))),
      ("kv_length_zero", dict(t=200, arrays={
          "kv_lengths": jnp.array([0, 150], jnp.int32)})),
      ("sinks_causal", dict(sinks=True, is_causal=True, h=128)),
      ("soft_cap_window", dict(logits_soft_cap=2.5,
                               local_window_size=(90, 20))),
      ("everything", dict(t=510, n=6, kh=3, h=128, sinks=True,
                          logits_soft_cap=5.0, is_causal=True,
                          local_window_size=(200, 0), arrays={
                              "segment_ids": testing.random_segment_ids(
                                  key, 2, 510, 3),
                              "kv_lengths": jnp.array([510, 400],
                                                      jnp.int32)})),
      # Segment ids with each static mask / lengths (segment ids x causal
      # was wrong on the first H100 run: a race on the key segment ids).
      ("seg_causal_diag", dict(b=2, t=777, n=6, kh=3, h=64, is_causal=True,
                               arrays={"segment_ids": seg777})),
      ("seg_causal_h128", dict(t=900, n=4, kh=2, h=128, is_causal=True,
                               arrays={"segment_ids": seg900})),
      ("seg_window", dict(t=777, n=6, kh=3, h=64,
                          local_window_size=(300, 0),
                          arrays={"segment_ids": seg777})),
      ("seg_window_sym", dict(t=777, local_window_size=(100, 60),
                              arrays={"segment_ids": seg777})),
      ("seg_lengths", dict(t=777, h=128, arrays={
          "segment_ids": seg777,
          "q_lengths": jnp.array([777, 500], jnp.int32),
          "kv_lengths": jnp.array([600, 777], jnp.int32)},
                           zero_rows=(1, 500, 777))),
      ("seg_causal_lengths", dict(t=777, is_causal=True, arrays={
          "segment_ids": seg777,
          "kv_lengths": jnp.array([777, 333], jnp.int32)})),
      ("diag_all_features", dict(b=2, t=777, n=6, kh=3, h=64, sinks=True,
                                 logits_soft_cap=20.0, is_causal=True,
                                 local_window_size=(300, 0),
                                 arrays={"segment_ids": seg777})),
      ("h256_fwd_causal", dict(t=640, h=256, is_causal=True, grads=None)),
      ("h256_fwd_seg", dict(t=500, h=256, grads=None,
                            arrays={"segment_ids": seg500})),
      ("fully_masked_rows", dict(t=240, arrays={"segment_ids": (
          jnp.zeros((2, 240), jnp.int32).at[0, :100].set(7),
          jnp.zeros((2, 240), jnp.int32))}, zero_rows=(0, 0, 100))),
      ("fully_masked_sinks", dict(t=160, sinks=True, arrays={
          "segment_ids": (jnp.zeros((2, 160), jnp.int32).at[1, 30:80].set(5),
                          jnp.zeros((2, 160), jnp.int32))})),
      ("large_logits", dict(t=310, is_causal=True, big=10.0, grads=False)),
      # The fused (FA3) backward: dQ reduced into float32 inside dK/dV.
      ("fused_h128_gqa_causal", dict(h=128, n=4, kh=2, t=700,
                                     is_causal=True, fused=True)),
      ("fused_h64_full_ragged", dict(h=64, t=640, s=230, fused=True)),
      ("fused_everything", dict(t=510, n=6, kh=3, h=128, sinks=True,
                                logits_soft_cap=5.0, is_causal=True,
                                local_window_size=(200, 0), fused=True,
                                arrays={
                                    "segment_ids": testing.random_segment_ids(
                                        key, 2, 510, 3),
                                    "kv_lengths": jnp.array([510, 400],
                                                            jnp.int32)})),
  ]
  want = [c for c in (args.cases or "").split(",") if c]
  for name, kw in cases:
    if want and not any(w in name for w in want):
      continue
    try:
      check_case(name, **kw)
    except Exception as e:  # pylint: disable=broad-except
      record(section="correct", case=name, ok=False,
             error=f"{type(e).__name__}: {str(e)[:400]}")
      traceback.print_exc()


def _time(f, *args, target=0.15, samples=3):
  """Median seconds per call of a jitted f (async dispatch, block at end).

  Returns (seconds, first output) so callers can reuse the output.
  """
  jax, _ = _imports()
  first = jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  one = time.perf_counter() - t0
  n = int(min(50, max(2, target / max(one, 1e-6))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(n):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / n)
  times.sort()
  return times[len(times) // 2], first


# Variants of the fused backward that leave parts out (timing only; see
# mosaic_gpu_bwd._FUSED_DROP).
FUSED_DROPS = {"fusednj": {"join"}, "fusednr": {"reduce"},
               "fusednodq": {"dq"}, "fusedsl": {"slots"}}

# Timing variants that trace the kernels in other forms than the defaults
# (read when tracing; see kernel_forms): "qdiv" the opaque zeros (the
# in-loop operand offsets that keep wgmma descriptors from being hoisted)
# as j // (bound + 1), the form before 2026-12-06 (mosaic_gpu._ZERO_FORM);
# the forms that were the defaults before run77 (2026-12-06): "oldforms"
# all three, "dpzero" Delta subtracted after dP's matmul
# (mosaic_gpu_bwd._DP_INIT), "lshuffle" P's row sums reduced across lanes
# every block (mosaic_gpu._L_PARTIAL), "dqstatic" the fused backward at
# H = 64 emitting dQ from one static branch per consumer
# (mosaic_gpu_bwd._DQ_TURN; with the fused backward); "serialturn" the
# forward step in tokamax's order, P V waited for inside the turn
# (mosaic_gpu._SERIAL_TURN; opt-in), "nabdef" every default forward
# without Pallas' automatic SMEM barriers (mosaic_gpu._NO_AUTO_BARRIERS),
# "serialnab" both; "psmem"
# P_j in a two-slot SMEM ring, the softmax under P_{j-1} V_{j-1}
# (mosaic_gpu._P_SMEM; opt-in, H <= 128).
KERNEL_FORMS = {
    "qdiv": dict(q_index="div"),
    "oldforms": dict(dp_init="zero", l_partial=False, dq_turn="static"),
    "dpzero": dict(dp_init="zero"), "lshuffle": dict(l_partial=False),
    "dqstatic": dict(dq_turn="static"), "serialturn": dict(serial=True),
    "serialnab": dict(serial=True, nab=True), "psmem": dict(p_smem=True),
    "nabdef": dict(nab=True)}


@contextlib.contextmanager
def kernel_forms(name):
  """The kernels in a timing variant's forms, while tracing."""
  from pallas_kernels.flash import mosaic_gpu as fl  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash import mosaic_gpu_bwd as bl  # pylint: disable=g-import-not-at-top
  forms = KERNEL_FORMS.get(name, {})
  saved = (fl._ZERO_FORM, bl._DP_INIT, fl._L_PARTIAL, bl._DQ_TURN,  # pylint: disable=protected-access
           fl._SERIAL_TURN, fl._P_SMEM, fl._NO_AUTO_BARRIERS)  # pylint: disable=protected-access
  fl._ZERO_FORM = forms.get("q_index", saved[0])  # pylint: disable=protected-access
  bl._DP_INIT = forms.get("dp_init", saved[1])  # pylint: disable=protected-access
  fl._L_PARTIAL = forms.get("l_partial", saved[2])  # pylint: disable=protected-access
  bl._DQ_TURN = forms.get("dq_turn", saved[3])  # pylint: disable=protected-access
  fl._SERIAL_TURN = forms.get("serial", saved[4])  # pylint: disable=protected-access
  fl._P_SMEM = forms.get("p_smem", saved[5])  # pylint: disable=protected-access
  fl._NO_AUTO_BARRIERS = forms.get("nab", saved[6])  # pylint: disable=protected-access
  try:
    yield
  finally:
    (fl._ZERO_FORM, bl._DP_INIT, fl._L_PARTIAL, bl._DQ_TURN,  # pylint: disable=protected-access
     fl._SERIAL_TURN, fl._P_SMEM, fl._NO_AUTO_BARRIERS) = saved

GRID_T = (1024, 4096, 16384)
GRID_H = (64, 128, 256)


def parse_configs(spec):
  """'H:T:causal|full:mha|gqa' entries, comma separated; '*' is a wildcard.

  >>> parse_configs("128:1024:full:mha")
  [(128, 1024, False, False)]
  """
  out = []
  for entry in spec.split(","):
    entry = entry.strip()
    if not entry:
      continue
    parts = entry.split(":")
    if len(parts) != 4:
      raise ValueError(f"config {entry!r}: want H:T:causal|full:mha|gqa")
    hs = GRID_H if parts[0] == "*" else (int(parts[0]),)
    ts = GRID_T if parts[1] == "*" else (int(parts[1]),)
    cs = (False, True) if parts[2] == "*" else (
        {"full": False, "causal": True}[parts[2]],)
    gs = (False, True) if parts[3] == "*" else (
        {"mha": False, "gqa": True}[parts[3]],)
    for h in hs:
      for t in ts:
        for c in cs:
          for g in gs:
            if (h, t, c, g) not in out:
              out.append((h, t, c, g))
  return out


def _grid_point(t, h, causal, gqa):
  n = 2048 // h
  return dict(b=16384 // t, t=t, n=n, kh=n // 4 if gqa else n, h=h,
              causal=causal)


def _label(h, t, causal, gqa):
  return (f"H{h} T{t} {'causal' if causal else 'full'} "
          f"{'GQA16:4' if gqa else 'MHA'}")


def _variant_configs(name, h):
  """(fwd_config, bwd_config, passes) of a named variant of our kernels."""
  from pallas_kernels.flash import mosaic_gpu as fl  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash import mosaic_gpu_bwd as bl  # pylint: disable=g-import-not-at-top
  base = fl.default_fwd_config(h)
  fwd = lambda **kw: fl.FwdConfig(**{**{f: getattr(base, f) for f in (
      "block_q", "block_kv", "num_stages")}, **kw})
  bwd = lambda **kw: dataclasses.replace(bl.default_bwd_config(h), **kw)
  wg4 = lambda **kw: fwd(**{**dict(  # noqa: E731
      num_compute_wgs=4, consumer_regs=112, producer_regs=24, block_kv=64,
      num_stages=4), **kw})
  both, fonly, bonly = ("fwd", "fwdbwd"), ("fwd",), ("fwdbwd",)
  table = {
      "ours": (None, None, both),
      # The defaults through attnjax.dot_product_attention (the path the
      # report's bench times) rather than mosaic_attention: run78's bench
      # row at H = 128 16k causal GQA fwd+bwd was 515 against run77's 550
      # here for the same forms.
      "dispatch": (None, None, both),
      # The first version's grid: one CTA per tile (forward only differs).
      "np": (fwd(persistent=False), None, fonly),
      "qb1": (fwd(q_buffers=1), None, fonly),
      "nopp": (fwd(pingpong=False), None, fonly),
      "st3": (fwd(num_stages=3), None, fonly),
      "kv64": (fwd(block_kv=64, num_stages=4 if h <= 128 else 2), None,
               fonly),
      "fused": (None, bl.BwdConfig(fused_dq=True), bonly),
      # Racy, timing only: the fused kernel without its final consumer join
      # (the 2026-12-05 race fix), to see what the join costs (run43: fused
      # 318 against 470 TFLOP/s for two kernels at T = 4k full MHA, H100).
      "fusednj": (None, bl.BwdConfig(fused_dq=True), bonly),
      # Racy or wrong, timing only (see _FUSED_DROP): dQ copied instead of
      # reduce-added; no dQ at all (the dK/dV part of the fused kernel).
      "fusednr": (None, bl.BwdConfig(fused_dq=True), bonly),
      "fusednodq": (None, bl.BwdConfig(fused_dq=True), bonly),
      # Wrong, timing only: dQ reduce-added into 8 heads' accumulator
      # (L2-resident) instead of B x N heads'.
      "fusedsl": (None, bl.BwdConfig(fused_dq=True), bonly),
      # The dQ reduce-adds with the L2 policy evict_last (FA3's hint);
      # "fusedevhc" with the column-block accumulator.
      "fusedev": (None, bl.BwdConfig(fused_dq=True, dq_evict_last=True),
                  bonly),
      "fusedevhc": (None, bl.BwdConfig(fused_dq=True, dq_evict_last=True,
                                       dq_layout="nct"), bonly),
      # The producer's L2 prefetch of the dQ rows 0 / 2 / 4 steps ahead
      # (run50: "fusedsl" 501 against "fused" 369 at T = 4k full MHA: the
      # reduce-adds miss in L2); "fusedpfhc" with the column blocks.
      "fusedpf0": (None, bl.BwdConfig(fused_dq=True, dq_prefetch=0), bonly),
      "fusedpf2": (None, bl.BwdConfig(fused_dq=True, dq_prefetch=2), bonly),
      "fusedpf4": (None, bl.BwdConfig(fused_dq=True, dq_prefetch=4), bonly),
      "fusedpfhc": (None, bl.BwdConfig(fused_dq=True, dq_prefetch=2,
                                       dq_layout="nct"), bonly),
      # Only every 8th key tile's CTA prefetches (run51: prefetches from
      # every CTA 2-4 steps ahead were slower); "e1k": tile 0's alone.
      **{f"fusedpf{d}e{e}": (None, bl.BwdConfig(
          fused_dq=True, dq_prefetch=d,
          dq_prefetch_every=1000 if e == "1k" else int(e)), bonly)
         for d in (0, 1, 2, 4) for e in ("8", "1k")},
      # One launch per group of g (batch, K/V head) pairs, each into its
      # own accumulator zeroed just before it (run57, H100, T = 4k full
      # MHA: g = 8 511 against fused 362, two kernels 461); "fusedhg8pf"
      # with the producer's dQ prefetch.
      **{f"fusedhg{g}": (None, bl.BwdConfig(fused_dq=True, dq_head_group=g),
                         bonly) for g in (1, 2, 4, 8, 16, 32, 64, 128)},
      "fusedhg8pf": (None, bl.BwdConfig(fused_dq=True, dq_head_group=8,
                                        dq_prefetch=0), bonly),
      # Each key tile starts its query blocks at its own offset (dQ rows
      # reduce-added by one CTA at a time rather than all of a head's).
      "fusedst": (None, bl.BwdConfig(fused_dq=True, stagger_q=True), bonly),
      # The dQ accumulator head-major ("nth") or in FA3's contiguous
      # per-consumer column blocks ("nct") instead of dQ's own layout.
      "fusedhm": (None, bl.BwdConfig(fused_dq=True, dq_layout="nth"), bonly),
      "fusedhc": (None, bl.BwdConfig(fused_dq=True, dq_layout="nct"), bonly),
      # One dS^T buffer (a second consumer join per step), with the freed
      # 16 KB spent on a third Q/dO stage: run47 found the fused steps at
      # T = 4k full MHA waiting on the producer's Q (1.9 against 0.14 us).
      "fused1": (None, bl.BwdConfig(fused_dq=True, ds_buffers=1), bonly),
      "fused3": (None, bl.BwdConfig(fused_dq=True, ds_buffers=1,
                                    num_stages=3), bonly),
      # Q/dO slots released right after the dQ product, before the
      # reduce-add is issued (the producer's loads ahead of it).
      "fusedel": (None, bl.BwdConfig(fused_dq=True, early_release=True),
                  bonly),
      "fused3el": (None, bl.BwdConfig(fused_dq=True, ds_buffers=1,
                                      num_stages=3, early_release=True),
                   bonly),
      "fused3hc": (None, bl.BwdConfig(fused_dq=True, ds_buffers=1,
                                      num_stages=3, dq_layout="nct"), bonly),
      # H = 64: FA3's 192-row forward tile, 3 consumers at 160 registers
      # (no spills for an H100 causal; "wg3kv64" also full;
      # scripts/aot/ptxas_report.py, 2026-12-05). Untimed.
      # The next tile's first Q K^T under this tile's epilogue (two Q
      # buffers). Compiled for an H100: no spills at H = 64 causal, 8 B
      # full; at H = 128 spills and serialised wgmma (2026-12-06). No
      # faster on an H100 (run74: 4k full MHA 411.7 against 425.8).
      "ovl": (fwd(q_buffers=2, overlap_epilogue=True), None, fonly),
      # One Q buffer handed back after a tile's last Q K^T, the next Q
      # loaded (after an L2 prefetch) under the last P V and the epilogue,
      # O out through two [64, 64] SMEM slots per consumer (tokamax's
      # epilogue). For H = 256, where two Q buffers do not fit: its 4k
      # full forward ran 634 against 670 at 16k (the same 1,024 tiles),
      # about 7% of a 4k tile outside the steps. Compiled for an H100:
      # 16 / 24 bytes of spills full, none causal (2026-12-07). At H = 64
      # (two consumers, no spills) run123: 1k full MHA 399.5 against
      # 382.8, GQA 390.7 / 380.7; 4k causal 386.5 / 388.4; 4k full
      # 435.7 against three consumers' 451.5: the default up to 1k since.
      "earlyq": (fwd(early_q_release=True), None, fonly),
      # The default tiling without it (H = 64 and 256 up to their
      # EARLY_Q_MAX_LEN*: what the default was before), both passes.
      "noearlyq": (fwd(early_q_release=False), None, both),
      # With the early release one Q buffer frees 8 KB a consumer at
      # H = 64: a fourth stage, or 64-key blocks over 4 stages (no spills
      # either, H100 compile, 2026-12-07). For H = 64 1k full GQA (0.944
      # of tokamax, run125). Untimed.
      "earlyqs4": (fwd(early_q_release=True, num_stages=4), None, fonly),
      # Tokamax's sm90 heuristic at H = 64 (2 stages; its 1k full GQA row
      # leads ours by 5%, run128) with the early release.
      "earlyqs2": (fwd(early_q_release=True, num_stages=2), None, fonly),
      "earlyqkv64": (fwd(early_q_release=True, block_kv=64, num_stages=4),
                     None, fonly),
      # The default tiling of every shape without Pallas' automatic SMEM
      # barriers (KERNEL_FORMS: mosaic_gpu._NO_AUTO_BARRIERS, what
      # FwdConfig.no_auto_barriers does for one config; tokamax's sm90
      # forward compiles so): compiled for an H100 (2026-12-08) the
      # consumers' tile loop (first and last blocks, epilogue) loses its 8
      # BAR.SYNC (303 -> 299 instructions at H = 64 1k), the per-block
      # steps are unchanged. Forward+backward too (the backward's kernels
      # keep theirs). "serialnab" adds tokamax's step order. Untimed.
      "nabdef": (None, None, both),
      "serialnab": (None, None, fonly),
      # H = 64: 192-key blocks (3 / 2 stages). The unmasked step's SASS
      # (compiled for an H100, nvdisasm) has 683 instructions per warp
      # against 513 for 128 keys: 455 per 128 keys, 11% fewer (the
      # per-block max shuffles, O rescale, barrier and descriptor
      # arithmetic spread over more keys). 72 B of spills, none in the
      # unmasked loop; causal 0.5 / 1.4 KB in the masked loop. Slower on
      # an H100 (run74: 4k full MHA 395.8 / 391.7 against 425.8, causal
      # 267.7 / 282.6 against 387.5).
      "kv192": (fwd(block_kv=192), None, fonly),
      # H = 64: 128 query rows a consumer (256-row tiles, no padding at
      # T = 1k) over 64-key blocks: each consumer's softmax works on two
      # 64-row halves, twice the independent rows of the default's step
      # (the profile put the H = 64 step's time in the softmax's dependent
      # chain, run86). Compiled for an H100 (2026-12-07): 4 and 3 stages
      # without spills, full and causal; 128-key blocks spill 2 KB and
      # serialise the wgmmas (so not those). Run123 (H100, forward,
      # 4 / 3 stages against the default): 1k full MHA 386.8 / 390.3 /
      # 382.8, 4k full 418.7 / 417.9 / 451.5, 4k causal 360.1 / 355.2 /
      # 388.4, 16k causal 397.9 / 393.8 / 472.1: opt-in.
      "bq128kv64": (fwd(block_q=128, block_kv=64, num_stages=4), None,
                    fonly),
      "bq128kv64s3": (fwd(block_q=128, block_kv=64, num_stages=3), None,
                      fonly),
      "kv192s2": (fwd(block_kv=192, num_stages=2), None, fonly),
      # The kernels' steps before 2026-12-06 (j // (bound + 1) as the
      # opaque operand offset: 60 more instructions a forward step, 30 a
      # dK/dV step; KERNEL_FORMS).
      "qdiv": (None, None, both),
      # The forms before run77 (KERNEL_FORMS), which timed them beside the
      # present defaults on one H100: the defaults' forward+backward
      # 549 / 515 TFLOP/s at H = 128 16k causal GQA, 450 / 426 at H = 64
      # 16k causal MHA; the fused backward at H = 64 424 / 414 at 4k full
      # GQA (docs/dev/gpu-runs/run77-*).
      "oldforms": (None, None, both),
      "dpzero": (None, None, ("fwdbwd",)),
      "lshuffle": (None, None, fonly),
      # The forward step in tokamax's order (KERNEL_FORMS): 441
      # instructions at H = 64, no spills at H = 64, 128, 256 (H100
      # compile, 2026-12-06).
      "serialturn": (None, None, fonly),
      # P_j in an SMEM ring (KERNEL_FORMS; H <= 128 where it fits): the
      # step's wait for P_j V_j after all 66 exponentials, not before them
      # (480 / 518 instructions a step at H = 64 / 128, 168 registers, no
      # spills; H100 compile, 2026-12-07). Forward+backward too: the
      # backward is the default's.
      "psmem": (None, None, both),
      "dqstatic": (None, bl.BwdConfig(fused_dq=True), bonly),
      "wg3": (fwd(num_compute_wgs=3, consumer_regs=160, producer_regs=32,
                  num_stages=3), None, fonly),
      "wg3kv64": (fwd(num_compute_wgs=3, consumer_regs=160,
                      producer_regs=32, block_kv=64, num_stages=4), None,
                  fonly),
      # H = 64: four consumers of 64 rows over 64-key blocks (256-row
      # tiles), 112 registers each (the most the launch's 96 a thread
      # leaves beside a 24-register producer); compiled for an H100
      # (2026-12-08): no spills full or causal (8 bytes full with the
      # early release), 293 instructions a 64-key step (443 a 128-key
      # step with two consumers: 32% more a key), but four warps a
      # sub-partition, three in the softmax, where two consumers leave
      # one (the profile's bound, run86). "wg4e": with the early Q
      # release; "wg4s3": 3 stages. Forward+backward too (the backward is
      # the default's); "wg4np" without the ping-pong ring. Untimed.
      "wg4": (wg4(), None, both),
      "wg4e": (wg4(early_q_release=True), None, both),
      "wg4s3": (wg4(num_stages=3), None, fonly),
      "wg4np": (wg4(pingpong=False), None, fonly),
      # Backward tilings that compile without spills for an H100
      # (scripts/aot/ptxas_report.py --case mosaic, 2026-12-04): all four
      # at H = 64; "bkvdq128" and "bst3" at H = 128 (the others spill
      # there: 0.6-1.1 KB).
      "bqdkv128": (None, bwd(block_q_dkv=128), bonly),
      "bkvdq128": (None, bwd(block_kv_dq=128), bonly),
      "bqdq128": (None, bwd(block_q_dq=128), bonly),
      "bst3": (None, bwd(num_stages=3), bonly),
      # The tiling that was the default at H <= 128 until run26.
      "bwd64": (None, bl.BwdConfig(), bonly),
      # The two-kernel backward with its dK/dV kernel on a persistent grid
      # (one Q / dO ring across a CTA's items; for T = 1k, where run84
      # found 13% of a dK/dV CTA outside its steps). H = 128's default
      # tiling; at H = 64 the tiling of T >= 2k.
      # At H = 256 the split-head dK/dV kernel's (opt-in) beside the dQ
      # kernel's (the default there). Explicit flags: the default config
      # itself is persistent since run95.
      "pdkv": (None, bwd(persistent_dkv=True, persistent_dq=h > 128),
               bonly),
      # The dQ kernel too / alone (8 key blocks a dQ CTA at T = 1k).
      "pbwd": (None, bwd(persistent_dkv=h <= 128, persistent_dq=True),
               bonly),
      "pdq": (None, bwd(persistent_dkv=False, persistent_dq=True), bonly),
      # The same with the items heaviest first over all heads
      # (BwdConfig.lpt_schedule): for masked GQA, where the head-by-head
      # list balances worst.
      "pbwdlpt": (None, bwd(persistent_dkv=True, persistent_dq=True,
                            lpt_schedule=True), bonly),
      "pdqlpt": (None, bwd(persistent_dkv=False, persistent_dq=True,
                           lpt_schedule=True), bonly),
      # The two-kernel backward at the default tiling for unknown T (what
      # deterministic runs take), beside "pbwd".
      "two": (None, bwd(persistent_dkv=False, persistent_dq=False), bonly),
      "bq128": (None, bwd(block_q_dkv=128, block_q_dq=128), bonly),
  }
  if name not in table:
    raise ValueError(f"unknown variant {name!r} (have {sorted(table)})")
  return table[name]


def time_point(label, *, b, t, n, kh, h, causal, variants=("ours",),
               baselines=("cudnn", "tokamax"), passes=("fwd", "fwdbwd")):
  """Times our variants and the baselines at one grid point; one record."""
  jax, jnp = _imports()
  from attnjax.softmax import pallas_mosaic  # pylint: disable=g-import-not-at-top
  from attnjax.softmax.problem import make_problem  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash import mosaic_gpu_bwd as bl  # pylint: disable=g-import-not-at-top
  q, k, v, do, _ = _inputs(jax.random.key(0), b, t, t, n, kh, h,
                           jnp.bfloat16)
  flops = 4.0 * b * n * t * t * h / (2 if causal else 1)
  def dispatch(q, k, v, need_bwd=True):
    del need_bwd  # the dispatcher's forward keeps its residuals
    import attnjax  # pylint: disable=g-import-not-at-top
    return attnjax.dot_product_attention(
        q, k, v, is_causal=causal, implementation="pallas_mosaic_gpu")

  fns = {}
  for name in variants:
    fcfg, bcfg, vpasses = _variant_configs(name, h)

    def ours(q, k, v, fcfg=fcfg, bcfg=bcfg, need_bwd=True):
      p, _ = make_problem(q, k, v, is_causal=causal)
      return pallas_mosaic.mosaic_attention(
          p, fwd_config=fcfg, bwd_config=bcfg, need_backward=need_bwd)[0]
    fns[name] = (dispatch if name == "dispatch" else ours, vpasses)

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="cudnn")

  def tok(q, k, v):
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.dot_product_attention(q, k, v, is_causal=causal,
                                         implementation="mosaic")

  if "cudnn" in baselines:
    fns["cudnn"] = (cudnn, passes)
  if "tokamax" in baselines:
    fns["tokamax"] = (tok, passes)
  row = dict(section="time", label=label, b=b, t=t, n=n, kh=kh, h=h,
             causal=causal)
  outs = {}
  for name, (fn, vpasses) in fns.items():
    for pss in passes:
      if pss not in vpasses:
        continue
      key = f"{name}_{pss}"
      try:
        if pss == "fwd":
          f = fn
          if name in variants:
            f = functools.partial(fn, need_bwd=False)
          # Traced on _time's first call, so the switch spans it.
          with kernel_forms(name):
            sec, first = _time(jax.jit(f), q, k, v)
          outs[name] = first
          row[key] = round(flops / sec / 1e12, 1)
        else:
          drop = FUSED_DROPS.get(name, set())

          def fb(q, k, v, do, fn=fn, drop=frozenset(drop), name=name):
            # The backward is traced here (vjp), so the switch spans it.
            bl._FUSED_DROP = drop  # pylint: disable=protected-access
            try:
              with kernel_forms(name):
                _, vjp = jax.vjp(fn, q, k, v)
                return vjp(do)
            finally:
              bl._FUSED_DROP = frozenset()  # pylint: disable=protected-access
          sec, _ = _time(jax.jit(fb), q, k, v, do)
          row[key] = round(3.5 * flops / sec / 1e12, 1)
        row[key + "_ms"] = round(sec * 1e3, 3)
      except Exception as e:  # pylint: disable=broad-except
        row[key] = None
        row[key + "_err"] = f"{type(e).__name__}: {str(e)[:200]}"
  # Agreement with cuDNN at the timed shape (forward output, max |diff|).
  if "cudnn" in outs:
    for name in variants:
      if name in outs:
        a = outs[name].astype(jnp.float32)
        row[f"{name}_maxdiff_vs_cudnn"] = float(jnp.max(jnp.abs(
            a - outs["cudnn"].astype(jnp.float32))))
        row[f"{name}_nans"] = int(jnp.isnan(a).sum())
  record(**row)


def _variants(args):
  return tuple(v for v in args.variants.split(",") if v)


def _baselines(args):
  out = []
  if not args.no_cudnn:
    out.append("cudnn")
  if not args.no_tokamax:
    out.append("tokamax")
  return tuple(out)


def _run_configs(configs, args, passes_of=None):
  for h, t, causal, gqa in configs:
    label = _label(h, t, causal, gqa)
    passes = passes_of(h) if passes_of else ("fwd", "fwdbwd")
    try:
      time_point(label, variants=_variants(args), baselines=_baselines(args),
                 passes=passes, **_grid_point(t, h, causal, gqa))
    except Exception as e:  # pylint: disable=broad-except
      record(section="time", label=label,
             error=f"{type(e).__name__}: {str(e)[:300]}")


def _passes_for_head_dim(h):
  from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top
  if h in mosaic_gpu_bwd.SUPPORTED_HEAD_DIMS:
    return ("fwd", "fwdbwd")
  return ("fwd",)


def section_time(args):
  configs = parse_configs(args.configs or "*:*:*:*")
  want = tuple(x for x in args.passes.split(",") if x)
  passes_of = _passes_for_head_dim
  if want:
    passes_of = lambda h: tuple(x for x in _passes_for_head_dim(h)
                                if x in want)
  _run_configs(configs, args, passes_of)


def section_time128(args):
  _run_configs(parse_configs("128:*:*:*"), args, _passes_for_head_dim)


def section_time64(args):
  _run_configs(parse_configs("64:*:*:*"), args, _passes_for_head_dim)


def section_time256(args):
  _run_configs(parse_configs("256:*:*:*"), args, _passes_for_head_dim)


def section_tune(args):
  """Our variants only, at a few grid points (or --configs)."""
  configs = parse_configs(args.configs or
                          "128:1024:full:mha,128:4096:causal:mha,"
                          "64:1024:full:mha,256:4096:full:mha")
  variants = _variants(args)
  if variants == ("ours",):
    variants = ("ours", "np", "qb1", "nopp", "st3", "kv64", "fused")
  for h, t, causal, gqa in configs:
    label = "tune " + _label(h, t, causal, gqa)
    try:
      time_point(label, variants=variants, baselines=(),
                 passes=_passes_for_head_dim(h),
                 **_grid_point(t, h, causal, gqa))
    except Exception as e:  # pylint: disable=broad-except
      record(section="time", label=label, error=str(e)[:300])


# ---------------------------------------------------------------------------
# Driver.


_BASELINES = ("cudnn", "tokamax")


def _ours(r, p):
  """(best TFLOP/s of our variants for pass p, variant name)."""
  best = (None, None)
  for k, v in r.items():
    if not k.endswith("_" + p) or not isinstance(v, (int, float)):
      continue
    name = k[:-len(p) - 1]
    if name in _BASELINES or name.endswith("_fwd"):
      continue
    if best[0] is None or v > best[0]:
      best = (v, name)
  return best


def summary(paths=None):
  paths = paths or [os.path.join(out_dir(), "mosaic_check.jsonl")]
  rows = []
  for path in paths:
    if os.path.exists(path):
      rows += [json.loads(line) for line in open(path) if line.strip()]
  print("\n================ SUMMARY ================")
  for r in rows:
    if r.get("section") == "env":
      print(f"device {r['device']} cc {r['cc']} jax {r['jax']}")
  for r in rows:
    if r.get("section") == "status":
      print(f"section {r['name']:8s} {r['status']} ({r['seconds']} s)")
  corr = [r for r in rows if r.get("section") == "correct"]
  if corr:
    print(f"\ncorrectness: {sum(r['ok'] for r in corr)}/{len(corr)} ok")
    for r in corr:
      flag = "ok  " if r["ok"] else "FAIL"
      info = r.get("error") or (f"worst {r['worst_ratio']} nans {r['nans']}"
                                + "".join(f" {k}={r[k]}" for k in (
                                    "deterministic", "zero_rows_ok")
                                          if k in r))
      print(f"  {flag} {r['case']:24s} {info}")
  tim = [r for r in rows if r.get("section") == "time"]
  if tim:
    print("\nTFLOP/s (fwd = 4BNTSH, halved causal; fwd+bwd = 3.5x fwd); "
          "ours = best of the variants timed (named after the number)")
    print(f"{'':34s} {'------------- forward -------------':>36s} | "
          f"{'--------- forward+backward ---------':>36s}")
    print(f"{'config':34s} {'ours':>13s} {'cudnn':>7s} {'tkmx':>7s} "
          f"{'ratio':>6s} | {'ours':>13s} {'cudnn':>7s} {'tkmx':>7s} "
          f"{'ratio':>6s}")
    fmt = lambda x: f"{x:7.1f}" if isinstance(x, (int, float)) else f"{'-':>7s}"
    fmtr = lambda x: f"{x:6.2f}" if isinstance(x, (int, float)) else f"{'-':>6s}"

    def cols(r, p):
      o, name = _ours(r, p)
      best = max([x for x in (r.get(f"cudnn_{p}"), r.get(f"tokamax_{p}"))
                  if isinstance(x, (int, float))] or [0])
      ratio = o / best if o is not None and best else None
      tag = f"{fmt(o)}{'(' + name[:4] + ')' if name else '':6s}"
      return (f"{tag:>13s} {fmt(r.get(f'cudnn_{p}'))} "
              f"{fmt(r.get(f'tokamax_{p}'))} {fmtr(ratio)}")

    for r in tim:
      if "error" in r:
        print(f"{r['label'][:34]:34s} ERROR {r['error'][:80]}")
        continue
      print(f"{r['label'][:34]:34s} {cols(r, 'fwd')} | {cols(r, 'fwdbwd')}")
      var = {k: v for k, v in r.items() if isinstance(v, (int, float))
             and (k.endswith("_fwd") or k.endswith("_fwdbwd"))
             and not k.startswith(_BASELINES)}
      if len(var) > 2:
        print("    " + "  ".join(f"{k}={v}" for k, v in sorted(var.items())))
      for k, v in r.items():
        if k.endswith("_maxdiff_vs_cudnn"):
          nans = r.get(k.replace("_maxdiff_vs_cudnn", "_nans"))
          if not isinstance(v, float) or v > 0.05 or nans:
            print(f"    WARNING {k}: {v} nans {nans}")
      for k, v in r.items():
        if k.endswith("_err"):
          print(f"    {k}: {v[:100]}")
  print(f"\n(details: {', '.join(paths)})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sections", default="smoke,correct,time")
  ap.add_argument("--budget", type=float, default=540,
                  help="wall seconds for all sections together")
  ap.add_argument("--configs", default="",
                  help="time/tune grid points H:T:causal|full:mha|gqa, "
                  "comma separated, '*' wildcards (default: whole grid)")
  ap.add_argument("--variants", default="ours",
                  help="our kernel variants to time: ours,dispatch,np,qb1,nopp,st3,ovl,earlyq,kv192,kv192s2,bq128kv64,bq128kv64s3,qdiv,oldforms,dpzero,lshuffle,serialturn,psmem,pdkv,pdq,pbwd,pbwdlpt,pdqlpt,two,dqstatic,wg3,wg3kv64,"
                  "kv64,fused,earlyqs4,earlyqkv64,serialnab,nabdef,wg4,wg4e,wg4s3,wg4np,earlyqs2")
  ap.add_argument("--passes", default="",
                  help="time: only these passes (fwd,fwdbwd; default both "
                  "where the backward supports H)")
  ap.add_argument("--cases", default="",
                  help="correct: only cases whose name contains one of these")
  ap.add_argument("--no-tokamax", action="store_true")
  ap.add_argument("--no-cudnn", action="store_true")
  ap.add_argument("--summary", nargs="*", default=None,
                  help="only print the summary of these jsonl files")
  ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.summary is not None:
    summary(args.summary or None)
    return
  if args._run:  # pylint: disable=protected-access
    globals()[f"section_{args._run}"](args)  # pylint: disable=protected-access
    return
  path = os.path.join(out_dir(), "mosaic_check.jsonl")
  if os.path.exists(path):
    os.rename(path, path + f".{int(time.time())}")
  start = time.time()
  hung = False
  for name in args.sections.split(","):
    if name not in SECTIONS:
      raise SystemExit(f"unknown section {name!r} (have {sorted(SECTIONS)})")
    left = args.budget - (time.time() - start)
    if hung:
      # The smoke test hung: every other section would hang the same way.
      record(section="status", name=name, status="skipped (smoke hung)",
             seconds=0)
      continue
    if left < 30:
      record(section="status", name=name, status="skipped (budget)",
             seconds=0)
      continue
    timeout = min(SECTIONS[name], left)
    print(f"\n=== section {name} (timeout {timeout:.0f} s) ===", flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", name,
           "--configs", args.configs, "--variants", args.variants,
           "--cases", args.cases, "--passes", args.passes]
    if args.no_tokamax:
      cmd.append("--no-tokamax")
    if args.no_cudnn:
      cmd.append("--no-cudnn")
    t0 = time.time()
    try:
      rc = subprocess.run(cmd, timeout=timeout, check=False).returncode
      status = "ok" if rc == 0 else f"exit {rc}"
    except subprocess.TimeoutExpired:
      status = "TIMEOUT (hang or budget)"
      hung = name == "smoke"
    record(section="status", name=name, status=status,
           seconds=round(time.time() - t0, 1))
  summary()


if __name__ == "__main__":
  main()
