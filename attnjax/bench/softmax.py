"""Softmax attention: attnjax's backends side by side with jax.nn and tokamax.

Grid (issue 3/4): T in {1k, 4k, 16k} with B*T = 16k tokens, causal and full,
H in {64, 128, 256} with N*H = 2048, plus GQA N=16 K=4 at H=128, bf16,
forward and forward+backward. Every row's ratio is attnjax's best over the best
other implementation measured in the same process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import traceback

import jax
import jax.numpy as jnp

import attnjax
from attnjax.bench import common

# (H, N, K) head configurations of the grid.
# name -> (H, N, K): N * H = 2048, GQA 4:1 at every head dim (the Hopper
# issue's grid: H in {64, 128, 256}, MHA and GQA).
HEAD_CONFIGS = {"64": (64, 32, 32), "64gqa": (64, 32, 8),
                "128": (128, 16, 16), "128gqa": (128, 16, 4),
                "256": (256, 8, 8), "256gqa": (256, 8, 2)}


@dataclasses.dataclass(frozen=True)
class Config:
  b: int
  t: int
  n: int
  k: int
  h: int
  causal: bool
  dtype: str = "bfloat16"

  def label(self):
    return (f"H={self.h} N:K={self.n}:{self.k} T={self.t} B={self.b} "
            f"{'causal' if self.causal else 'full'}")


# Implementations timed only up to this T (they materialise T x S logits).
SHORT_ONLY = {"jax.nn xla": 4096}


def implementations(on_gpu: bool):
  """name -> (family, factory(causal) -> f(q, k, v))."""
  impls = {}

  def ours(name):
    return lambda causal: (lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=causal, implementation=name))

  if on_gpu:
    for name in ("pallas_mosaic_gpu", "pallas_triton"):
      impls[f"attnjax {name}"] = ("attnjax", ours(name))
    impls["jax.nn cudnn"] = ("other", lambda causal: (
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")))
    # jax.nn's default (XLA, materialised logits): short sequences only.
    impls["jax.nn xla"] = ("other", lambda causal: (
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla")))
    try:
      import tokamax  # noqa: PLC0415
      for name in ("mosaic", "triton"):
        impls[f"tokamax {name}"] = ("other", (
            lambda name: lambda causal: (
                lambda q, k, v: tokamax.dot_product_attention(
                    q, k, v, is_causal=causal, implementation=name)))(name))
    except Exception as e:  # noqa: BLE001 - optional anchor
      print(f"tokamax not available: {type(e).__name__}: {e}")
  else:
    for name in ("xla_chunked", "xla"):
      impls[f"attnjax {name}"] = ("attnjax", ours(name))
    impls["jax.nn xla"] = ("other", lambda causal: (
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                     is_causal=causal)))
  return impls


def grid(quick: bool, on_gpu: bool, heads=None, seqs=None):
  if quick:
    if on_gpu:
      return [Config(4, 4096, 16, 16, 128, c) for c in (False, True)]
    return [Config(2048 // t, t, 4, 4, 64, c, "float32")
            for t in (256, 1024) for c in (False, True)]
  heads = heads or list(HEAD_CONFIGS)
  seqs = seqs or [1024, 4096, 16384]
  out = []
  for hc in heads:
    h, n, k = HEAD_CONFIGS[hc]
    for t in seqs:
      for c in (False, True):
        out.append(Config(16384 // t, t, n, k, h, c))
  return out


def _rel_err(fn, q, k, v, causal, cache):
  """Relative error against the float32 reference on the first sequence."""
  if "ref" not in cache:
    q1, k1, v1 = (x[:1].astype(jnp.float32) for x in (q, k, v))
    cache["ref"] = attnjax.dot_product_attention(
        q1, k1, v1, is_causal=causal, implementation="xla")
  ref = cache["ref"]
  got = fn(q[:1], k[:1], v[:1]).astype(jnp.float32)
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def _compile_all(tasks, threads: int):
  """AOT-compiles every (jitted fn, args) task, ``threads`` at a time.

  Compilation (Triton / Mosaic / ptxas) dominates a side-by-side run; the
  executables do not depend on each other, so they are built concurrently
  and timed one by one afterwards. A task whose compilation raises keeps the
  exception, re-raised when it is timed.
  """
  def build(task):
    f, args = task
    try:
      return f.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - reported per row
      return e
  if threads <= 1:
    return [build(t) for t in tasks]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(build, tasks))


def run(quick: bool = False, heads=None, seqs=None, modes=("fwd", "fwd+bwd"),
        impl_filter=None) -> list[dict]:
  on_gpu = jax.default_backend() == "gpu"
  impls = implementations(on_gpu)
  if impl_filter:
    impls = {k: v for k, v in impls.items()
             if any(f in k for f in impl_filter)}
  threads = int(os.environ.get("ATTNJAX_BENCH_COMPILE_THREADS",
                               "8" if on_gpu else "1"))
  rows = []
  for cfg in grid(quick, on_gpu, heads, seqs):
    keys = jax.random.split(jax.random.key(cfg.t * 7 + cfg.h + cfg.causal), 4)
    dt = jnp.dtype(cfg.dtype)
    q = jax.random.normal(keys[0], (cfg.b, cfg.t, cfg.n, cfg.h), dt)
    k = jax.random.normal(keys[1], (cfg.b, cfg.t, cfg.k, cfg.h), dt)
    v = jax.random.normal(keys[2], (cfg.b, cfg.t, cfg.k, cfg.h), dt)
    do = jax.random.normal(keys[3], q.shape, dt)
    ref_cache = {}
    todo = []  # (name, family, mode, jitted fn, args)
    for name, (family, make) in impls.items():
      if name in SHORT_ONLY and cfg.t > SHORT_ONLY[name]:
        continue
      fwd = make(cfg.causal)
      for mode in modes:
        if mode == "fwd":
          todo.append((name, family, mode, jax.jit(fwd), (q, k, v)))
        else:
          todo.append((name, family, mode, jax.jit(
              lambda q, k, v, do, fwd=fwd: jax.vjp(fwd, q, k, v)[1](do)),
                       (q, k, v, do)))
    built = _compile_all([(t[3], t[4]) for t in todo], threads)
    for (name, family, mode, f, args), exe in zip(todo, built):
      row = dict(suite="softmax", impl=name, family=family,
                 **dataclasses.asdict(cfg), mode=mode)
      flops = common.attention_flops(cfg.b, cfg.n, cfg.t, cfg.t, cfg.h,
                                     causal=cfg.causal, mode=mode)
      try:
        if isinstance(exe, Exception):
          raise exe
        sec = common.time_fn(exe, *args, min_seconds=0.15)
        if mode == "fwd" and cfg.t <= 1024:
          row["rel_err"] = _rel_err(f, *args, cfg.causal, ref_cache)
        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
      except Exception as e:  # noqa: BLE001 - record and go on
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        row.update(ms=None, tflops=None, error=msg)
        if not isinstance(e, NotImplementedError | ExceptionGroup):
          traceback.print_exception(e, limit=2)
      rows.append(row)
      common.append_row(row)  # survives a run cut short by a time limit
      tf = row.get("tflops")
      print(f"{cfg.label():44s} {mode:8s} {name:26s} "
            f"{'%8.1f TFLOP/s' % tf if tf else row.get('error', '')[:60]}",
            flush=True)
  add_ratios(rows)
  return rows


def add_ratios(rows):
  """ratio = attnjax's best / best other, per configuration and mode."""
  groups = {}
  for r in rows:
    key = tuple(r[k] for k in ("b", "t", "n", "k", "h", "causal", "mode"))
    groups.setdefault(key, []).append(r)
  for group in groups.values():
    best_other = max((r["tflops"] for r in group
                      if r["family"] == "other" and r.get("tflops")),
                     default=None)
    for r in group:
      if r["family"] == "attnjax" and r.get("tflops") and best_other:
        r["ratio_vs_best_other"] = r["tflops"] / best_other


