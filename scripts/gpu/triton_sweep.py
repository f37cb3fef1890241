"""Sweeps the Pallas Triton flash kernel's tiles on a GPU; prints TFLOP/s.

Run from the repository root on a CUDA machine (no network needed):

  PYTHONPATH=$PWD python3 scripts/gpu/triton_sweep.py               # defaults
  PYTHONPATH=$PWD python3 scripts/gpu/triton_sweep.py --phase fwd --heads 128
  PYTHONPATH=$PWD python3 scripts/gpu/triton_sweep.py --phase dkdv --heads 128
  PYTHONPATH=$PWD python3 scripts/gpu/triton_sweep.py --phase dq --heads 128

Phases:
  defaults  the heuristic tiles (attnjax.softmax.pallas.default_block_sizes)
            on every shape of the benchmark grid, forward and forward+backward,
            next to tokamax's Triton kernel measured on an H100
            (shared/research/measured-h100.md).
  fwd       forward candidates (block_q, block_kv, num_warps, num_stages);
            forward time only.
  dq, dkdv  candidates for one backward kernel with everything else at the
            defaults; forward+backward time.

The grid is B*T = 16384 tokens, bf16, T in {1024, 4096, 16384}, causal and
not, for (H, N, K) in {(128, 16, 16), (128, 16, 4), (64, 32, 32),
(256, 8, 8)}; narrow it with --heads/--seqs/--causal/--gqa. FLOPs: forward
4*B*N*T*S*H (halved when causal), forward+backward 3.5x that. Each phase
prints, per shape, every candidate and the best one; --json PATH appends one
JSON line per measurement. A failing candidate (e.g. out of shared memory)
is reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnjax.softmax import pallas as pallas_backend  # noqa: E402
from attnjax.softmax.problem import make_problem  # noqa: E402
from pallas_kernels.flash import triton as flash_triton  # noqa: E402

TOKENS = 16384

# tokamax 0.0.17 Triton kernel on an H100 80GB, bf16, B*T = 16384
# (shared/research/measured-h100.md): (H, N, K, T, causal) -> (fwd, fwd+bwd).
TOKAMAX = {
    (128, 16, 16, 1024, 0): (334, 291), (128, 16, 16, 1024, 1): (256, 229),
    (128, 16, 16, 4096, 0): (390, 329), (128, 16, 16, 4096, 1): (341, 312),
    (128, 16, 16, 16384, 0): (403, 345), (128, 16, 16, 16384, 1): (345, 328),
    (128, 16, 4, 1024, 0): (316, 239), (128, 16, 4, 1024, 1): (252, 197),
    (128, 16, 4, 4096, 0): (340, 259), (128, 16, 4, 4096, 1): (306, 260),
    (128, 16, 4, 16384, 0): (340, 266), (128, 16, 4, 16384, 1): (331, 284),
    (64, 32, 32, 1024, 0): (279, 232), (64, 32, 32, 1024, 1): (196, 186),
    (64, 32, 32, 4096, 0): (280, 248), (64, 32, 32, 4096, 1): (274, 237),
    (64, 32, 32, 16384, 0): (303, 268), (64, 32, 32, 16384, 1): (250, 250),
    (256, 8, 8, 1024, 0): (308, 202), (256, 8, 8, 1024, 1): (231, 162),
    (256, 8, 8, 4096, 0): (355, 228), (256, 8, 8, 4096, 1): (310, 205),
    (256, 8, 8, 16384, 0): (371, 194), (256, 8, 8, 16384, 1): (304, 228),
}
HEADS = {128: [(16, 16), (16, 4)], 64: [(32, 32)], 256: [(8, 8)]}

# Candidates per head dim, the default first. Chosen from a CPU compile of
# each kernel with Triton for sm_90a (docs/pallas_triton.md, "Checking
# without a GPU"): they fit the 227 KiB of shared memory and mostly neither
# spill registers nor lose wgmma ("spill" / "mma.sync" mark the exceptions,
# kept for comparison); the GPU decides among them.
FWD = {  # (block_q, block_kv, num_warps, num_stages)
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
         (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 4),
          (64, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 4), (128, 128, 8, 3)],
    256: [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2),
          (64, 64, 4, 2),  # spill (tokamax 0.0.17's heuristic tiles)
          (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2)],
}
DQ = {  # (block_q_dq, block_kv_dq, num_warps_dq, num_stages_dq)
    64: [(128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3),
         (128, 128, 8, 2), (64, 128, 4, 2)],
    128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3),
          (64, 128, 8, 2), (64, 32, 4, 3)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2),
          (64, 32, 4, 2),  # spill (tokamax's dQ tiles)
          (32, 64, 4, 2), (64, 64, 4, 2)],
}
DKDV = {  # (block_q_dkv, block_kv_dkv, num_warps_dkv, num_stages_dkv)
    64: [(64, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3),
         (128, 128, 8, 2)],  # spill
    128: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2),
          (32, 64, 8, 3), (16, 128, 8, 3)],
    256: [(16, 64, 8, 2),  # spill
          (32, 64, 8, 2),  # spill
          (32, 64, 4, 2),  # tokamax's dK/dV tiles
          (16, 64, 4, 2), (32, 64, 4, 1), (64, 64, 8, 2), (16, 128, 8, 2)],
}
_FIELDS = {
    "fwd": ("block_q", "block_kv", "num_warps", "num_stages"),
    "dq": ("block_q_dq", "block_kv_dq", "num_warps_dq", "num_stages_dq"),
    "dkdv": ("block_q_dkv", "block_kv_dkv", "num_warps_dkv",
             "num_stages_dkv"),
}
_CANDIDATES = {"fwd": FWD, "dq": DQ, "dkdv": DKDV}


def _time(f, *args, iters: int) -> float:
  """Seconds per call (throughput of back-to-back calls)."""
  jax.block_until_ready(f(*args))  # compile
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / iters)
  return best


def _inputs(h, n, kh, t):
  b = TOKENS // t
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, kh, h), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, kh, h), jnp.bfloat16)
  do = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
  return q, k, v, do


def _fns(causal, bs):
  def attn(q, k, v):
    p, _ = make_problem(q, k, v, is_causal=bool(causal))
    return pallas_backend.triton_attention(p, block_sizes=bs,
                                           interpret=False)[0]

  fwd = jax.jit(attn)

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return fwd, fwd_bwd


def _flops(h, n, t, causal):
  b = TOKENS // t
  f = 4.0 * b * n * t * t * h
  return f / 2 if causal else f


def measure(shape, bs, *, what, iters):
  h, n, kh, t, causal = shape
  q, k, v, do = _inputs(h, n, kh, t)
  fwd, fwd_bwd = _fns(causal, bs)
  res = {}
  flops = _flops(h, n, t, causal)
  if what in ("fwd", "both"):
    sec = _time(fwd, q, k, v, iters=iters)
    res["fwd_ms"], res["fwd_tflops"] = sec * 1e3, flops / sec / 1e12
  if what in ("fwd_bwd", "both"):
    sec = _time(fwd_bwd, q, k, v, do, iters=iters)
    res["fwd_bwd_ms"] = sec * 1e3
    res["fwd_bwd_tflops"] = 3.5 * flops / sec / 1e12
  return res


def _shapes(args):
  for h in args.heads:
    for n, kh in HEADS[h]:
      if args.gqa == "mha" and n != kh or args.gqa == "gqa" and n == kh:
        continue
      for t in args.seqs:
        for c in args.causal:
          yield (h, n, kh, t, c)


def _fmt(shape):
  h, n, kh, t, c = shape
  return f"H={h:3d} N:K={n}:{kh:<2d} T={t:5d} causal={c}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--phase", default="defaults",
                  choices=["defaults", "fwd", "dq", "dkdv"])
  ap.add_argument("--heads", default="128,64,256",
                  type=lambda s: [int(x) for x in s.split(",")])
  ap.add_argument("--seqs", default="1024,4096,16384",
                  type=lambda s: [int(x) for x in s.split(",")])
  ap.add_argument("--causal", default="0,1",
                  type=lambda s: [int(x) for x in s.split(",")])
  ap.add_argument("--gqa", default="all", choices=["all", "mha", "gqa"])
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--json", default=None, help="append JSON lines here")
  args = ap.parse_args(argv)

  dev = jax.devices()[0]
  print(f"# device: {dev.device_kind}  jax {jax.__version__}  "
        f"phase={args.phase}", flush=True)
  sink = open(args.json, "a") if args.json else None

  def emit(rec):
    if sink:
      sink.write(json.dumps(rec) + "\n")
      sink.flush()

  for shape in _shapes(args):
    h, n, kh, t, causal = shape
    q = jnp.zeros((TOKENS // t, t, n, h), jnp.bfloat16)
    p, _ = make_problem(q, q[:, :, :kh], q[:, :, :kh], is_causal=bool(causal))
    default = pallas_backend.default_block_sizes(p)
    ref = TOKAMAX.get(shape)
    if args.phase == "defaults":
      try:
        r = measure(shape, default, what="both", iters=args.iters)
      except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{_fmt(shape)}  FAILED {type(e).__name__}: {e}"[:400],
              flush=True)
        continue
      line = (f"{_fmt(shape)}  fwd {r['fwd_tflops']:6.1f} TFLOP/s "
              f"({r['fwd_ms']:7.3f} ms)  fwd+bwd {r['fwd_bwd_tflops']:6.1f} "
              f"TFLOP/s ({r['fwd_bwd_ms']:7.3f} ms)")
      if ref:
        line += (f"  | tokamax {ref[0]}/{ref[1]}  ratio "
                 f"{r['fwd_tflops'] / ref[0]:.2f}/"
                 f"{r['fwd_bwd_tflops'] / ref[1]:.2f}")
      print(line, flush=True)
      emit(dict(shape=shape, phase="defaults",
                block_sizes=dataclasses.asdict(default), **r))
      continue

    fields = _FIELDS[args.phase]
    what = "fwd" if args.phase == "fwd" else "fwd_bwd"
    key = f"{what}_tflops"
    tok = "?" if not ref else ref[0] if what == "fwd" else ref[1]
    print(f"{_fmt(shape)}  ({args.phase}; tokamax {tok})", flush=True)
    best = None
    for cand in _CANDIDATES[args.phase][h]:
      bs = dataclasses.replace(default, **dict(zip(fields, cand)))
      try:
        r = measure(shape, bs, what=what, iters=args.iters)
      except Exception as e:  # noqa: BLE001
        print(f"    {cand}  FAILED {type(e).__name__}: {e}"[:300],
              flush=True)
        continue
      mark = " (default)" if bs == default else ""
      print(f"    {cand}  {r[key]:6.1f} TFLOP/s{mark}", flush=True)
      emit(dict(shape=shape, phase=args.phase, candidate=cand, **r))
      if best is None or r[key] > best[1]:
        best = (cand, r[key])
    if best:
      print(f"  best {dict(zip(fields, best[0]))}: {best[1]:.1f} TFLOP/s",
            flush=True)
  if sink:
    sink.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
