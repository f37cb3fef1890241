"""MQAR recall vs model width: softmax, linear variants, BASED, hybrids.

``python -m experiments mqar [--quick | --full] [--out DIR]``

Writes ``results.json`` and ``mqar.png`` under experiments/results/mqar/ and
prints the accuracy table. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import time

import jax
import numpy as np
from flax import nnx

from attnjax.models import LanguageModel
from experiments import common, training
from experiments.mqar import task

# Every mixer gets the same short causal convolution on its q, k, v (kernel
# 4): Zoology's and BASED's recurrent baselines have one, and giving it to the
# attention layers too (Primer's multi-DConv-head attention) keeps the
# comparison about the mixer's recall capacity rather than about which model
# can form "previous token" features fastest. See README.md.
CONV = 4
# The linear layer of the "gated linear" model and of every hybrid: positive
# (elu + 1) features, a per-head data-dependent forget gate (Mamba-2 /
# simple GLA) and the running-sum normaliser.
GATED = dict(feature_map="elu_plus_one", gate="scalar", normalize=True,
             short_conv=CONV)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One architecture of the sweep (``key`` is its command-line name)."""
  key: str
  name: str
  pattern: str
  family: str           # "attention" | "linear" | "based" | "hybrid"
  linear: tuple = ()    # LinearAttention kwargs, as sorted items

  @property
  def linear_kwargs(self):
    return dict(self.linear)


def _items(d):
  return tuple(sorted(d.items()))


def _hybrid(ratio: int, depth: int) -> str:
  unit = "L" * ratio + "A"
  depth = max(depth, len(unit))
  return (unit * math.ceil(depth / len(unit)))[:depth]


def model_specs(cfg) -> list[ModelSpec]:
  """The sweep: 2-layer baselines and hybrids (``cfg.models`` selects)."""
  based = dict(feature_map="taylor2", head_dim=cfg.taylor_dim,
               normalize=True, short_conv=CONV)
  specs = [
      ModelSpec("attention", "attention", "AA", "attention"),
      ModelSpec("swa", "sliding window", "WW", "attention"),
      ModelSpec("linear", "linear (elu+1)", "LL", "linear", _items(dict(
          feature_map="elu_plus_one", normalize=True, short_conv=CONV))),
      ModelSpec("retnet", "retnet decay", "LL", "linear", _items(dict(
          decay="retnet", short_conv=CONV))),
      ModelSpec("gla", "gated linear", "LL", "linear", _items(GATED)),
      ModelSpec("deltanet", "gated deltanet", "LL", "linear", _items(dict(
          rule="delta", gate="scalar", short_conv=CONV))),
      ModelSpec("based", "BASED (taylor+window)", "LW", "based", _items(based)),
  ]
  # The linear:softmax ratio series at one depth: all-linear, 7:1, 3:1,
  # 1:1, all-attention (the endpoints as deep as the hybrids, so only the
  # ratio changes along the series).
  depth = cfg.hybrid_depth
  specs.append(ModelSpec("gla_deep", "gated linear, deep", "L" * depth,
                         "hybrid", _items(GATED)))
  for ratio in (7, 3, 1):
    specs.append(ModelSpec(f"hybrid{ratio}", f"hybrid {ratio}:1",
                           _hybrid(ratio, cfg.hybrid_depth), "hybrid",
                           _items(GATED)))
  specs.append(ModelSpec("attention_deep", "attention, deep", "A" * depth,
                         "hybrid"))
  return [s for s in specs if s.key in cfg.models]


ALL_MODELS = ("attention", "swa", "linear", "retnet", "gla", "deltanet",
              "based", "gla_deep", "hybrid7", "hybrid3", "hybrid1",
              "attention_deep")
# The ratio series, in order of decreasing linear share.
RATIO_SERIES = (("gla_deep", "L only"), ("hybrid7", "7:1"),
                ("hybrid3", "3:1"), ("hybrid1", "1:1"),
                ("attention_deep", "A only"))


