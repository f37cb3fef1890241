"""One GPU run that checks and times the Pallas Mosaic GPU attention kernels.

Run from the repository root on an H100 (jax 0.11.2, CUDA, no network)::

    PYTHONPATH=$PWD python3 scripts/gpu/mosaic_check.py

Each section runs in its own subprocess with a timeout, so a kernel that
hangs (a barrier deadlock) or crashes costs only its section; results go to
``$OUT/mosaic_check.jsonl`` (or ./mosaic_check_out/) and a summary table is
printed last. Sections:

* ``smoke``: one tiny causal forward + backward.
* ``correct``: forward, lse and gradients (q, k, v, sinks) against autodiff of
  the float32 reference (``pallas_kernels.flash.reference``) for the common
  path (bf16/f16, H 64/128, causal/full, MHA/GQA/MQA, ragged T/S) and every
  feature (windows, chunked/prefix/offset masks, segment ids, lengths, sinks,
  soft cap, fully masked rows, large logits), with determinism and NaN checks.
* ``time128``, ``time64``, ``time256``: the benchmark grid (B*T = 16384,
  N*H = 2048, T in 1k/4k/16k, causal and full, MHA and GQA 16:4 at H=128),
  forward and forward+backward TFLOP/s of this kernel next to cuDNN through
  ``jax.nn.dot_product_attention`` and tokamax "mosaic" when importable.
* ``tune``: alternative tilings at a few grid points.

Options: ``--sections a,b`` to run a subset, ``--budget SECONDS`` (default
720) total wall time after which remaining sections are skipped,
``--no-tokamax``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import zlib

SECTIONS = {
    "smoke": 180,
    "correct": 420,
    "time128": 420,
    "time64": 300,
    "time256": 240,
    "tune": 360,
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
    (o, l), vjp = jax.vjp(f, q, k, v, sk)
    dl = jnp.where(jnp.isfinite(l), dlse, 0.0)
    g = vjp((do, dl)) if grads else None
    return o, l, g

  @jax.jit
  def run_ref(q, k, v, sk, do, dlse):
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


def section_correct(_):
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
  for name, kw in cases:
    try:
      check_case(name, **kw)
    except Exception as e:  # pylint: disable=broad-except
      record(section="correct", case=name, ok=False,
             error=f"{type(e).__name__}: {str(e)[:400]}")
      traceback.print_exc()


def _time(f, *args, target=0.3):
  """Median seconds per call (async dispatch, block at the end)."""
  jax, _ = _imports()
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  one = time.perf_counter() - t0
  n = int(min(100, max(3, target / max(one, 1e-6))))
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(n):
      out = f(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / n)
  samples.sort()
  return samples[len(samples) // 2]


def _grid_point(t, h, causal, gqa):
  n = 2048 // h
  return dict(b=16384 // t, t=t, n=n, kh=n // 4 if gqa else n, h=h,
              causal=causal)


def time_point(label, *, b, t, n, kh, h, causal, impls, fwd_config=None,
               bwd_config=None, passes=("fwd", "fwdbwd"), tokamax=True):
  jax, jnp = _imports()
  from attnjax.softmax import pallas_mosaic  # pylint: disable=g-import-not-at-top
  from attnjax.softmax.problem import make_problem  # pylint: disable=g-import-not-at-top
  q, k, v, do, _ = _inputs(jax.random.key(0), b, t, t, n, kh, h,
                           jnp.bfloat16)
  flops = 4.0 * b * n * t * t * h / (2 if causal else 1)

  def ours(q, k, v):
    p, _ = make_problem(q, k, v, is_causal=causal)
    need_bwd = "fwdbwd" in passes
    return pallas_mosaic.mosaic_attention(
        p, fwd_config=fwd_config, bwd_config=bwd_config,
        need_backward=need_bwd)[0]

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="cudnn")

  def tok(q, k, v):
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.dot_product_attention(q, k, v, is_causal=causal,
                                         implementation="mosaic")

  if "ours" in impls:
    # Agreement with cuDNN at the timed shape (forward output, max |diff|).
    try:
      p_ours = jax.jit(ours)(q, k, v).astype(jnp.float32)
      p_ref = jax.jit(cudnn)(q, k, v).astype(jnp.float32)
      diff = float(jnp.max(jnp.abs(p_ours - p_ref)))
      nan = int(jnp.isnan(p_ours).sum())
    except Exception as e:  # pylint: disable=broad-except
      diff, nan = f"{type(e).__name__}: {str(e)[:200]}", None
  def fused(q, k, v):
    from pallas_kernels.flash import mosaic_gpu_bwd  # pylint: disable=g-import-not-at-top
    p, _ = make_problem(q, k, v, is_causal=causal)
    return pallas_mosaic.mosaic_attention(
        p, fwd_config=fwd_config,
        bwd_config=mosaic_gpu_bwd.BwdConfig(fused_dq=True))[0]

  fns = {"ours": ours, "fused": fused, "cudnn": cudnn}
  if tokamax:
    fns["tokamax"] = tok
  row = dict(section="time", label=label, b=b, t=t, n=n, kh=kh, h=h,
             causal=causal)
  if "ours" in impls:
    row["maxdiff_vs_cudnn"] = diff
    row["nans"] = nan
  for name in impls:
    fn = fns.get(name)
    if fn is None:
      continue
    for pss in passes:
      if name == "fused" and pss == "fwd":
        continue  # same forward as "ours"
      key = f"{name}_{pss}"
      try:
        if pss == "fwd":
          f = jax.jit(fn)
          sec = _time(f, q, k, v)
          row[key] = round(flops / sec / 1e12, 1)
        else:
          def fb(q, k, v, do, fn=fn):
            out, vjp = jax.vjp(fn, q, k, v)
            return vjp(do)
          sec = _time(jax.jit(fb), q, k, v, do)
          row[key] = round(3.5 * flops / sec / 1e12, 1)
        row[key + "_ms"] = round(sec * 1e3, 3)
      except Exception as e:  # pylint: disable=broad-except
        row[key] = None
        row[key + "_err"] = f"{type(e).__name__}: {str(e)[:200]}"
  record(**row)


def _grid(h, gqa_too, passes, args):
  for t in (1024, 4096, 16384):
    for causal in (False, True):
      for gqa in ((False, True) if gqa_too else (False,)):
        pt = _grid_point(t, h, causal, gqa)
        label = f"H{h} T{t} {'causal' if causal else 'full'} " + (
            "GQA16:4" if gqa else "MHA")
        try:
          time_point(label, impls=("ours", "fused", "cudnn", "tokamax"),
                     passes=passes, tokamax=not args.no_tokamax, **pt)
        except Exception as e:  # pylint: disable=broad-except
          record(section="time", label=label,
                 error=f"{type(e).__name__}: {str(e)[:300]}")


def section_time128(args):
  _grid(128, True, ("fwd", "fwdbwd"), args)


def section_time64(args):
  _grid(64, False, ("fwd", "fwdbwd"), args)


def section_time256(args):
  # The backward has no H=256 kernel yet: forward only.
  _grid(256, False, ("fwd",), args)


def section_tune(args):
  del args
  from pallas_kernels.flash import mosaic_gpu as fl  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash import mosaic_gpu_bwd as bl  # pylint: disable=g-import-not-at-top
  fwd_variants = {
      128: [fl.FwdConfig(block_kv=128, num_stages=3),
            fl.FwdConfig(block_kv=128, num_stages=2, pingpong=False),
            fl.FwdConfig(block_kv=128, num_stages=2, no_auto_barriers=True),
            fl.FwdConfig(block_kv=64, num_stages=4),
            fl.FwdConfig(block_kv=128, num_stages=2, consumer_regs=232,
                         producer_regs=40)],
      64: [fl.FwdConfig(block_kv=128, num_stages=2),
           fl.FwdConfig(block_kv=128, num_stages=4),
           fl.FwdConfig(block_kv=128, num_stages=3, num_compute_wgs=3,
                        consumer_regs=160, producer_regs=32)],
      256: [fl.FwdConfig(block_kv=64, num_stages=2, pingpong=False),
            fl.FwdConfig(block_kv=64, num_stages=2, no_auto_barriers=True)],
  }
  bwd_variants = {
      128: [bl.BwdConfig(num_stages=3),
            bl.BwdConfig(block_kv_dq=128),
            bl.BwdConfig(fused_dq=True, consumer_regs=232,
                         producer_regs=40)],
      64: [bl.BwdConfig(block_q_dkv=128, block_kv_dq=128),
           bl.BwdConfig(num_stages=3),
           bl.BwdConfig(fused_dq=True, num_stages=3)],
  }
  for h in (128, 64, 256):
    for t, causal in ((16384, False), (4096, True)):
      pt = _grid_point(t, h, causal, gqa=h == 128)
      for i, cfg in enumerate(fwd_variants[h]):
        label = f"tune fwd H{h} T{t} {'causal' if causal else 'full'} {cfg}"
        try:
          time_point(label, impls=("ours",), passes=("fwd",),
                     fwd_config=cfg, tokamax=False, **pt)
        except Exception as e:  # pylint: disable=broad-except
          record(section="time", label=label, error=str(e)[:300])
      for cfg in bwd_variants.get(h, []):
        label = f"tune bwd H{h} T{t} {'causal' if causal else 'full'} {cfg}"
        try:
          time_point(label, impls=("ours",), passes=("fwdbwd",),
                     bwd_config=cfg, tokamax=False, **pt)
        except Exception as e:  # pylint: disable=broad-except
          record(section="time", label=label, error=str(e)[:300])


# ---------------------------------------------------------------------------
# Driver.


def summary():
  path = os.path.join(out_dir(), "mosaic_check.jsonl")
  rows = [json.loads(line) for line in open(path)] if os.path.exists(
      path) else []
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
    print("\nTFLOP/s (fwd = 4BNTSH, halved causal; fwd+bwd = 3.5x fwd)")
    hdr = (f"{'config':44s} {'ours':>6s} {'cudnn':>6s} {'tkmx':>6s} "
           f"{'ratio':>6s} | {'ours':>6s} {'fused':>6s} {'cudnn':>6s} "
           f"{'tkmx':>6s} {'ratio':>6s}")
    print(f"{'':44s} {'---------- forward ----------':>29s} | "
          f"{'----------- forward+backward -----------':>36s}")
    print(hdr)
    fmt = lambda x: f"{x:6.1f}" if isinstance(x, (int, float)) else f"{'-':>6s}"
    fmtr = lambda x: f"{x:6.2f}" if isinstance(x, (int, float)) else f"{'-':>6s}"

    def ratio(r, p):
      o = max([x for x in (r.get(f"ours_{p}"), r.get(f"fused_{p}"))
               if isinstance(x, (int, float))] or [None], key=lambda x: x or 0)
      best = max([x for x in (r.get(f"cudnn_{p}"), r.get(f"tokamax_{p}"))
                  if isinstance(x, (int, float))] or [0])
      return o / best if isinstance(o, (int, float)) and best else None

    for r in tim:
      if "error" in r:
        print(f"{r['label'][:44]:44s} ERROR {r['error'][:60]}")
        continue
      print(f"{r['label'][:44]:44s} {fmt(r.get('ours_fwd'))} "
            f"{fmt(r.get('cudnn_fwd'))} {fmt(r.get('tokamax_fwd'))} "
            f"{fmtr(ratio(r, 'fwd'))} | {fmt(r.get('ours_fwdbwd'))} "
            f"{fmt(r.get('fused_fwdbwd'))} "
            f"{fmt(r.get('cudnn_fwdbwd'))} {fmt(r.get('tokamax_fwdbwd'))} "
            f"{fmtr(ratio(r, 'fwdbwd'))}")
      if "maxdiff_vs_cudnn" in r:
        md = r["maxdiff_vs_cudnn"]
        if not isinstance(md, float) or md > 0.05 or r.get("nans"):
          print(f"    WARNING output vs cudnn: maxdiff {md} nans {r.get('nans')}")
      errs = {k: v for k, v in r.items() if k.endswith("_err")}
      for k, v in errs.items():
        print(f"    {k}: {v[:100]}")
  print(f"\n(details: {path})")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sections", default=",".join(SECTIONS))
  ap.add_argument("--budget", type=float, default=720)
  ap.add_argument("--no-tokamax", action="store_true")
  ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args._run:  # pylint: disable=protected-access
    globals()[f"section_{args._run}"](args)  # pylint: disable=protected-access
    return
  path = os.path.join(out_dir(), "mosaic_check.jsonl")
  if os.path.exists(path):
    os.rename(path, path + f".{int(time.time())}")
  start = time.time()
  hung = False
  for name in args.sections.split(","):
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
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", name]
    if args.no_tokamax:
      cmd.append("--no-tokamax")
    t0 = time.time()
    try:
      rc = subprocess.run(cmd, timeout=timeout, check=False).returncode
      status = "ok" if rc == 0 else f"exit {rc}"
    except subprocess.TimeoutExpired:
      status = "TIMEOUT (hang?)"
      hung = name == "smoke"
    record(section="status", name=name, status=status,
           seconds=round(time.time() - t0, 1))
  summary()


if __name__ == "__main__":
  main()
