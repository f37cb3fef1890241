"""Sequence-parallel benchmarks: 1 vs 2 devices (issue 6) and scaling.

Causal attention, B=1, N=16 heads, H=128, bf16, forward+backward.

Pairs (the default; ``python -m attnjax.bench --suite parallel``): total
length T in {32k, 128k}, ``attnjax.dot_product_attention`` on one device
(the baseline t1), then ``attnjax.parallel.sequence_parallel_attention`` on
two devices with each strategy (ring / ulysses / all_gather, with and
without load balancing), and ringattention 0.1.2 (haoliuhl, ``pip install
ringattention``; its GPU path is its pure-JAX blockwise ring) on 1 and 2
devices when it is importable. Scaling efficiency is ``t1 / (2 * t2)``.

Scaling (``--scaling``): weak scaling (T per device fixed, default 128k:
T = 128k, 256k, 512k on 1, 2, 4 devices) and strong scaling (T fixed,
default 512k, on 1, 2, 4 devices) of ring (load-balanced), Ulysses (N=16
and N=32), all-gather, LASP-2 linear attention
(``sequence_parallel_linear_attention``, a fixed per-head decay) and
ringattention. Efficiencies: strong ``t1(T) / (n tn(T))``; weak ``w t1(T/n)
/ (n tn(T))`` with w the work ratio (n^2 for softmax attention, n for
linear attention), i.e. per-device throughput relative to one device.

    PYTHONPATH=$PWD python3 -m attnjax.bench.parallel [--quick] [--seqs ...]
    PYTHONPATH=$PWD python3 -m attnjax.bench.parallel --scaling \\
        [--devices 1,2,4] [--weak-per-device 131072] [--strong 524288] \\
        [--report docs/benchmarks]

Device time is budgeted: ``--budget-s`` (or ``ATTNJAX_BENCH_BUDGET_S``)
stops starting new configurations after that many seconds, ``--max-call-s``
skips a configuration whose one call is predicted (from a smaller measured
one, quadratic in T) to take longer. ``ATTNJAX_BENCH_ROWS=path`` appends
every row as a JSON line as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import parallel
from attnjax.bench import common
from attnjax.softmax import api as softmax_api
from attnjax.softmax.problem import make_problem

__all__ = ["add_ratios", "add_scaling", "block_backend", "markdown",
           "merge_rows", "plot", "run", "run_scaling", "scaling_markdown",
           "scaling_plot"]

HEADS, HEAD_DIM, BATCH = 16, 128, 1
SEQS = (32768, 131072)
# ringattention's chunk sizes (its blockwise kernel): env-overridable.
RA_CHUNK = int(os.environ.get("ATTNJAX_BENCH_RA_CHUNK", "1024"))
# One call slower than this is timed once more only (device budget).
_SLOW_S = 1.0


class _Budget:
  """Wall-clock budget and the per-call time predictions that guard it."""

  def __init__(self, seconds=None, max_call_s=None):
    env = os.environ.get("ATTNJAX_BENCH_BUDGET_S")
    self.seconds = seconds if seconds is not None else (
        float(env) if env else None)
    self.max_call_s = max_call_s
    self.start = time.perf_counter()

  def skip_reason(self, rows, row_kw, work):
    if self.seconds is not None and (time.perf_counter() - self.start
                                     > self.seconds):
      return "skipped: benchmark time budget spent"
    if self.max_call_s is None:
      return None
    # Predict from the largest measured row of the same kind.
    key = (row_kw["impl"], row_kw["strategy"], row_kw.get("heads", HEADS))
    prev = [r for r in rows if "ms" in r and r.get("work")
            and (r["impl"], r["strategy"], r.get("heads", HEADS)) == key]
    if not prev:
      return None
    p = max(prev, key=lambda r: r["work"])
    guess = (p["ms"] / 1e3 * work / p["work"] * p["devices"]
             / row_kw["devices"])
    if guess > self.max_call_s:
      return (f"skipped: predicted {guess:.1f} s per call > "
              f"{self.max_call_s:.0f} s budget")
    return None

  def record(self, row):
    common.append_row(row)


def _import_ringattention():
  """ringattention 0.1.2, or None. Its __init__ reads
  ``jax.lib.xla_bridge.get_backend().platform``, gone in jax 0.11: give it
  an equivalent before importing (only to pick its platform variant)."""
  if not hasattr(jax.lib, "xla_bridge"):
    jax.lib.xla_bridge = types.SimpleNamespace(
        get_backend=lambda: types.SimpleNamespace(
            platform=jax.default_backend()))
  try:
    import ringattention  # noqa: PLC0415
  except ImportError:
    return None
  return ringattention


def block_backend(dtype=jnp.bfloat16, t=4096) -> tuple[str, str]:
  """(forward backend the blocks use here, how its backward runs)."""
  x = jax.ShapeDtypeStruct((1, t, HEADS, HEAD_DIM), dtype)
  p, _ = make_problem(jnp.zeros(x.shape, x.dtype), jnp.zeros(x.shape, x.dtype),
                      jnp.zeros(x.shape, x.dtype), is_causal=True)
  for name in softmax_api.resolve_implementations(None, p):
    try:
      jax.eval_shape(lambda q, k, v, name=name: attnjax.dot_product_attention(
          q, k, v, is_causal=True, return_residuals=True,
          implementation=name), x, x, x)
    except (NotImplementedError, ExceptionGroup):
      continue
    how = ("residual backward" if name in
           softmax_api.BACKWARD_IMPLEMENTATIONS else
           "recompute + block VJP")
    return name, how
  return "none", "none"


def _time(fn, *args) -> float:
  """Seconds per call: compile and warm up, then one timed call; calls
  under ``_SLOW_S`` get the median of 3 repeats of back-to-back calls."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  if once > _SLOW_S:
    return once
  n = max(1, min(50, int(0.3 / max(once, 1e-6))))
  samples = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / n)
  return min(once, statistics.median(samples))


