"""Where the Mosaic GPU dK/dV kernel spends its time, from its own profiler.

Run from the repository root on an H100::

    PYTHONPATH=$PWD python3 scripts/gpu/mosaic_profile.py \
        --configs 128:4096:full:mha,128:16384:full:mha --variants fused,ours

For each grid point (``mosaic_check.py``'s ``H:T:causal|full:mha|gqa``, B*T
= 16k) and variant (``mosaic_check.py``'s names: ``ours`` is the default
plan, ``fused`` the fused backward, ``fusednj`` / ``fusednr`` /
``fusednodq`` its timing diagnostics), the forward+backward runs once with
Mosaic GPU's in-kernel profiler on in the dK/dV kernel
(``mosaic_gpu_bwd._PROFILE``). Each consumer warpgroup records its named
regions: ``prologue`` (its K/V tile load), ``step`` (one query block),
``dq`` (inside a fused step: the dS exchange, the dQ product and its
reduce-add) and ``epilogue`` (the final join and the dK/dV stores). The
trace (one JSON per kernel, Perfetto format: pid = SM, tid = warpgroup)
is summarised here and deleted unless ``--keep``:

* ``kernel_us``: first to last event;
* per region: count, mean, median and 90th percentile (us);
* ``step_interval``: start to start of consecutive steps of a warpgroup;
* ``step_by_place``: step durations among each warpgroup's first
  ``EDGE_STEPS`` steps, its last ones and those between;
* ``cta_span``: a CTA's first to last event; ``cta_outside_steps``: the
  part of it before its first step and after its last;
* ``sm_gap``: on one SM, from a CTA's last event to the next CTA's first
  (launch and drain between CTAs);
* the same span for the CTAs of the first wave and of the rest.

With ``--kernel fwd`` the forward kernel is profiled instead (a forward
run; ``mosaic_gpu._PROFILE``): per tile ``first`` and ``last`` (its first
and last key block) and ``epilogue``; per middle block ``step``, inside it
``wait_kv`` (the producer's K/V), ``wait_turn`` (the ping-pong turn),
``wait_s`` (this block's Q K^T), ``softmax``, ``wait_pv`` (the previous
P V) and ``rescale`` (O by alpha). The profiler's buffer is shared memory,
so ``--space`` is bounded by what the tiling leaves (H = 64: about 1800
with 3 stages; H = 128 with two Q buffers: none).

Profiling perturbs the kernel (a clock read and a shared-memory store per
region edge; at T = 4k full, B = 4, the fused kernel spills 4 / 4 bytes
with it, none without): compare variants within one run, not with
unprofiled times.
Summaries go to ``$OUT/mosaic_profile.jsonl``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _stats(xs):
  if not len(xs):  # noqa: PLC1802
    return None
  a = np.asarray(xs, np.float64)
  return dict(n=int(a.size), mean=round(float(a.mean()), 3),
              p50=round(float(np.percentile(a, 50)), 3),
              p90=round(float(np.percentile(a, 90)), 3))


# Steps counted as a warpgroup's first (last) ones in ``step_by_place``.
EDGE_STEPS = 4


def ranges(events):
  """{tid: [(name, start_us, end_us), ...]} from B/E trace events."""
  out, stacks = {}, {}
  for e in events:
    tid = e["tid"]
    if e["ph"] == "B":
      stacks.setdefault(tid, []).append(e)
    elif e["ph"] == "E":
      b = stacks[tid].pop()
      out.setdefault(tid, []).append((b["name"], b["ts"], e["ts"], b["pid"]))
  for rs in out.values():
    rs.sort(key=lambda r: r[1])
  return out


def summarize(events, traces_per_block: int):
  """The statistics of one kernel's trace (see the module docstring)."""
  by_tid = ranges(events)
  if not by_tid:
    return dict(error="no events")
  regions, intervals = {}, []
  by_pos = {"first": [], "middle": [], "last": []}
  ctas = {}  # block -> [start, end, pid, step_start, step_end]
  for tid, rs in by_tid.items():
    block = (tid - 1) // traces_per_block
    steps = [r for r in rs if r[0] == "step"]
    for name, b, e, _ in rs:
      regions.setdefault(name, []).append(e - b)
    intervals += list(np.diff([r[1] for r in steps]))
    # Step durations by place in the warpgroup's walk: a cost that only the
    # first (or last) steps of a CTA pay shows here, not in the mean.
    for j, r in enumerate(steps):
      pos = ("first" if j < EDGE_STEPS else
             "last" if j >= len(steps) - EDGE_STEPS else "middle")
      by_pos[pos].append(r[2] - r[1])
    c = ctas.setdefault(block, [np.inf, -np.inf, rs[0][3], np.inf, -np.inf])
    c[0] = min(c[0], rs[0][1])
    c[1] = max(c[1], max(r[2] for r in rs))
    if steps:
      c[3] = min(c[3], steps[0][1])
      c[4] = max(c[4], steps[-1][2])
  t0 = min(c[0] for c in ctas.values())
  t1 = max(c[1] for c in ctas.values())
  spans = {k: c[1] - c[0] for k, c in ctas.items()}
  outside = [(c[3] - c[0]) + (c[1] - c[4]) for c in ctas.values()
             if np.isfinite(c[3])]
  gaps = []
  by_sm = {}
  for c in ctas.values():
    by_sm.setdefault(c[2], []).append(c)
  for cs in by_sm.values():
    cs.sort(key=lambda c: c[0])
    gaps += [b[0] - a[1] for a, b in zip(cs, cs[1:])]
  # The first wave: every SM's first CTA.
  first = {id(cs[0]) for cs in by_sm.values()}
  wave1 = [c[1] - c[0] for c in ctas.values() if id(c) in first]
  rest = [c[1] - c[0] for c in ctas.values() if id(c) not in first]
  return dict(
      kernel_us=round(t1 - t0, 2), ctas=len(ctas), sms=len(by_sm),
      regions={k: _stats(v) for k, v in sorted(regions.items())},
      step_interval=_stats(intervals),
      step_by_place={k: _stats(v) for k, v in by_pos.items()},
      cta_span=_stats(list(spans.values())),
      cta_outside_steps=_stats(outside), sm_gap=_stats(gaps),
      first_wave_span=_stats(wave1), later_span=_stats(rest))


