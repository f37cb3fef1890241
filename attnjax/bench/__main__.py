"""Side-by-side benchmarks: ``python -m attnjax.bench [--quick] [--suite ...]``.

Suites: softmax (attnjax vs jax.nn / cuDNN / tokamax), linear (vs
flash-linear-attention and causal softmax), memory (scratch memory vs T),
parallel (sequence parallelism; needs several GPUs). Reports go to
docs/benchmarks/ as JSON, markdown and PNG, with device, date and versions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import jax

from attnjax.bench import common

SUITES = ("softmax", "linear", "memory", "parallel")


def _merge(path, rows, keys, info, what):
  """Rows from an earlier run of the same suite on the same device are kept
  unless this run measured the same configuration again.

  Returns (rows, info): when old rows are kept, ``info`` gains a
  ``rows_updated`` line saying which rows this run re-measured (``what``)
  and where the others come from: the earlier report's date, then its own
  line after "Earlier:" (flat, newest first, however many runs merged).
  """
  if not os.path.exists(path):
    return rows, info
  with open(path) as f:
    old_report = json.load(f)
  old = old_report.get("rows", [])
  sig = lambda r: tuple(str(r.get(k)) for k in keys)
  new = {sig(r) for r in rows}
  kept = [r for r in old if sig(r) not in new]
  if not kept:
    return rows, info
  old_info = old_report.get("info", {})
  note = (f"{info.get('date')}: {len(rows)} rows re-measured ({what}); "
          f"{len(kept)} rows kept from the report of "
          f"{old_info.get('date')}")
  if old_info.get("rows_updated"):
    note += f". Earlier: {old_info['rows_updated']}"
  return kept + rows, dict(info, rows_updated=note)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m attnjax.bench",
                              description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="a small grid that runs in about a minute anywhere")
  p.add_argument("--suite", default=None,
                 help=f"comma-separated subset of {','.join(SUITES)} "
                      "(default: softmax,memory with --quick; on a GPU "
                      "softmax,linear,memory)")
  p.add_argument("--heads", default=None,
                 help="softmax head configs (default all): 64, 64gqa, 128, "
                      "128gqa, 256, 256gqa")
  p.add_argument("--seqs", default=None, help="e.g. 1024,4096,16384")
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--impls", default=None,
                 help="substrings selecting implementations to run")
  p.add_argument("--out", default="docs/benchmarks")
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--append", action="store_true",
                 help="merge with an earlier report of the same suite")
  args = p.parse_args(argv)

  on_gpu = jax.default_backend() == "gpu"
  if args.suite:
    suites = args.suite.split(",")
  elif args.quick:
    suites = ["softmax", "memory"]
  else:
    suites = ["softmax", "linear", "memory"] if on_gpu else ["softmax",
                                                             "memory"]
  for s in suites:
    if s not in SUITES:
      p.error(f"unknown suite {s!r}; choose from {SUITES}")
  info = common.device_info()
  print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
  for suite in suites:
    suite_info = info
    mod = importlib.import_module(f"attnjax.bench.{suite}")
    if suite == "softmax":
      rows = mod.run(
          quick=args.quick,
          heads=args.heads.split(",") if args.heads else None,
          seqs=[int(s) for s in args.seqs.split(",")] if args.seqs else None,
          modes=tuple(args.modes.split(",")),
          impl_filter=args.impls.split(",") if args.impls else None)
      keys = ("impl", "b", "t", "n", "k", "h", "causal", "mode", "dtype")
    else:
      rows = mod.run(quick=args.quick)
      keys = tuple(sorted({k for r in rows for k in r
                           if k not in ("ms", "tflops", "tokens_per_s",
                                        "temp_mib", "error", "efficiency",
                                        "rel_err", "ratio_vs_best_other")}))
    name = suite + ("-quick" if args.quick else "")
    if args.append and not args.no_write:
      from attnjax.bench import common as c  # noqa: PLC0415
      path = os.path.join(args.out, f"{name}-{c._slug(info['device'])}.json")
      what = ", ".join(f"{k} {v}" for k, v in (
          ("impls", args.impls), ("heads", args.heads), ("seqs", args.seqs),
          ("modes", args.modes)) if v) or "all"
      rows, suite_info = _merge(path, rows, keys, info, what)
      if hasattr(mod, "add_ratios"):
        mod.add_ratios(rows)
    md = mod.markdown(rows) if hasattr(mod, "markdown") else ""
    print("\n" + md + "\n", flush=True)
    if not args.no_write:
      paths = common.write_report(
          args.out, name, suite_info, rows, md,
          mod.plot(rows) if hasattr(mod, "plot") else None)
      print("wrote " + ", ".join(paths), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
