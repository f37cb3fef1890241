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
  for ratio in (7, 3, 1):
    specs.append(ModelSpec(f"hybrid{ratio}", f"hybrid {ratio}:1",
                           _hybrid(ratio, cfg.hybrid_depth), "hybrid",
                           _items(GATED)))
  return [s for s in specs if s.key in cfg.models]


ALL_MODELS = ("attention", "swa", "linear", "retnet", "gla", "deltanet",
              "based", "hybrid7", "hybrid3", "hybrid1")


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


# CPU minutes: 2-layer baselines at two widths; hybrids as short as their
# ratio allows (7:1 has 8 layers, 3:1 and 1:1 have 4), at the smaller width.
QUICK = Config(seq_len=64, num_pairs=8, vocab_size=64, widths=(32, 64),
               models=("attention", "linear", "gla", "based", "hybrid7",
                       "hybrid3", "hybrid1"),
               num_heads=2, window=8, hybrid_depth=4, taylor_dim=8,
               steps=300, batch_size=32, learning_rate=1e-2, eval_batches=4,
               mlp=False, jobs=2, hybrid_widths=(32,))
# One GPU: Zoology-like sizes, 8-layer hybrids (at width 128).
FULL = Config(seq_len=256, num_pairs=32, vocab_size=8192,
              widths=(64, 128, 256),
              models=("attention", "swa", "linear", "gla", "deltanet",
                      "based", "hybrid7", "hybrid3", "hybrid1"),
              num_heads=2, window=32, hybrid_depth=8, taylor_dim=16,
              steps=1500, batch_size=128, learning_rate=3e-3,
              eval_batches=8, mlp=True, jobs=1, hybrid_widths=(128,))


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


def build(spec: ModelSpec, cfg: Config, width: int, seed: int):
  return LanguageModel(
      vocab_size=cfg.vocab_size, d_model=width, num_heads=cfg.num_heads,
      pattern=spec.pattern, window_size=cfg.window,
      mlp_hidden=None if cfg.mlp else 0,
      attention_kwargs=dict(short_conv=CONV),
      linear_kwargs=spec.linear_kwargs, rngs=nnx.Rngs(seed))


def run_one(spec: ModelSpec, cfg: Config, width: int, seed: int,
            show_progress: bool = True) -> dict:
  """Trains one model on fresh MQAR batches; evaluates on held-out ones."""
  batch_fn = functools.partial(
      task.mqar_batch, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
      num_pairs=cfg.num_pairs, vocab_size=cfg.vocab_size)
  model = build(spec, cfg, width, seed)
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
              train_seconds=timer.seconds, seed=seed)


def _worker(args):
  """Entry point of a pool process (spawned: no JAX state is inherited)."""
  spec, cfg, width, seed = args
  return run_one(spec, cfg, width, seed, show_progress=False)


def jobs_for(cfg: Config, specs) -> list[tuple[ModelSpec, int]]:
  jobs = []
  for spec in specs:
    widths = (cfg.hybrid_widths if spec.family == "hybrid"
              and cfg.hybrid_widths else cfg.widths)
    jobs += [(spec, w) for w in widths]
  # Longest first (layers x width) so two workers finish together.
  return sorted(jobs, key=lambda j: -len(j[0].pattern) * j[1])


def run_all(cfg: Config, specs, seed: int) -> list[dict]:
  jobs = jobs_for(cfg, specs)
  bar = common.progress(total=len(jobs), desc="mqar", unit="model",
                        leave=True)
  rows = []
  if cfg.jobs <= 1:
    for spec, width in jobs:
      rows.append(run_one(spec, cfg, width, seed))
      bar.update()
  else:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(cfg.jobs,
                                                mp_context=ctx) as pool:
      futures = [pool.submit(_worker, (spec, cfg, width, seed))
                 for spec, width in jobs]
      for f in concurrent.futures.as_completed(futures):
        row = f.result()
        bar.update()
        bar.set_postfix_str(f"{row['model']} d={row['width']}: "
                            f"{row['accuracy']:.2f}")
        rows.append(row)
  bar.close()
  order = {(s.name, w): i for i, (s, w) in enumerate(
      (s, w) for s in specs for w in sorted(cfg.widths))}
  return sorted(rows, key=lambda r: order.get((r["model"], r["width"]), 0))