def profile_point(label, variant, *, b, t, n, kh, h, causal, space, base,
                  keep=False, kernel="bwd"):
  """Runs forward+backward once with the dK/dV kernel profiled (``kernel``
  "fwd": the forward alone, the forward kernel profiled); returns the
  summary of each trace written."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import mosaic_check as mc  # pylint: disable=g-import-not-at-top
  from attnjax.softmax import pallas_mosaic  # pylint: disable=g-import-not-at-top
  from attnjax.softmax.problem import make_problem  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash import mosaic_gpu as fl  # pylint: disable=g-import-not-at-top
  from pallas_kernels.flash import mosaic_gpu_bwd as bl  # pylint: disable=g-import-not-at-top

  q, k, v, do, _ = mc._inputs(jax.random.key(0), b, t, t, n, kh, h,  # pylint: disable=protected-access
                              jnp.bfloat16)
  fcfg, bcfg, _ = mc._variant_configs(variant, h)  # pylint: disable=protected-access
  folder = os.path.join(base, f"{label.replace(' ', '_')}-{variant}")
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)

  def attn(q, k, v):
    p, _ = make_problem(q, k, v, is_causal=causal)
    return pallas_mosaic.mosaic_attention(p, fwd_config=fcfg,
                                          bwd_config=bcfg)[0]

  def fb(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)

  def fwd_only(q, k, v):
    p, _ = make_problem(q, k, v, is_causal=causal)
    return pallas_mosaic.mosaic_attention(p, fwd_config=fcfg,
                                          need_backward=False)[0]

  if kernel == "fwd":
    fl._PROFILE = (space, folder)  # pylint: disable=protected-access
    try:
      with mc.kernel_forms(variant):
        jax.block_until_ready(jax.jit(fwd_only)(q, k, v))
      jax.effects_barrier()
    finally:
      fl._PROFILE = None  # pylint: disable=protected-access
  else:
    bl._PROFILE = (space, folder)  # pylint: disable=protected-access
    bl._FUSED_DROP = frozenset(mc.FUSED_DROPS.get(variant, ()))  # pylint: disable=protected-access
    try:
      with mc.kernel_forms(variant):
        jax.block_until_ready(jax.jit(fb)(q, k, v, do))
      jax.effects_barrier()
    finally:
      bl._PROFILE = None  # pylint: disable=protected-access
      bl._FUSED_DROP = frozenset()  # pylint: disable=protected-access
  plan = pallas_mosaic.make_plan(
      make_problem(q, k, v, is_causal=causal)[0], fwd_config=fcfg,
      bwd_config=bcfg)
  wgs = (plan.fwd if kernel == "fwd" else plan.bwd).num_compute_wgs + 1
  out = []
  for path in sorted(glob.glob(os.path.join(folder, "*-trace.json"))):
    with open(path) as f:
      events = json.load(f)["traceEvents"]
    out.append(dict(label=label, variant=variant, file=os.path.basename(path),
                    fused=plan.bwd.fused_dq, **summarize(events, wgs)))
  if not keep:
    shutil.rmtree(folder, ignore_errors=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--configs", default="128:4096:full:mha,128:16384:full:mha")
  ap.add_argument("--variants", default="fused,ours")
  ap.add_argument("--space", type=int, default=530,
                  help="profiler ranges per warpgroup (CTAs of up to "
                  "(space - 4) / 2 steps are whole)")
  ap.add_argument("--keep", action="store_true", help="keep the traces")
  ap.add_argument("--kernel", default="bwd", choices=("bwd", "fwd"),
                  help="profile the dK/dV kernel (forward+backward run) or "
                  "the forward kernel (forward run; SMEM limits --space: "
                  "about 1800 at H = 64 with 3 stages, 2500 with 2)")
  args = ap.parse_args()
  import mosaic_check as mc  # pylint: disable=g-import-not-at-top
  out = os.environ.get("OUT") or os.path.join(os.getcwd(), "mosaic_check_out")
  base = os.path.join(out, "mosaic_profile")
  os.makedirs(base, exist_ok=True)
  for h, t, causal, gqa in mc.parse_configs(args.configs):
    label = mc._label(h, t, causal, gqa)  # pylint: disable=protected-access
    for variant in args.variants.split(","):
      t0 = time.time()
      try:
        rows = profile_point(label, variant, space=args.space, base=base,
                             keep=args.keep, kernel=args.kernel,
                             **mc._grid_point(t, h, causal, gqa))  # pylint: disable=protected-access
      except Exception as e:  # pylint: disable=broad-except
        rows = [dict(label=label, variant=variant,
                     error=f"{type(e).__name__}: {str(e)[:400]}")]
      for r in rows:
        r["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(out, "mosaic_profile.jsonl"), "a") as f:
          f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
