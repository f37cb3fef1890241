"""Peak memory and time vs sequence length: softmax backends and linear.

``python -m experiments scaling [--quick | --full] [--out DIR]``

For each sequence length T (at a fixed token budget, B = tokens // T, so
ideal linear-time methods take constant time) and each implementation,
measures the compiled program's temporary memory
(``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``) and
the median wall time of the forward pass and of forward + backward. Writes
``results.json`` and ``scaling.png`` under experiments/results/scaling/.
See README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp

import attnjax
from experiments import common

SOFTMAX = ("xla", "xla_chunked", "pallas")
LINEAR = "linear"  # attnjax.linear_attention with a fixed per-head decay


@dataclasses.dataclass
class Config:
  seq_lens: tuple[int, ...]
  tokens: int           # batch * seq_len per step
  num_heads: int
  head_dim: int
  dtype: str
  implementations: tuple[str, ...]
  repeats: int
  causal: bool = True


QUICK = Config(seq_lens=(256, 512, 1024, 2048, 4096), tokens=4096,
               num_heads=4, head_dim=64, dtype="float32",
               implementations=("xla", "xla_chunked", LINEAR), repeats=3)
FULL = Config(seq_lens=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
              tokens=32768, num_heads=16, head_dim=128, dtype="bfloat16",
              implementations=SOFTMAX + (LINEAR,), repeats=5)


def attention_fn(impl: str, cfg: Config):
  if impl == LINEAR:
    log_decay = jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(cfg.num_heads))))
    return lambda q, k, v: attnjax.linear_attention(q, k, v,
                                                    log_decay=log_decay)
  return lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=cfg.causal, implementation=impl)


def _median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # warm up (compiled already)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(impl: str, seq_len: int, cfg: Config) -> dict:
  """Memory and time of one (implementation, T) point; errors recorded."""
  b = max(1, cfg.tokens // seq_len)
  dtype = jnp.dtype(cfg.dtype)
  keys = jax.random.split(jax.random.key(seq_len), 3)
  shape = (b, seq_len, cfg.num_heads, cfg.head_dim)
  q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype)
             for kk in keys)
  fn = attention_fn(impl, cfg)
  fwd = jax.jit(fn)
  grad = jax.jit(jax.grad(
      lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
  row = dict(implementation=impl, seq_len=seq_len, batch=b)
  for name, f in (("fwd", fwd), ("fwd_bwd", grad)):
    try:
      compiled = f.lower(q, k, v).compile()
      mem = compiled.memory_analysis()
      row[f"{name}_temp_bytes"] = (None if mem is None
                                   else int(mem.temp_size_in_bytes))
      row[f"{name}_seconds"] = _median_seconds(compiled, (q, k, v),
                                               cfg.repeats)
    except (NotImplementedError, ExceptionGroup) as e:
      row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # noqa: BLE001 (e.g. out of memory at large T)
      row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
  return row


def plot(rows, cfg: Config, path, device_kind: str):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  impls = list(dict.fromkeys(r["implementation"] for r in rows))
  panels = (("fwd_bwd_temp_bytes", 2 ** 20, "fwd+bwd temp memory (MiB)"),
            ("fwd_seconds", 1e-3, "forward time (ms)"),
            ("fwd_bwd_seconds", 1e-3, "forward + backward time (ms)"))
  for ax, (key, unit, label) in zip(axes, panels):
    for impl in impls:
      pts = [(r["seq_len"], r[key] / unit) for r in rows
             if r["implementation"] == impl and r.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), "-o", ms=3, label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"sequence length T (batch = {cfg.tokens} // T)")
    ax.set_ylabel(label)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{device_kind}: N={cfg.num_heads}, "
               f"H={cfg.head_dim}, {cfg.dtype}, causal", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments scaling",
                              description=__doc__)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true",
                 help="CPU-sized (default): T 256..4096, no Pallas")
  g.add_argument("--full", action="store_true",
                 help="GPU-sized: T 1K..32K, bf16, with Pallas")
  p.add_argument("--out", help="output folder (default "
                 "experiments/results/scaling, or scaling_full with --full)")
  p.add_argument("--seq-lens", type=int, nargs="+")
  p.add_argument("--implementations", nargs="+",
                 help=f"subset of {list(SOFTMAX) + [LINEAR]}")
  p.add_argument("--repeats", type=int, help="timed runs per point")
  p.add_argument("--plot-only", action="store_true",
                 help="re-plot and print results.json from the output "
                 "folder")
  args = p.parse_args(argv)
  cfg = dataclasses.replace(FULL if args.full else QUICK)
  if args.seq_lens:
    cfg.seq_lens = tuple(args.seq_lens)
  if args.implementations:
    cfg.implementations = tuple(args.implementations)
  if args.repeats:
    cfg.repeats = args.repeats
  out = common.out_dir("scaling_full" if args.full else "scaling", args.out)
  js, png = out / "results.json", out / "scaling.png"
  if args.plot_only:
    saved = json.loads(js.read_text())
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in saved["config"].items()})
    report(saved["results"], cfg, png, saved["environment"]["device_kind"])
    return saved["results"]

  points = [(i, t) for t in cfg.seq_lens for i in cfg.implementations]
  rows = []
  payload = lambda: dict(
      experiment="scaling", mode="full" if args.full else "quick",
      config=dataclasses.asdict(cfg), results=rows,
      memory_ratios=memory_ratios(rows, cfg),
      environment=common.environment())
  with common.Timer() as total:
    for impl, t in common.progress(points, desc="scaling", unit="point",
                                   leave=True):
      rows.append(measure(impl, t, cfg))
      common.write_json(js, payload())  # a cut-off run keeps its points
  common.write_json(js, dict(payload(), total_seconds=total.seconds))
  report(rows, cfg, png, jax.devices()[0].device_kind)
  print(f"wrote {js} and {png} ({total.seconds:.0f} s)")
  return rows


def memory_ratios(rows, cfg: Config) -> dict:
  """xla's temporary memory over each other implementation's, longest T
  at which xla compiled."""
  ratios = {}
  done = [r["seq_len"] for r in rows if r["implementation"] == "xla"
          and r.get("fwd_temp_bytes")]
  if not done:
    return ratios
  longest = max(done)
  at = {r["implementation"]: r for r in rows if r["seq_len"] == longest}
  for mode in ("fwd", "fwd_bwd"):
    ref = at.get("xla", {}).get(f"{mode}_temp_bytes")
    for impl, r in at.items():
      if impl != "xla" and ref and r.get(f"{mode}_temp_bytes"):
        ratios[f"{mode} xla/{impl} at T={longest}"] = round(
            ref / r[f"{mode}_temp_bytes"], 1)
  return ratios


def report(rows, cfg: Config, png, device_kind: str) -> None:
  """Prints the table, errors and ratios; writes the PNG (if matplotlib)."""
  mib = lambda x: None if x is None else round(x / 2 ** 20, 2)
  ms = lambda x: None if x is None else round(x * 1e3, 2)
  print(common.format_table(
      ["impl", "T", "B", "fwd MiB", "fwd+bwd MiB", "fwd ms", "fwd+bwd ms"],
      [[r["implementation"], r["seq_len"], r["batch"],
        mib(r.get("fwd_temp_bytes")), mib(r.get("fwd_bwd_temp_bytes")),
        ms(r.get("fwd_seconds")), ms(r.get("fwd_bwd_seconds"))]
       for r in rows]))
  for r in rows:
    for name in ("fwd_error", "fwd_bwd_error"):
      if name in r:
        print(f"{r['implementation']} T={r['seq_len']} {name}: {r[name]}")
  ratios = memory_ratios(rows, cfg)
  if ratios:
    print("memory ratios:", ratios)
  try:
    plot(rows, cfg, png, device_kind)
  except ImportError as e:
    print(f"no plot ({e}); run again with --plot-only where matplotlib is")


if __name__ == "__main__":
  main()
