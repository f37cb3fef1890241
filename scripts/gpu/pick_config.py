"""Picks the fastest tiling override among bench.linear row files (GPU).

  python3 scripts/gpu/pick_config.py --variant delta --mode fwd+bwd \
      --baseline base1.jsonl,base2.jsonl cand1.jsonl cand2.jsonl ...

Each file is one ``python -m attnjax.bench.linear`` process with
``ATTNJAX_BENCH_ROWS`` pointing at it (its ``_info`` line records the
``ATTNJAX_*_CONFIG`` override). Prints, per candidate, its tokens/s over
the baselines' mean at every T, and the override of the candidate that is
faster at every T by more than ``--margin`` (or nothing), so that a
following step can GPU-test that override:

  cfg=$(python3 scripts/gpu/pick_config.py ...) && [ -n "$cfg" ] && \
    ATTNJAX_DELTA_CONFIG="$cfg" python3 -m pytest -m gpu ...
"""

from __future__ import annotations

import argparse
import json
import sys

from attnjax.bench import common


def _speeds(path, variant, mode):
  rows, info = common.read_rows([path])
  cfg = next((v for k, v in (info or {}).items() if k.endswith("_config")),
             None)
  return cfg, {r["T"]: r["tokens_per_s"] for r in rows
               if r["family"] == "attnjax" and r["variant"] == variant
               and r["mode"] == mode
               and r.get("tokens_per_s")}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--variant", required=True)
  p.add_argument("--mode", default="fwd+bwd")
  p.add_argument("--baseline", required=True)
  p.add_argument("--margin", type=float, default=0.02)
  p.add_argument("candidates", nargs="+")
  a = p.parse_args(argv)
  base = {}
  for path in a.baseline.split(","):
    for t, s in _speeds(path, a.variant, a.mode)[1].items():
      base.setdefault(t, []).append(s)
  base = {t: sum(v) / len(v) for t, v in base.items()}
  print(f"baseline {a.variant} {a.mode}: " + ", ".join(
      f"T={t} {s / 1e6:.2f} M tok/s" for t, s in sorted(base.items())),
      file=sys.stderr)
  best, best_min = None, 1.0 + a.margin
  for path in a.candidates:
    try:
      cfg, sp = _speeds(path, a.variant, a.mode)
    except OSError as e:
      print(f"{path}: {e}", file=sys.stderr)
      continue
    ratios = {t: sp[t] / base[t] for t in base if t in sp}
    print(f"{cfg}: " + ", ".join(f"T={t} {r:.3f}" for t, r in
                                 sorted(ratios.items())), file=sys.stderr)
    if cfg and len(ratios) == len(base) and min(ratios.values()) > best_min:
      best, best_min = cfg, min(ratios.values())
  if best:
    print(json.dumps(json.loads(best)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
