"""Runs single-GPU pytest items spread over several GPUs of one host.

Collects the ``-m gpu`` items of the given test files, deals them out
round-robin (in collection order, so each test class's cases spread evenly)
to one pytest process per GPU (``CUDA_VISIBLE_DEVICES`` set to that GPU),
runs the processes side by side and prints each one's summary line.

  PYTHONPATH=$PWD python3 scripts/gpu/shard_tests.py --gpus 4,5,6,7 \\
      --log-dir $OUT tests/test_pallas_mosaic_gpu.py tests/test_nn.py

Each process writes ``<log-dir>/pytest-gpu<id>.log``; the exit status is
non-zero when any process failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def collect(files: list[str]) -> list[str]:
  out = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
       "--collect-only", "-q", "-m", "gpu", *files],
      capture_output=True, text=True, check=False)
  return [line.strip() for line in out.stdout.splitlines()
          if "::" in line and not line.startswith(" ")]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gpus", required=True, help="e.g. 4,5,6,7")
  ap.add_argument("--log-dir", default=".")
  ap.add_argument("files", nargs="+")
  args = ap.parse_args(argv)
  gpus = args.gpus.split(",")
  items = collect(args.files)
  if not items:
    print("no gpu items collected", flush=True)
    return 1
  shards = {g: items[i::len(gpus)] for i, g in enumerate(gpus)}
  os.makedirs(args.log_dir, exist_ok=True)
  procs = {}
  for g, its in shards.items():
    if not its:
      continue
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=g)
    log = open(os.path.join(args.log_dir, f"pytest-gpu{g}.log"), "w")
    procs[g] = (subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m",
         "gpu", "-v", "-rA", "--durations=5", *its],
        env=env, stdout=log, stderr=subprocess.STDOUT), log)
  print(f"{len(items)} items over GPUs {','.join(procs)}", flush=True)
  rc = 0
  for g, (p, log) in procs.items():
    p.wait()
    log.close()
    with open(log.name) as f:
      lines = f.read().splitlines()
    summary = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    print(f"GPU {g}: rc={p.returncode}; {lines[-1] if lines else ''}",
          flush=True)
    for l in summary:
      print("   " + l[:300], flush=True)
    rc = rc or p.returncode
  return rc


if __name__ == "__main__":
  sys.exit(main())