# The goals' ratios (issues 3 and 4): one attnjax kernel over named peers.
GOALS = (
    ("pallas_triton / tokamax triton", "attnjax pallas_triton",
     ("tokamax triton",)),
    ("mosaic_gpu / best(cudnn, tokamax mosaic)", "attnjax pallas_mosaic_gpu",
     ("jax.nn cudnn", "tokamax mosaic")),
)


def _goal_ratio(by_impl, ours, peers):
  mine = by_impl.get(ours, {}).get("tflops")
  best = max((by_impl.get(p, {}).get("tflops") or 0 for p in peers),
             default=0)
  return mine / best if mine and best else None


def markdown(rows) -> str:
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  goals = [g for g in GOALS
           if g[1] in impls and any(p in impls for p in g[2])]
  groups = {}
  for r in rows:
    key = (r["h"], f"{r['n']}:{r['k']}", r["t"], int(r["causal"]), r["mode"])
    groups.setdefault(key, {})[r["impl"]] = r
  header = (["H", "N:K", "T", "causal", "pass"] + impls
            + ["attnjax best / best other"] + [g[0] for g in goals])
  table, per_goal = [], {g[0]: [] for g in goals}
  for key, by_impl in groups.items():
    ours = [r.get("tflops") for r in by_impl.values()
            if r["family"] == "attnjax" and r.get("tflops")]
    others = [r.get("tflops") for r in by_impl.values()
              if r["family"] == "other" and r.get("tflops")]
    ratio = (max(ours) / max(others)) if ours and others else None
    goal_ratios = [_goal_ratio(by_impl, g[1], g[2]) for g in goals]
    for g, x in zip(goals, goal_ratios):
      if x is not None:
        per_goal[g[0]].append((x, key))
    table.append(list(key) + [
        by_impl.get(i, {}).get("tflops") for i in impls] + [ratio]
        + goal_ratios)
  summary = []
  for name, vals in per_goal.items():
    if vals:
      lo, hi = min(vals), max(vals)
      behind = sum(x < 1.0 for x, _ in vals)
      summary.append(
          f"- {name}: {lo[0]:.2f}x (H={lo[1][0]} N:K={lo[1][1]} T={lo[1][2]} "
          f"{'causal' if lo[1][3] else 'full'} {lo[1][4]}) to {hi[0]:.2f}x; "
          f"below 1.0 on {behind} of {len(vals)} rows")
  return ("TFLOP/s (forward 4*B*N*T*S*H, halved when causal; "
          "forward+backward 3.5x); — = not supported or failed.\n\n"
          + ("Goal ratios (ours / peer, same process, same GPU):\n"
             + "\n".join(summary) + "\n\n" if summary else "")
          + common.markdown_table(header, table))


def plot(rows):
  def draw(plt):
    import numpy as np  # noqa: PLC0415
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys(
        (r["h"], r["n"], r["k"], r["t"], r["causal"], r["mode"])
        for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.55), 4.5))
    width = 0.8 / max(len(impls), 1)
    for i, name in enumerate(impls):
      vals = []
      for key in keys:
        match = [r for r in rows if r["impl"] == name and (
            r["h"], r["n"], r["k"], r["t"], r["causal"], r["mode"]) == key]
        vals.append(match[0].get("tflops") or 0 if match else 0)
      ax.bar(np.arange(len(keys)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4)
    ax.set_xticklabels([f"H{h} {n}:{k}\nT{t // 1024}k {'c' if c else 'f'} "
                        f"{m}" for h, n, k, t, c, m in keys], fontsize=6,
                       rotation=90)
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7)
    ax.set_title("softmax attention")
    return fig
  return draw
