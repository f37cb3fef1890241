"""Times linear-scan ``KernelConfig`` candidates beside the default, in one
process; prints M tokens/s.

Run from the repository root on a CUDA machine (no network needed):

  PYTHONPATH=$PWD python3 scripts/gpu/config_time.py \
      --configs '[{"num_splits": 2}, {"block_v": 32, "num_splits": 4}]' \
      [--seqs 4096,65536] [--variants no_decay,scalar_gate] [--fwdbwd]

Shapes: bf16, N = 16, H = Hv = 128, B*T = 65536 (the benchmark's: the issue's
"constant speed" compares T = 4k with 64k at this token budget). Each
candidate is applied on top of ``default_config`` for the variant; its
output is checked against the default's (relative max error, printed; a
wrong candidate is marked WRONG). ``--fwdbwd`` also times q, k, v
gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnjax.bench import common  # noqa: E402
from pallas_kernels.linear_scan import kernels  # noqa: E402

N, H = 16, 128


def inputs(b, t, variant):
  """q, k, v and the log gate: none (no_decay), a fixed per-head decay
  (fixed_decay) or a data-dependent one (scalar_gate)."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, N, H), jnp.bfloat16)
  k = (jax.random.normal(ks[1], (b, t, N, H)) / H ** 0.5).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, N, H), jnp.bfloat16)
  g = None
  if variant == "fixed_decay":
    ld = -jnp.exp(jnp.linspace(-5.0, -1.0, N))
    g = jnp.broadcast_to(ld, (b, t, N)).astype(jnp.float32)
  elif variant == "scalar_gate":
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, N))) / 16
  elif variant != "no_decay":
    raise ValueError(f"variant {variant!r}")
  return q, k, v, g


def fns(cfg):
  """The jitted forward and q, k, v gradients under ``cfg``."""
  def fwd(q, k, v, g):
    return kernels.chunked_linear_attention(q, k, v, g, scale=H ** -0.5,
                                            config=cfg)[0]

  def loss(q, k, v, g):
    return jnp.sum(fwd(q, k, v, g).astype(jnp.float32) * v.astype(
        jnp.float32))
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def cases(variants: str, seqs: str, tokens: int):
  """(variant, T, B, inputs, default config) for each comma-separated
  variant and sequence length at B * T = ``tokens``."""
  for variant in variants.split(","):
    for t in (int(x) for x in seqs.split(",")):
      b = max(1, tokens // t)
      yield (variant, t, b, inputs(b, t, variant),
             kernels.default_config(jnp.bfloat16, H, H,
                                    gated=variant != "no_decay"))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--configs", required=True,
                 help="JSON list of KernelConfig overrides")
  p.add_argument("--seqs", default="4096,65536")
  p.add_argument("--variants", default="no_decay,scalar_gate")
  p.add_argument("--tokens", type=int, default=65536, help="B * T")
  p.add_argument("--fwdbwd", action="store_true")
  a = p.parse_args(argv)
  print(common.device_info(), flush=True)
  cands = json.loads(a.configs)
  for variant, t, b, args, base in cases(a.variants, a.seqs, a.tokens):
    ref = None
    for over in [{}] + cands:
      label = json.dumps(over) if over else "default"
      try:
        fwd, grad = fns(dataclasses.replace(base, **over))
        out = fwd(*args).astype(jnp.float32)
        if ref is None:
          ref, scale = out, float(jnp.max(jnp.abs(out)))
        err = float(jnp.max(jnp.abs(out - ref))) / max(scale, 1e-6)
        sec = common.time_fn(fwd, *args, min_seconds=0.1, repeats=3)
        line = f"{variant:11s} T={t:6d} B={b:3d} fwd {b * t / sec / 1e6:7.2f}"
        if a.fwdbwd:
          sec2 = common.time_fn(grad, *args, min_seconds=0.1, repeats=3)
          line += f"  fwd+bwd {b * t / sec2 / 1e6:6.2f}"
        line += (f" M tok/s  err {err:.1e}{' WRONG' if err > 2e-2 else ''}"
                 f"  {label}")
      except Exception as e:  # noqa: BLE001
        line = (f"{variant:11s} T={t:6d} {label}: FAILED "
                f"{type(e).__name__}: {str(e)[:200]}")
      print(line, flush=True)


if __name__ == "__main__":
  main()