@dataclasses.dataclass
class Config:
  seq_len: int
  num_pairs: int
  vocab_size: int
  widths: tuple[int, ...]
  models: tuple[str, ...]
  num_heads: int
  window: int
  hybrid_depth: int   # at least the hybrid unit's length (8 for 7:1)
  taylor_dim: int
  steps: int
  batch_size: int
  learning_rate: float
  eval_batches: int
  mlp: bool
  jobs: int
  hybrid_widths: tuple[int, ...] | None = None  # None: every width
  implementation: str | None = None  # None: each layer's default kernels


# CPU minutes: 2-layer baselines at two widths; hybrids as short as their
# ratio allows (7:1 has 8 layers, 3:1 and 1:1 have 4), at the smaller width.
QUICK = Config(seq_len=64, num_pairs=8, vocab_size=64, widths=(32, 64),
               models=("attention", "linear", "gla", "based", "hybrid7",
                       "hybrid3", "hybrid1"),
               num_heads=2, window=8, hybrid_depth=4, taylor_dim=8,
               steps=300, batch_size=32, learning_rate=1e-2, eval_batches=4,
               mlp=False, jobs=2, hybrid_widths=(32,))
# One GPU: Zoology's MQAR sizes (T = 256, 32 pairs, V = 8192) and widths;
# the ratio series (all-linear, 7:1, 3:1, 1:1, all-attention) 8 layers deep
# at widths 64-256. Several worker processes share the GPU (compilation is
# most of the time of these small models).
FULL = Config(seq_len=256, num_pairs=32, vocab_size=8192,
              widths=(64, 128, 256, 512),
              models=("attention", "swa", "linear", "gla", "deltanet",
                      "based", "gla_deep", "hybrid7", "hybrid3", "hybrid1",
                      "attention_deep"),
              num_heads=2, window=32, hybrid_depth=8, taylor_dim=16,
              steps=1500, batch_size=128, learning_rate=3e-3,
              eval_batches=8, mlp=True, jobs=6, hybrid_widths=(64, 128, 256))


def state_bytes(spec: ModelSpec, cfg: Config, width: int) -> int:
  """Decoding state per sequence at length T (float32): the recall budget."""
  h = width // cfg.num_heads
  total = 0
  for kind in spec.pattern:
    if kind == "A":
      total += 2 * cfg.seq_len * width
    elif kind == "W":
      total += 2 * (cfg.window + 1) * width
    else:
      lin = spec.linear_kwargs
      hk = lin.get("head_dim", h)
      if lin.get("feature_map") == "taylor2":
        hk = 1 + hk + hk * hk
      hv = h + (1 if lin.get("normalize") else 0)
      total += cfg.num_heads * hk * hv
  return 4 * total


def build(spec: ModelSpec, cfg: Config, width: int, seed: int,
          implementation: str | None = None):
  impl = {} if implementation is None else dict(
      implementation=implementation)
  return LanguageModel(
      vocab_size=cfg.vocab_size, d_model=width, num_heads=cfg.num_heads,
      pattern=spec.pattern, window_size=cfg.window,
      mlp_hidden=None if cfg.mlp else 0,
      attention_kwargs=dict(short_conv=CONV, **impl),
      linear_kwargs=spec.linear_kwargs | impl, rngs=nnx.Rngs(seed))


def run_one(spec: ModelSpec, cfg: Config, width: int, seed: int,
            show_progress: bool = True) -> dict:
  """Trains one model on fresh MQAR batches; evaluates on held-out ones.

  If the layers' default kernels raise (a kernel the device cannot run),
  the model is retrained with ``implementation="xla"`` and the row says so.
  """
  try:
    return _run_one(spec, cfg, width, seed, show_progress,
                    cfg.implementation)
  except Exception as e:  # noqa: BLE001 (recorded, then the XLA fallback)
    if cfg.implementation == "xla":
      raise
    error = f"{type(e).__name__}: {e}"[:300]
  row = _run_one(spec, cfg, width, seed, show_progress, "xla")
  row["fallback_from"] = error
  return row