def _fwd_bwd(f):
  def g(*args):
    *xs, do = args
    _, vjp = jax.vjp(f, *xs)
    return vjp(do)
  return jax.jit(g)


def _inputs(t, dtype, sharding, heads=HEADS, linear=False):
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (BATCH, t, heads, HEAD_DIM)
  scale = (1.0 / np.sqrt(HEAD_DIM)) if linear else 1.0
  mk = lambda s: jax.jit(lambda k: (jax.random.normal(
      k, shape, jnp.float32) * s).astype(dtype), out_shardings=sharding)
  # Linear attention: keys scaled so the state stays O(1) (as bench.linear).
  return [mk(scale if linear and i == 1 else 1.0)(k)
          for i, k in enumerate(keys)]


def _ring_attention_fn(ra, mesh, chunk):
  kw = dict(causal_block_size=1, deterministic=True, dropout_rng=None,
            attn_pdrop=0.0, query_chunk_size=chunk, key_chunk_size=chunk,
            policy=jax.checkpoint_policies.nothing_saveable,
            dtype=jnp.bfloat16, precision=None, prevent_cse=True)
  inner = lambda q, k, v: ra.ringattention_jax(q, k, v, None, None, None,
                                               "seq", True, kw)
  # Its accumulators are not typed for shard_map's varying-axes check.
  return jax.shard_map(inner, mesh=mesh, in_specs=P(None, "seq"),
                       out_specs=P(None, "seq"), check_vma=False)


def _log_decay(heads):
  return -jnp.exp(jnp.linspace(-5.0, -1.0, heads))


def _linear_fn(mesh, heads):
  """LASP-2 on ``mesh`` (linear_attention itself on one device)."""
  decay = _log_decay(heads)
  if mesh.devices.size == 1:
    return lambda q, k, v: attnjax.linear_attention(q, k, v,
                                                    log_decay=decay)
  return lambda q, k, v: parallel.sequence_parallel_linear_attention(
      q, k, v, mesh=mesh, log_decay=decay)


