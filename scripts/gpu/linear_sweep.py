"""Sweeps the linear-scan Pallas kernels' tiling on a GPU; prints M tokens/s.

Run from the repository root on a CUDA machine (no network needed):

  PYTHONPATH=$PWD python3 scripts/gpu/linear_sweep.py            # ~2 min
  PYTHONPATH=$PWD python3 scripts/gpu/linear_sweep.py --full     # ~6 min

Shapes: bf16, N = 16, H = Hv = 128, B*T = 65536 at T = 4096 (B = 16, one
split) and T = 65536 (B = 1, the split path), a fixed per-head decay (the
gated code path; no decay has its own, checked at the end). Forward
candidates (chunk, block_v, num_warps, num_stages) are timed forward only;
backward candidates (block_f, block_v_bwd, num_warps_bwd, num_stages_bwd)
forward+backward with the best forward. Every candidate's output is checked
against the default configuration's (a miscompiled candidate is dropped).
Static facts from compiling each kernel for sm_90a on CPU (ptxas): at the
defaults no kernel spills; block_v/block_f/block_v_bwd = 128 with 8 warps
also compile without spills (fewer redundant q k^T products, 1 CTA/SM).

The best configuration is printed as JSON; try it in the benchmark with

  ATTNJAX_LINEAR_SCAN_CONFIG='<json>' PYTHONPATH=$PWD python3 -m \
      attnjax.bench.linear --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnjax.bench import common  # noqa: E402
from pallas_kernels.linear_scan import kernels  # noqa: E402

N, H = 16, 128
SHAPES = ((16, 4096), (1, 65536))

FWD_QUICK = [
    dict(),
    dict(block_v=64, num_warps=8),
    dict(block_v=128, num_warps=8),
    dict(num_stages=3),
    dict(chunk=128, num_warps=8),
]
FWD_FULL = [dict(chunk=c, block_v=bv, num_warps=w, num_stages=st)
            for c in (64, 128) for bv, w in ((64, 4), (64, 8), (128, 8))
            for st in (1, 2, 3)]
BWD_QUICK = [
    dict(),
    dict(block_f=128, block_v_bwd=128),
    dict(num_warps_bwd=4),
    dict(num_stages_bwd=3),
]
BWD_FULL = [dict(block_f=bf, block_v_bwd=bv, num_warps_bwd=w,
                 num_stages_bwd=st)
            for bf, bv in ((32, 32), (64, 64), (128, 64), (64, 128),
                           (128, 128))
            for w in (4, 8) for st in (2, 3)]
SPLITS = [dict(num_sms=66), dict(num_sms=264)]


def _inputs(b, t):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, N, H), jnp.bfloat16)
  k = (jax.random.normal(ks[1], (b, t, N, H)) / H ** 0.5).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, N, H), jnp.bfloat16)
  ld = -jnp.exp(jnp.linspace(-5.0, -1.0, N))
  g = jnp.broadcast_to(ld, (b, t, N)).astype(jnp.float32)
  return q, k, v, g


def _fns(cfg, gate=True):
  def fwd(q, k, v, g):
    return kernels.chunked_linear_attention(
        q, k, v, g if gate else None, None, scale=H ** -0.5, config=cfg)[0]

  def loss(q, k, v, g):
    return jnp.sum(fwd(q, k, v, g).astype(jnp.float32) * v.astype(
        jnp.float32))
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _measure(cfg, mode, refs, gate=True):
  """(sum of seconds over SHAPES, per-shape M tokens/s) or None if broken."""
  total, rates = 0.0, []
  for (b, t), ref in zip(SHAPES, refs):
    args = _inputs(b, t)
    fwd, grad = _fns(cfg, gate)
    try:
      out = fwd(*args)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
      scale = float(jnp.max(jnp.abs(ref)))
      if not err <= 0.05 * max(scale, 1.0):
        print(f"  {cfg} T={t}: WRONG (max err {err:.3g} vs {scale:.3g})")
        return None
      sec = common.time_fn(fwd if mode == "fwd" else grad, *args,
                           min_seconds=0.1, repeats=3)
    except Exception as e:  # noqa: BLE001 (e.g. out of shared memory)
      print(f"  {cfg} T={t}: FAILED {type(e).__name__}: {str(e)[:150]}")
      return None
    total += sec
    rates.append(b * t / sec / 1e6)
  return total, rates


def _sweep(name, base, candidates, mode, refs):
  print(f"== {name} ({mode})", flush=True)
  best, best_t = base, None
  for cand in candidates:
    cfg = dataclasses.replace(base, **cand)
    r = _measure(cfg, mode, refs)
    if r is None:
      continue
    total, rates = r
    print(f"  {json.dumps(cand):70s} " + "  ".join(
        f"T={t}: {x:7.2f} M tok/s" for (_, t), x in zip(SHAPES, rates)),
          flush=True)
    if best_t is None or total < best_t:
      best, best_t = cfg, total
  return best


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--full", action="store_true")
  args = p.parse_args(argv)
  print(common.device_info(), flush=True)
  base = kernels.default_config(jnp.bfloat16)
  refs = []
  for b, t in SHAPES:
    refs.append(_fns(base)[0](*_inputs(b, t)).astype(jnp.float32))
  best = _sweep("forward", base, FWD_FULL if args.full else FWD_QUICK,
                "fwd", refs)
  best = _sweep("backward", best, BWD_FULL if args.full else BWD_QUICK,
                "fwd+bwd", refs)
  best = _sweep("splits (num_sms)", best, [dict()] + SPLITS, "fwd+bwd",
                refs)
  changed = {f.name: getattr(best, f.name) for f in dataclasses.fields(best)
             if getattr(best, f.name) != getattr(base, f.name)}
  print("== no decay (its own code path) at the best configuration")
  for (b, t) in SHAPES:
    args_ = _inputs(b, t)
    fwd, grad = _fns(best, gate=False)
    for mode, fn in (("fwd", fwd), ("fwd+bwd", grad)):
      sec = common.time_fn(fn, *args_, min_seconds=0.1, repeats=3)
      print(f"  T={t} {mode:8s} {b * t / sec / 1e6:7.2f} M tok/s")
  print("BEST", json.dumps(changed))
  return 0


if __name__ == "__main__":
  sys.exit(main())