def _run_one(spec, cfg, width, seed, show_progress, implementation):
  batch_fn = functools.partial(
      task.mqar_batch, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
      num_pairs=cfg.num_pairs, vocab_size=cfg.vocab_size)
  model = build(spec, cfg, width, seed, implementation)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with common.Timer() as timer:
    _, losses = training.train(
        model, batch_fn, steps=cfg.steps, learning_rate=cfg.learning_rate,
        key=jax.random.key(seed), desc=f"{spec.name} d={width}",
        disable=not show_progress)
  ev = training.evaluate(model, batch_fn, jax.random.key(10_000 + seed),
                         cfg.eval_batches)
  return dict(model=spec.name, family=spec.family, pattern=spec.pattern,
              width=width, params=int(params),
              state_bytes=state_bytes(spec, cfg, width),
              accuracy=ev["accuracy"], eval_loss=ev["loss"],
              final_train_loss=float(np.mean(losses[-10:])),
              train_seconds=timer.seconds, seed=seed, steps=cfg.steps,
              implementation=implementation or "default",
              device=jax.devices()[0].device_kind)


def _worker(args):
  """Entry point of a pool process (spawned: no JAX state is inherited)."""
  spec, cfg, width, seed = args
  try:
    return run_one(spec, cfg, width, seed, show_progress=False)
  except Exception as e:  # noqa: BLE001 (one failed model ends no sweep)
    return dict(model=spec.name, family=spec.family, pattern=spec.pattern,
                width=width, error=f"{type(e).__name__}: {e}"[:500])


def ratio_width(cfg: Config) -> int:
  """The width at which the ratio series is compared first."""
  widths = cfg.hybrid_widths or cfg.widths
  return 128 if 128 in widths else max(widths)


def jobs_for(cfg: Config, specs) -> list[tuple[ModelSpec, int]]:
  """(spec, width) pairs, most informative first (for --deadline)."""
  jobs = []
  for spec in specs:
    widths = (cfg.hybrid_widths if spec.family == "hybrid"
              and cfg.hybrid_widths else cfg.widths)
    jobs += [(spec, w) for w in widths]
  # The ratio series at its main width, then everything by width; within
  # that the longest first (layers x width) so workers finish together.
  main = ratio_width(cfg)
  return sorted(jobs, key=lambda j: (
      not (j[0].family == "hybrid" and j[1] == main), j[1],
      -len(j[0].pattern) * j[1]))