def plot(rows, cfg: Config, path):
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
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
  ax1.legend(fontsize=7)
  # Linear:softmax ratio at the widest width the hybrids ran at.
  width = max(cfg.hybrid_widths or cfg.widths)
  order = ["gated linear", "hybrid 7:1", "hybrid 3:1", "hybrid 1:1",
           "attention"]
  at = {r["model"]: r for r in rows if r["width"] == width}
  present = [o for o in order if o in at]
  ax2.bar(range(len(present)), [at[o]["accuracy"] for o in present],
          color=[f"C{i}" for i in range(len(present))])
  ax2.set_xticks(range(len(present)), [
      f"{o.replace('hybrid ', '')}\n{at[o]['pattern']}" for o in present],
      fontsize=8)
  ax2.set_ylim(0, 1.02)
  ax2.set_ylabel("MQAR accuracy (held-out)")
  ax2.set_title(f"linear:softmax layer ratio (d={width})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments mqar",
                              description=__doc__)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true",
                 help="CPU-sized sweep, a few minutes (default)")
  g.add_argument("--full", action="store_true",
                 help="GPU-sized sweep (every model, 8-layer hybrids)")
  p.add_argument("--out", help="output folder (default "
                 "experiments/results/mqar, or mqar_full with --full)")
  p.add_argument("--widths", type=int, nargs="+")
  p.add_argument("--steps", type=int)
  p.add_argument("--models", nargs="+", metavar="NAME",
                 help=f"subset of {list(ALL_MODELS)}")
  p.add_argument("--merge", action="store_true",
                 help="add to (replace same model/width in) an existing "
                 "results.json in the output folder, e.g. to split --full "
                 "over several commands")
  p.add_argument("--jobs", type=int,
                 help="parallel worker processes (quick: 2, full: 1)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  cfg = dataclasses.replace(FULL if args.full else QUICK)
  for name in ("widths", "models"):
    if getattr(args, name):
      setattr(cfg, name, tuple(getattr(args, name)))
  if args.widths:
    cfg.hybrid_widths = None
  if args.steps:
    cfg.steps = args.steps
  if args.jobs:
    cfg.jobs = args.jobs
  unknown = set(cfg.models) - set(ALL_MODELS)
  if unknown:
    p.error(f"unknown models {sorted(unknown)}; choose from "
            f"{list(ALL_MODELS)}")
  specs = model_specs(cfg)
  out = common.out_dir("mqar_full" if args.full else "mqar", args.out)

  with common.Timer() as total:
    rows = run_all(cfg, specs, args.seed)
  if args.merge and (out / "results.json").exists():
    old = json.loads((out / "results.json").read_text())["results"]
    mine = {(r["model"], r["width"]) for r in rows}
    rows = [r for r in old if (r["model"], r["width"]) not in mine] + rows
    names = [s.name for s in model_specs(dataclasses.replace(
        cfg, models=ALL_MODELS))]
    rows.sort(key=lambda r: (names.index(r["model"])
                             if r["model"] in names else 99, r["width"]))
  table = common.format_table(
      ["model", "pattern", "width", "params", "state KB", "accuracy",
       "train s"],
      [[r["model"], r["pattern"], r["width"], r["params"],
        round(r["state_bytes"] / 1024, 1), round(r["accuracy"], 3),
        round(r["train_seconds"], 1)] for r in rows])
  print(table)
  png = out / "mqar.png"
  plot(rows, cfg, png)
  js = common.write_json(out / "results.json", dict(
      experiment="mqar", mode="full" if args.full else "quick",
      config=dataclasses.asdict(cfg), results=rows,
      total_seconds=total.seconds, environment=common.environment()))
  print(f"wrote {js} and {png} ({total.seconds:.0f} s)")
  return rows


if __name__ == "__main__":
  main()
