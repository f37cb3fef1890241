"""Replaces rows of the softmax report with ``mosaic_check.py`` records.

Each record of ``scripts/gpu/mosaic_check.py --sections time`` holds one
grid point timed in one process: our kernel (the default and any named
variants), cuDNN through ``jax.nn`` and tokamax's Mosaic kernel, forward and
forward+backward, with the same timing loop as ``attnjax.bench``. This
script writes those numbers into the report's ``attnjax pallas_mosaic_gpu``,
``jax.nn cudnn`` and ``tokamax mosaic`` rows at the same (B, T, N, K, H,
causal), recomputes the ratios and re-renders the report.

``--use LABEL=VARIANT`` takes a variant's forward+backward number as ours
for the records whose label starts with LABEL (where that variant is what
the default now runs); without it the record's "ours" is used.

  python scripts/gpu/report_from_mosaic_check.py \\
      --records docs/dev/gpu-runs/run97-mosaic_check.jsonl \\
      --use "H256 T1024 full MHA=pdkv" --note "run97: ..."
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from attnjax.bench import common, softmax  # pylint: disable=wrong-import-position

IMPLS = {"ours": "attnjax pallas_mosaic_gpu", "cudnn": "jax.nn cudnn",
         "tokamax": "tokamax mosaic"}
MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}


def _flops(rec, mode):
  f = 4.0 * rec["b"] * rec["n"] * rec["t"] * rec["t"] * rec["h"]
  f /= 2 if rec["causal"] else 1
  return f * (3.5 if mode == "fwd+bwd" else 1.0)


def merge(rows, records, use, source):
  """Updates ``rows`` in place; returns how many were replaced."""
  index = {}
  for r in rows:
    key = (r["impl"], r["b"], r["t"], r["n"], r["k"], r["h"],
           bool(r["causal"]), r["mode"])
    index[key] = r
  replaced = 0
  for rec in records:
    if rec.get("section") != "time":
      continue
    variant = next((v for lab, v in use if rec["label"].startswith(lab)),
                   "ours")
    for who, impl in IMPLS.items():
      for short, mode in MODES.items():
        name = variant if (who == "ours" and short == "fwdbwd") else who
        tf = rec.get(f"{name}_{short}")
        if tf is None:
          continue
        key = (impl, rec["b"], rec["t"], rec["n"], rec["kh"], rec["h"],
               bool(rec["causal"]), mode)
        row = index.get(key)
        if row is None:
          raise SystemExit(f"no report row for {key}")
        row.pop("rel_err", None)
        row.pop("ratio_vs_best_other", None)
        row["tflops"] = float(tf)
        row["ms"] = rec.get(f"{name}_{short}_ms") or (
            _flops(rec, mode) / float(tf) / 1e9)
        row["source"] = source + (f" ({name})" if name != who else "")
        replaced += 1
  return replaced


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--report", default="docs/benchmarks/"
                  "softmax-nvidia-h100-80gb-hbm3.json")
  ap.add_argument("--records", action="append", required=True,
                  help="a mosaic_check.jsonl (repeatable)")
  ap.add_argument("--use", action="append", default=[],
                  help="LABEL_PREFIX=VARIANT")
  ap.add_argument("--note", required=True,
                  help="prepended to the report's rows_updated")
  args = ap.parse_args()
  with open(args.report) as f:
    data = json.load(f)
  info, rows = data["info"], data["rows"]
  use = [tuple(u.rsplit("=", 1)) for u in args.use]
  total = 0
  for path in args.records:
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    total += merge(rows, records, use, os.path.basename(path))
  softmax.add_ratios(rows)
  info["rows_updated"] = args.note + " Before that: " + info.get(
      "rows_updated", "")
  out_dir = os.path.dirname(args.report)
  common.write_report(out_dir, "softmax", info, rows, softmax.markdown(rows),
                      softmax.plot(rows))
  print(f"replaced {total} rows")


if __name__ == "__main__":
  main()
