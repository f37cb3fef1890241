"""Times the chained single-pass linear forward (``KernelConfig.chained_tile``)
beside the default split path, in one process; prints M tokens/s.

Run from the repository root on a CUDA machine (no network needed):

  PYTHONPATH=$PWD python3 scripts/gpu/chained_time.py [--tiles 256,512,1024]
      [--seqs 4096,16384,32768,65536] [--variants no_decay,scalar_gate]
      [--fwdbwd]

Shapes: bf16, N = 16, H = Hv = 128, B*T = 65536 (the benchmark's; the issue's
"constant speed" compares T = 4k with 64k at this token budget). The chained
kernel runs only where the sequence is split (T >= 32k here on an H100), so
T = 4k and 16k time the default twice (a check that nothing else moved).
Every chained output is checked against the default's (relative max error,
printed) and timed twice, since its look-back depends on timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax.numpy as jnp  # noqa: E402

from attnjax.bench import common  # noqa: E402

from config_time import cases, fns as _fns  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--tiles", default="256,512,1024")
  p.add_argument("--seqs", default="4096,16384,32768,65536")
  p.add_argument("--variants", default="no_decay,scalar_gate")
  p.add_argument("--tokens", type=int, default=65536, help="B * T")
  p.add_argument("--serial", action="store_true",
                 help="also each tile with chained_lookback=False")
  p.add_argument("--fwdbwd", action="store_true",
                 help="also forward+backward (default and the first tile)")
  a = p.parse_args(argv)
  print(common.device_info(), flush=True)
  tiles = [int(x) for x in a.tiles.split(",")]
  for variant, t, b, args, base in cases(a.variants, a.seqs, a.tokens):
    fwd, grad = _fns(base)
    ref = fwd(*args).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(ref)))
    sec = common.time_fn(fwd, *args, min_seconds=0.1, repeats=3)
    print(f"{variant:12s} T={t:6d} B={b:3d} fwd default        "
          f"{b * t / sec / 1e6:8.2f} M tok/s", flush=True)
    runs = [(tile, True) for tile in tiles]
    if a.serial:
      runs += [(tile, False) for tile in tiles]
    for tile, lookback in runs:
      cfg = dataclasses.replace(base, chained_tile=tile,
                                chained_lookback=lookback)
      f2, _ = _fns(cfg)
      label = f"{tile:5d}{'' if lookback else ' serial'}"
      try:
        out = f2(*args).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(out - ref))) / max(scale, 1e-6)
        secs = [common.time_fn(f2, *args, min_seconds=0.1, repeats=3)
                for _ in range(2)]
      except Exception as e:  # noqa: BLE001
        print(f"{variant:12s} T={t:6d} fwd chained {label}: FAILED "
              f"{type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      print(f"{variant:12s} T={t:6d} B={b:3d} fwd chained {label}  "
            + "  ".join(f"{b * t / s / 1e6:8.2f}" for s in secs)
            + f" M tok/s  rel err {err:.2e}", flush=True)
    if a.fwdbwd:
      for name, g in (("default", grad),
                      (f"chained {tiles[0]}", _fns(dataclasses.replace(
                          base, chained_tile=tiles[0]))[1])):
        sec = common.time_fn(g, *args, min_seconds=0.1, repeats=3)
        print(f"{variant:12s} T={t:6d} B={b:3d} fwd+bwd {name:13s} "
              f"{b * t / sec / 1e6:8.2f} M tok/s", flush=True)


if __name__ == "__main__":
  main()