def _row(impl, strategy, t, devices, lb, seconds=None, error=None,
         heads=HEADS, linear=False):
  flops = common.attention_flops(BATCH, heads, t, t, HEAD_DIM, causal=True,
                                 mode="fwd+bwd")
  row = dict(impl=impl, strategy=strategy, T=t, devices=devices,
             load_balance=lb, causal=True, heads=heads,
             work=float(t) if linear else float(t) * t * heads)
  if seconds is not None:
    row["ms"] = seconds * 1e3
    if linear:
      row["mtok_s"] = BATCH * t / seconds / 1e6
    else:
      row["tflops"] = flops / seconds / 1e12
      row["tflops_per_device"] = row["tflops"] / devices
  if error is not None:
    row["error"] = error[:300]
  return row


def _measure(rows, make_fn, make_args, budget=None, **row_kw):
  """One configuration: inputs made here (and freed after)."""
  work = _row(**row_kw)["work"]
  reason = budget.skip_reason(rows, row_kw, work) if budget else None
  if reason:
    rows.append(_row(error=reason, **row_kw))
  else:
    try:
      args = make_args()
      s = _time(make_fn(), *args)
      rows.append(_row(seconds=s, **row_kw))
    except Exception as e:  # noqa: BLE001 (one failed config must not stop)
      rows.append(_row(error=f"{type(e).__name__}: {e}", **row_kw))
    finally:
      args = None
  if budget:
    budget.record(rows[-1])
  print(_fmt(rows[-1]), flush=True)


def _fmt(r):
  ms = f"{r['ms']:.1f} ms" if "ms" in r else r.get("error", "")
  return (f"  {r['impl']:13s} {r['strategy']:10s} N={r.get('heads', 16):<3d}"
          f" T={r['T']:<7d} dev={r['devices']} "
          f"lb={r['load_balance']!s:5s} {ms}")


def _mesh(devs, n):
  return Mesh(np.array(devs[:n]), ("seq",), axis_types=(AxisType.Auto,))