def run_all(cfg: Config, specs, seed: int, *, deadline: float | None = None,
            skip=frozenset(), on_row=None) -> list[dict]:
  """Trains every (model, width) job; ``on_row(rows)`` after each one.

  ``deadline`` (a ``time.monotonic()`` value): start no job after it.
  ``skip``: (model name, width) pairs not to run.
  """
  jobs = [j for j in jobs_for(cfg, specs) if (j[0].name, j[1]) not in skip]
  bar = common.progress(total=len(jobs), desc="mqar", unit="model",
                        leave=True)
  rows = []
  late = lambda: deadline is not None and time.monotonic() > deadline

  def done(row):
    rows.append(row)
    bar.update()
    bar.set_postfix_str(f"{row['model']} d={row['width']}: "
                        + (f"{row['accuracy']:.2f}" if "accuracy" in row
                           else "error"))
    if on_row is not None:
      on_row(rows)

  if cfg.jobs <= 1:
    for spec, width in jobs:
      if late():
        break
      done(run_one(spec, cfg, width, seed))
  else:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(cfg.jobs,
                                                mp_context=ctx) as pool:
      queue, running = list(jobs), set()
      while queue or running:
        while queue and len(running) < cfg.jobs and not late():
          spec, width = queue.pop(0)
          running.add(pool.submit(_worker, (spec, cfg, width, seed)))
        if not running:
          break
        finished, running = concurrent.futures.wait(
            running, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in finished:
          done(f.result())
  bar.close()
  if len(rows) < len(jobs):
    print(f"deadline: {len(jobs) - len(rows)} of {len(jobs)} jobs not run")
  return rows


def order_rows(rows, cfg: Config) -> list[dict]:
  names = [s.name for s in model_specs(dataclasses.replace(
      cfg, models=ALL_MODELS))]
  return sorted(rows, key=lambda r: (names.index(r["model"])
                                     if r["model"] in names else 99,
                                     r["width"]))


def plot(rows, cfg: Config, path):
  rows = [r for r in rows if "accuracy" in r]
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
  names = list(dict.fromkeys(r["model"] for r in rows))
  style = {"attention": "-o", "linear": "--s", "based": "-.^",
           "hybrid": ":D"}
  for name in names:
    rs = sorted((r for r in rows if r["model"] == name),
                key=lambda r: r["width"])
    label = f"{name} [{rs[0]['pattern']}]"
    ax1.plot([r["width"] for r in rs], [r["accuracy"] for r in rs],
             style.get(rs[0]["family"], "-o"), label=label)
  widths = sorted({r["width"] for r in rows})
  ax1.set_xscale("log", base=2)
  ax1.set_xticks(widths, [str(w) for w in widths])
  ax1.minorticks_off()
  ax1.set_xlabel("model width (d_model)")
  ax1.set_ylabel("MQAR accuracy (held-out)")
  ax1.set_ylim(-0.02, 1.02)
  ax1.set_title(f"MQAR: T={cfg.seq_len}, {cfg.num_pairs} pairs, "
                f"V={cfg.vocab_size}, {cfg.steps} steps", fontsize=10)
  ax1.legend(fontsize=6.5)
  # Accuracy against the linear:softmax ratio, one line per width.
  key_of = {s.name: s.key for s in model_specs(dataclasses.replace(
      cfg, models=ALL_MODELS))}
  series = {k: i for i, (k, _) in enumerate(RATIO_SERIES)}
  for w in widths:
    pts = sorted((series[key_of[r["model"]]], r["accuracy"])
                 for r in rows if r["width"] == w
                 and key_of.get(r["model"]) in series)
    if pts:
      ax2.plot(*zip(*pts), "-o", label=f"d={w}")
  labels = []
  for key, short in RATIO_SERIES:
    pat = next((r["pattern"] for r in rows if key_of.get(r["model"]) == key),
               "")
    labels.append(f"{short}\n{pat}")
  ax2.set_xticks(range(len(RATIO_SERIES)), labels, fontsize=7)
  ax2.set_ylim(-0.02, 1.02)
  ax2.set_ylabel("MQAR accuracy (held-out)")
  ax2.set_xlabel("linear:softmax layer ratio (gated linear + softmax)")
  ax2.set_title("hybrid ratio series", fontsize=10)
  if ax2.get_legend_handles_labels()[1]:  # no ratio-series model was run
    ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def print_table(rows) -> None:
  ok = [r for r in rows if "accuracy" in r]
  print(common.format_table(
      ["model", "pattern", "width", "params", "state KB", "accuracy",
       "train s"],
      [[r["model"], r["pattern"], r["width"], r["params"],
        round(r["state_bytes"] / 1024, 1), round(r["accuracy"], 3),
        round(r["train_seconds"], 1)] for r in ok]))
  for r in rows:
    if "error" in r:
      print(f"{r['model']} d={r['width']}: {r['error']}")
    elif "fallback_from" in r:
      print(f"{r['model']} d={r['width']}: ran with implementation='xla' "
            f"after {r['fallback_from']}")


def try_plot(rows, cfg: Config, path) -> bool:
  """The PNG, unless matplotlib is missing (re-plot with --plot-only)."""
  try:
    plot(rows, cfg, path)
  except ImportError as e:
    print(f"no plot ({e}); run again with --plot-only where matplotlib is")
    return False
  return True


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments mqar",
                              description=__doc__)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true",
                 help="CPU-sized sweep, a few minutes (default)")
  g.add_argument("--full", action="store_true",
                 help="GPU-sized sweep (Zoology's sizes, 8-layer ratio "
                 "series)")
  p.add_argument("--out", help="output folder (default "
                 "experiments/results/mqar, or mqar_full with --full)")
  p.add_argument("--widths", type=int, nargs="+")
  p.add_argument("--hybrid-widths", type=int, nargs="+",
                 help="widths of the ratio series (default: quick 32, "
                 "full 64 128 256)")
  p.add_argument("--steps", type=int)
  p.add_argument("--models", nargs="+", metavar="NAME",
                 help=f"subset of {list(ALL_MODELS)}")
  p.add_argument("--merge", action="store_true",
                 help="add to (replace same model/width in) an existing "
                 "results.json in the output folder, e.g. to split --full "
                 "over several commands")
  p.add_argument("--resume", action="store_true",
                 help="--merge, skipping the model/width pairs already in "
                 "results.json")
  p.add_argument("--deadline", type=float, metavar="SECONDS",
                 help="start no new model after this many seconds (the "
                 "results so far are written after every model)")
  p.add_argument("--implementation", choices=("xla",),
                 help="force every layer to XLA (default: each layer's "
                 "default kernels, with an XLA retry if they raise)")
  p.add_argument("--plot-only", action="store_true",
                 help="re-plot and print results.json from the output "
                 "folder")
  p.add_argument("--jobs", type=int,
                 help="parallel worker processes (quick: 2, full: 6)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  cfg = dataclasses.replace(FULL if args.full else QUICK)
  for name in ("widths", "models"):
    if getattr(args, name):
      setattr(cfg, name, tuple(getattr(args, name)))
  if args.widths:
    cfg.hybrid_widths = None
  if args.hybrid_widths:
    cfg.hybrid_widths = tuple(args.hybrid_widths)
  if args.steps:
    cfg.steps = args.steps
  if args.jobs:
    cfg.jobs = args.jobs
  cfg.implementation = args.implementation
  unknown = set(cfg.models) - set(ALL_MODELS)
  if unknown:
    p.error(f"unknown models {sorted(unknown)}; choose from "
            f"{list(ALL_MODELS)}")
  out = common.out_dir("mqar_full" if args.full else "mqar", args.out)
  js, png = out / "results.json", out / "mqar.png"
  if args.plot_only:
    saved = json.loads(js.read_text())
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in saved["config"].items()})
    print_table(saved["results"])
    try_plot(saved["results"], cfg, png)
    return saved["results"]

  old = []
  if (args.merge or args.resume) and js.exists():
    old = json.loads(js.read_text())["results"]
  skip = ({(r["model"], r["width"]) for r in old if "accuracy" in r}
          if args.resume else frozenset())
  # Worker processes share one GPU: allocate on demand, not 75 % each.
  if cfg.jobs > 1:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  t0 = time.monotonic()
  deadline = None if args.deadline is None else t0 + args.deadline

  def merged(rows):
    mine = {(r["model"], r["width"]) for r in rows}
    return order_rows([r for r in old if (r["model"], r["width"]) not in mine]
                      + rows, cfg)

  def save(rows):
    common.write_json(js, dict(
        experiment="mqar", mode="full" if args.full else "quick",
        config=dataclasses.asdict(cfg), results=merged(rows),
        total_seconds=time.monotonic() - t0,
        environment=common.environment()))

  rows = run_all(cfg, model_specs(cfg), args.seed, deadline=deadline,
                 skip=skip, on_row=save)
  save(rows)
  rows = merged(rows)
  print_table(rows)
  try_plot(rows, cfg, png)
  print(f"wrote {js} and {png} ({time.monotonic() - t0:.0f} s)")
  return rows


if __name__ == "__main__":
  main()