def run(quick: bool = False, seqs=None, strategies=None,
        ringattention: bool = True, budget_s=None) -> list[dict]:
  """Issue 6's rows (see module docstring); prints each as it goes."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  if seqs is None:
    seqs = SEQS if on_gpu and not quick else ((4096,) if on_gpu else (1024,))
  strategies = strategies or ("single", "ring", "ulysses", "all_gather")
  devs = jax.devices()
  ndev = 2 if len(devs) >= 2 else 1
  ra = _import_ringattention() if ringattention else None
  name, how = block_backend(dtype)
  print(f"parallel: {len(devs)} x {devs[0].device_kind}; block backend "
        f"{name} ({how}); ringattention "
        f"{'found' if ra is not None else 'not used'}", flush=True)
  budget = _Budget(budget_s)
  rows = []
  one, two = _mesh(devs, 1), _mesh(devs, ndev)
  for t in seqs:
    chunk = min(RA_CHUNK, t // (2 * ndev))
    args1 = lambda t=t: _inputs(t, dtype, NamedSharding(one, P()))
    if "single" in strategies:
      _measure(rows, lambda: _fwd_bwd(lambda q, k, v: (
          attnjax.dot_product_attention(q, k, v, is_causal=True))), args1,
               budget, impl="attnjax", strategy="single", t=t, devices=1,
               lb=False)
    if ra is not None:
      _measure(rows, lambda chunk=chunk: _fwd_bwd(
          _ring_attention_fn(ra, one, chunk)), args1, budget,
               impl="ringattention", strategy="ring", t=t, devices=1,
               lb=False)
    if ndev < 2:
      continue
    args2 = lambda t=t: _inputs(t, dtype, NamedSharding(two, P(None, "seq")))
    for strategy, lbs in (("ring", (True, False)), ("ulysses", (False,)),
                          ("all_gather", (True, False))):
      if strategy not in strategies:
        continue
      for lb in lbs:
        _measure(rows, lambda strategy=strategy, lb=lb: _fwd_bwd(
            lambda q, k, v: parallel.sequence_parallel_attention(
                q, k, v, mesh=two, strategy=strategy, load_balance=lb,
                is_causal=True)), args2, budget, impl="attnjax",
                 strategy=strategy, t=t, devices=2, lb=lb)
    if ra is not None:
      _measure(rows, lambda chunk=chunk: _fwd_bwd(
          _ring_attention_fn(ra, two, chunk)), args2, budget,
               impl="ringattention", strategy="ring", t=t, devices=2,
               lb=False)
  add_ratios(rows)
  return rows


def add_ratios(rows):
  """efficiency = t1 / (devices * t) with t1 the same impl on one device."""
  base = {(r["impl"], r["T"]): r["ms"] for r in rows
          if r["devices"] == 1 and "ms" in r}
  for r in rows:
    t1 = base.get((r["impl"], r["T"]))
    if "ms" in r and t1:
      r["efficiency"] = t1 / (r["devices"] * r["ms"])


def _get(rows, **kw):
  for r in rows:
    if all(r.get(k) == v for k, v in kw.items()) and "ms" in r:
      return r
  return None


def markdown(rows) -> str:
  name, how = block_backend()
  table = common.markdown_table(
      ["T", "impl", "strategy", "devices", "load balance", "ms", "TFLOP/s",
       "efficiency"],
      [[r["T"], r["impl"], r["strategy"], r["devices"], r["load_balance"],
        r.get("ms", r.get("error")), r.get("tflops"), r.get("efficiency")]
       for r in rows])
  lines = [f"Causal fwd+bwd, B={BATCH}, N={HEADS}, H={HEAD_DIM}; per-device "
           f"block backend: {name} ({how}). efficiency = t1 / (n * tn), t1 "
           "the same implementation on one device.", "", table, "",
           "Goals (2 devices):", ""]
  for t in sorted({r["T"] for r in rows}):
    ring = _get(rows, T=t, impl="attnjax", strategy="ring", devices=2,
                load_balance=True)
    ring_u = _get(rows, T=t, impl="attnjax", strategy="ring", devices=2,
                  load_balance=False)
    ra = _get(rows, T=t, impl="ringattention", devices=2)
    best = min((r for r in rows if r["T"] == t and r["devices"] == 2
                and r["impl"] == "attnjax" and "ms" in r),
               key=lambda r: r["ms"], default=None)
    if best is None:
      continue
    out = [f"- T={t}: best {best['strategy']} (lb={best['load_balance']}) "
           f"efficiency {best.get('efficiency', float('nan')):.3f} "
           "(goal >= 0.90 at 128k)"]
    if ring:
      out.append(f"ring (lb) efficiency "
                 f"{ring.get('efficiency', float('nan')):.3f}")
    if ring and ring_u:
      out.append(f"ring load-balanced vs not: "
                 f"{ring_u['ms'] / ring['ms']:.2f}x (goal >= 1.5x)")
    if ra:
      out.append(f"vs ringattention: {ra['ms'] / best['ms']:.2f}x "
                 "(goal >= 1.5x)")
      if ring:
        out.append(f"ring vs ringattention: {ra['ms'] / ring['ms']:.2f}x")
    lines.append("; ".join(out))
  return "\n".join(lines)


def plot(rows):
  def draw(plt):
    seqs = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(seqs), figsize=(6 * len(seqs), 4),
                             squeeze=False)
    for ax, t in zip(axes[0], seqs):
      rs = [r for r in rows if r["T"] == t and "ms" in r]
      labels = [f"{r['impl']}\n{r['strategy']}\n{r['devices']}dev"
                + (" lb" if r["load_balance"] else "") for r in rs]
      ax.bar(range(len(rs)), [r["ms"] for r in rs])
      ax.set_xticks(range(len(rs)), labels, fontsize=7)
      ax.set_ylabel("fwd+bwd ms")
      ax.set_title(f"causal, T={t}")
    fig.tight_layout()
    return fig
  return draw


# Scaling --------------------------------------------------------------------

# (label, impl, strategy, heads, load_balance, linear)
SCALING_KINDS = (
    ("ring", "attnjax", "ring", 16, True, False),
    ("ulysses", "attnjax", "ulysses", 16, False, False),
    ("all_gather", "attnjax", "all_gather", 16, True, False),
    ("lasp2", "attnjax", "lasp2", 16, False, True),
    ("ulysses N=32", "attnjax", "ulysses", 32, False, False),
    ("ringattention", "ringattention", "ring", 16, False, False),
)


def scaling_points(devices, weak_per_device, strong):
  """(T, n) points, most important first: the weak series, then strong."""
  pts = []
  for n in devices:
    pts.append((weak_per_device * n, n))
  for n in devices:
    if (strong, n) not in pts:
      pts.append((strong, n))
  return pts


def run_scaling(devices=(1, 2, 4), weak_per_device=131072, strong=524288,
                kinds=None, budget_s=None, max_call_s=None) -> list[dict]:
  """Weak and strong scaling rows (see the module docstring)."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  devs = jax.devices()
  devices = tuple(n for n in devices if n <= len(devs))
  kinds = [k for k in SCALING_KINDS if kinds is None or k[0] in kinds]
  ra = (_import_ringattention() if any(k[1] == "ringattention"
                                       for k in kinds) else None)
  name, how = block_backend(dtype)
  print(f"scaling: {len(devs)} x {devs[0].device_kind}; devices {devices}; "
        f"block backend {name} ({how}); ringattention "
        f"{'found' if ra is not None else 'not used'}", flush=True)
  budget = _Budget(budget_s, max_call_s)
  rows = []
  for t, n in scaling_points(devices, weak_per_device, strong):
    mesh = _mesh(devs, n)
    spec = P() if n == 1 else P(None, "seq")
    done_single = set()
    for label, impl, strategy, heads, lb, linear in kinds:
      if impl == "ringattention" and ra is None:
        continue
      make_args = lambda t=t, heads=heads, linear=linear: _inputs(
          t, dtype, NamedSharding(mesh, spec), heads, linear)
      kw = dict(t=t, devices=n, heads=heads, linear=linear)
      if impl == "ringattention":
        chunk = min(RA_CHUNK, t // (2 * n))
        _measure(rows, lambda chunk=chunk: _fwd_bwd(_ring_attention_fn(
            ra, mesh, chunk)), make_args, budget, impl=impl,
                 strategy="ring", lb=False, **kw)
      elif linear:
        _measure(rows, lambda: _fwd_bwd(_linear_fn(mesh, heads)), make_args,
                 budget, impl=impl, strategy="lasp2" if n > 1 else "linear",
                 lb=False, **kw)
      elif n == 1:
        if heads in done_single:
          continue
        done_single.add(heads)
        _measure(rows, lambda: _fwd_bwd(lambda q, k, v: (
            attnjax.dot_product_attention(q, k, v, is_causal=True))),
                 make_args, budget, impl=impl, strategy="single", lb=False,
                 **kw)
      else:
        _measure(rows, lambda strategy=strategy, lb=lb: _fwd_bwd(
            lambda q, k, v: parallel.sequence_parallel_attention(
                q, k, v, mesh=mesh, strategy=strategy, load_balance=lb,
                is_causal=True)), make_args, budget, impl=impl,
                 strategy=strategy, lb=lb, **kw)
  add_scaling(rows)
  return rows


def _family(r):
  """Rows sharing a one-device baseline: (impl, linear?, heads)."""
  linear = r["strategy"] in ("lasp2", "linear")
  return (r["impl"], linear, r.get("heads", HEADS))


def add_scaling(rows):
  """strong_eff = t1(T) / (n tn(T)); weak_eff = w t1(T/n) / (n tn(T)) with
  w = T/(T/n) squared (softmax) or not (linear attention), t1 the same
  family's one-device time (attnjax's single-device kernel for every attnjax
  softmax strategy)."""
  base = {(_family(r), r["T"]): r["ms"] for r in rows
          if r["devices"] == 1 and "ms" in r}
  for r in rows:
    if "ms" not in r:
      continue
    n, fam = r["devices"], _family(r)
    t1 = base.get((fam, r["T"]))
    if t1:
      r["strong_eff"] = t1 / (n * r["ms"])
    t0 = r["T"] // n
    t1w = base.get((fam, t0))
    if t1w:
      w = n if fam[1] else n * n
      r["weak_eff"] = w * t1w / (n * r["ms"])


def merge_rows(paths) -> list[dict]:
  """Rows of several ``ATTNJAX_BENCH_ROWS`` files, derived columns redone.

  Later files win where two rows describe the same configuration."""
  keyed = {}
  for r in common.read_rows(paths)[0]:
    for k in ("strong_eff", "weak_eff", "efficiency"):
      r.pop(k, None)
    key = (r["impl"], r["strategy"], r["T"], r["devices"],
           r.get("heads", HEADS), r["load_balance"])
    if "ms" in r or key not in keyed:
      keyed[key] = r
  rows = sorted(keyed.values(), key=lambda r: (r["devices"], r["T"]))
  add_scaling(rows)
  return rows


def _label(r):
  if r["impl"] == "ringattention":
    return "ringattention"
  if r["strategy"] in ("lasp2", "linear"):
    return "lasp2"
  if r["strategy"] == "single":
    return "single" + ("" if r.get("heads", HEADS) == HEADS else
                       f" N={r['heads']}")
  s = r["strategy"]
  return s if r.get("heads", HEADS) == HEADS else f"{s} N={r['heads']}"


def _series(rows, r):
  """Which scaling series a row belongs to (its 1-device row included)."""
  lab = _label(r)
  if lab.startswith("single"):
    n32 = r.get("heads", HEADS) != HEADS
    return ["ulysses N=32"] if n32 else ["ring", "ulysses", "all_gather"]
  return [lab]


def scaling_markdown(rows, weak_per_device=None, strong=None,
                     backend=None) -> str:
  """Weak and strong scaling tables; ``backend`` = (name, how) of the
  per-device blocks (default: what this process would use)."""
  name, how = backend or block_backend()
  ts = sorted({r["T"] for r in rows})
  if strong is None and ts:
    strong = ts[-1]
  if weak_per_device is None:
    ones = sorted({r["T"] for r in rows if r["devices"] == 1})
    weak_per_device = ones[0] if ones else None
  hdr = ["series", "impl", "strategy", "N", "T", "devices", "ms",
         "TFLOP/s per GPU (or Mtok/s)", "efficiency"]

  def table(sel, eff_key):
    out = []
    for r in sorted(sel, key=lambda r: (_series(rows, r)[0], r["devices"])):
      val = r.get("tflops_per_device", r.get("mtok_s"))
      out.append([", ".join(_series(rows, r)), r["impl"], r["strategy"],
                  r.get("heads", HEADS), r["T"], r["devices"],
                  r.get("ms", r.get("error")), val, r.get(eff_key)])
    return common.markdown_table(hdr, out)

  weak = [r for r in rows if weak_per_device
          and r["T"] == weak_per_device * r["devices"]]
  strong_rows = [r for r in rows if r["T"] == strong]
  lines = [
      f"Causal fwd+bwd, B={BATCH}, H={HEAD_DIM}, bf16; per-device block "
      f"backend {name} ({how}). LASP-2: causal linear attention with a fixed "
      "per-head decay (throughput in Mtok/s).", "",
      f"## Weak scaling ({weak_per_device} tokens per device)", "",
      "efficiency = w t1(T/n) / (n tn(T)), w = n^2 (softmax) or n (linear): "
      "per-device throughput relative to one device.", "",
      table(weak, "weak_eff"), "",
      f"## Strong scaling (T = {strong})", "",
      "efficiency = t1(T) / (n tn(T)), t1 the one-device time of the same "
      "family (attnjax's single-device kernel for ring / ulysses / "
      "all_gather).", "",
      table(strong_rows, "strong_eff"), ""]
  return "\n".join(lines)


def scaling_plot(rows, weak_per_device=None, strong=None):
  def draw(plt):
    ts = sorted({r["T"] for r in rows})
    st = strong or (ts[-1] if ts else None)
    ones = sorted({r["T"] for r in rows if r["devices"] == 1})
    wk = weak_per_device or (ones[0] if ones else None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title, sel in (
        (axes[0], "weak_eff", f"weak scaling, {wk} tokens/GPU",
         lambda r: wk and r["T"] == wk * r["devices"]),
        (axes[1], "strong_eff", f"strong scaling, T={st}",
         lambda r: r["T"] == st)):
      series = {}
      for r in rows:
        if not sel(r) or "ms" not in r:
          continue
        eff = 1.0 if r["devices"] == 1 else r.get(key)
        if eff is None:
          continue
        for s in _series(rows, r):
          series.setdefault(s, []).append((r["devices"], eff))
      for s, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
      ax.axhline(0.85, color="gray", ls=":", lw=1)
      ax.set_xlabel("GPUs")
      ax.set_ylabel("scaling efficiency")
      ax.set_ylim(0, 1.15)
      ax.set_title(title)
      ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
  return draw


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seqs", default=None, help="e.g. 32768,131072")
  ap.add_argument("--strategies", default=None,
                  help="pairs: subset of single,ring,ulysses,all_gather")
  ap.add_argument("--no-ringattention", action="store_true")
  ap.add_argument("--scaling", action="store_true",
                  help="weak and strong scaling instead of 1 vs 2 devices")
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--weak-per-device", type=int, default=131072)
  ap.add_argument("--strong", type=int, default=524288)
  ap.add_argument("--kinds", default=None,
                  help="scaling: subset of " + ",".join(
                      k[0] for k in SCALING_KINDS))
  ap.add_argument("--budget-s", type=float, default=None)
  ap.add_argument("--max-call-s", type=float, default=None)
  ap.add_argument("--out", default=None, help="write rows as JSON here")
  ap.add_argument("--report", default=None,
                  help="write <suite>-<device>.json/md/png into this folder")
  ap.add_argument("--from-rows", default=None,
                  help="scaling: measure nothing; merge these comma-separated "
                  "JSON-lines files (ATTNJAX_BENCH_ROWS of runs on disjoint "
                  "GPU groups of one host) into one report")
  ap.add_argument("--info", default=None,
                  help="with --from-rows: a --out JSON of one of those runs, "
                  "whose device info the report carries")
  args = ap.parse_args(argv)
  info = None
  if args.scaling:
    kinds = args.kinds.split(",") if args.kinds else None
    devices = tuple(int(d) for d in args.devices.split(","))
    if args.from_rows:
      rows = merge_rows(args.from_rows.split(","))
      if args.info:
        with open(args.info) as f:
          info = json.load(f)["info"]
    else:
      rows = run_scaling(devices, args.weak_per_device, args.strong, kinds,
                         args.budget_s, args.max_call_s)
    backend = tuple(info["block_backend"]) if info and (
        "block_backend" in info) else block_backend()
    md = scaling_markdown(rows, args.weak_per_device, args.strong, backend)
    suite, pl = "parallel-scaling", scaling_plot(rows, args.weak_per_device,
                                                 args.strong)
  else:
    seqs = tuple(int(s) for s in args.seqs.split(",")) if args.seqs else None
    strategies = (tuple(args.strategies.split(",")) if args.strategies
                  else None)
    rows = run(quick=args.quick, seqs=seqs, strategies=strategies,
               ringattention=not args.no_ringattention,
               budget_s=args.budget_s)
    md = markdown(rows)
    suite, pl = "parallel", plot(rows)
  print("\n" + md)
  if info is None:
    info = common.device_info()
    info["block_backend"] = list(block_backend())
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"info": info, "rows": rows}, f, indent=1)
  if args.report:
    print("wrote " + ", ".join(common.write_report(
        args.report, suite, info, rows, md, pl)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
