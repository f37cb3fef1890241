"""Where the linear-scan forward spends its time on the split path (GPU).

  PYTHONPATH=$PWD python3 scripts/gpu/linear_profile.py     # ~4 min
  PYTHONPATH=$PWD python3 scripts/gpu/linear_profile.py --sweep best.json
  PYTHONPATH=$PWD python3 scripts/gpu/linear_profile.py --occupancy
  PYTHONPATH=$PWD python3 scripts/gpu/linear_profile.py --parts  # ~2 min

Shapes as the benchmark (bf16, N = 16, H = Hv = 128, B*T = 65536): T = 4096
(one split) against T = 16384 / 65536 (split path). Times, per shape: the
whole forward and forward+backward; on the split path also its parts (the
Gram pass, the chain over splits, the chunked kernel from the split
starts); then the forward at forced split counts and a few tilings.
Prints M tokens/s and milliseconds. ``--sweep [PATH]`` instead tries the
split heuristic's target and the Gram / forward tilings greedily (fixed
decay, forward and forward+backward over the three shapes) and writes the
chosen ``KernelConfig`` overrides as JSON (for ATTNJAX_LINEAR_SCAN_CONFIG).
"""

from __future__ import annotations

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


def _inputs(b, t, gate):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, N, H), jnp.bfloat16)
  k = (jax.random.normal(ks[1], (b, t, N, H)) / H ** 0.5).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, N, H), jnp.bfloat16)
  g = None
  if gate:
    ld = -jnp.exp(jnp.linspace(-5.0, -1.0, N))
    g = jnp.broadcast_to(ld, (b, t, N)).astype(jnp.float32)
  return q, k, v, g


def _time(fn, *args):
  return common.time_fn(fn, *args, min_seconds=0.1, repeats=3)


def _line(label, b, t, sec):
  print(f"  {label:44s} {sec * 1e3:8.3f} ms  {b * t / sec / 1e6:8.2f} "
        "M tok/s", flush=True)


def _captured_static(q, k, v, g, cfg):
  """The _Static the public entry point builds (captured from _core)."""
  box = {}
  orig = kernels._core

  def spy(*a):
    box["s"] = a[-1]
    return orig(*a)

  kernels._core = spy
  try:
    jax.eval_shape(lambda *x: kernels.chunked_linear_attention(
        *x, None, scale=H ** -0.5, config=cfg), q, k, v, g)
  finally:
    kernels._core = orig
  return box["s"]


def _parts(b, t, gate, cfg):
  q, k, v, g = _inputs(b, t, gate)
  s = _captured_static(q, k, v, g, cfg)
  print(f"  static: splits={s.splits} cps={s.cps} rows={s.rows} "
        f"bv={s.bv}", flush=True)
  if s.splits == 1:
    return
  gg = None if g is None else jnp.moveaxis(g, 1, 2)
  prep = jax.jit(lambda g_: kernels._prep(g_, None, s, N, b))(gg)
  gram = jax.jit(lambda k_, v_, w: kernels._gram_call(k_, v_, w, s,
                                                      a_rep=1))
  local = gram(k, v, prep["sk"])
  _line("gram (split states)", b, t, _time(gram, k, v, prep["sk"]))
  init = jnp.zeros((b, N, H, H), jnp.float32)
  chain = jax.jit(lambda l, d, i: kernels._chain_splits(l, d, i, s, False))
  starts = chain(local, prep["sdec"], init)
  _line("chain over splits", b, t, _time(chain, local, prep["sdec"], init))
  fwd = jax.jit(lambda q_, k_, v_, p, st: kernels._fwd_call(q_, k_, v_, p,
                                                            st, s))
  _line("chunked kernel from split starts", b, t,
        _time(fwd, q, k, v, prep, starts))
  pf = jax.jit(lambda g_: kernels._prep(g_, None, s, N, b))
  _line("prep (weights, jnp)", b, t, _time(pf, gg))


def _whole(b, t, gate, cfg, label, bwd=True):
  q, k, v, g = _inputs(b, t, gate)

  def fwd(q, k, v, g):
    return kernels.chunked_linear_attention(q, k, v, g, None,
                                            scale=H ** -0.5, config=cfg)[0]

  def loss(q, k, v, g):
    return jnp.sum(fwd(q, k, v, g).astype(jnp.float32))

  try:
    sec = _time(jax.jit(fwd), q, k, v, g)
    _line(f"{label} fwd", b, t, sec)
    total = sec
    if bwd:
      # The gate is an argument but not differentiated (a fixed decay).
      sec = _time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v, g)
      _line(f"{label} fwd+bwd", b, t, sec)
      total += sec
    return total
  except Exception as e:  # noqa: BLE001
    print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:200]}")
    return None


SWEEP = [dict(split_programs_per_sm=x) for x in (0.5, 1.0, 2.0)] + [
    dict(block_rows=128), dict(num_stages_gram=2), dict(num_warps_gram=4),
    dict(num_stages=3)]


def sweep(out_json):
  """Greedy: each candidate on top of the best so far; fixed decay, fwd and
  fwd+bwd summed over the three shapes."""
  shapes = ((16, 4096), (4, 16384), (1, 65536))
  best = kernels.default_config(jnp.bfloat16)
  print("== sweep (fixed decay; seconds summed over T = 4k, 16k, 64k)")

  def cost(cfg, name):
    tot = 0.0
    for b, t in shapes:
      r = _whole(b, t, True, cfg, f"{name} T={t}")
      if r is None:
        return None
      tot += r
    print(f"  -> {name}: {tot * 1e3:.3f} ms", flush=True)
    return tot

  best_t = cost(best, "defaults")
  chosen = {}
  for cand in SWEEP:
    cfg = dataclasses.replace(best, **cand)
    c = cost(cfg, json.dumps(cand))
    if c is not None and c < 0.98 * best_t:
      best, best_t = cfg, c
      chosen.update(cand)
  print("BEST", json.dumps(chosen), flush=True)
  if out_json:
    with open(out_json, "w") as f:
      json.dump(chosen, f)


GRAM_TILINGS = (dict(num_warps_gram=4), dict(num_stages_gram=4),
                dict(block_rows=128), dict(block_rows=128, num_stages_gram=2),
                dict(gram_parts=2), dict(gram_parts=4),
                dict(gram_parts=4, num_warps_gram=4))


def parts():
  """The forward's split path piece by piece (the Gram pass, the chain
  over splits, the sweeps from the split starts, the weights) at T = 32k
  and 64k (B = 2, 1), beside the whole forward: where the ~0.19 ms go
  that 32k / 64k (121 / 119 M tokens/s without a gate) spend beyond 16k's
  one-split forward (185). First ungated with the Gram pass weighted by
  ones (as before 2026-12-06 evening) and not (the default now); then the
  fixed decay (2 stages) with 16k for scale; then the Gram pass at other
  tilings and the whole forward with KernelConfig(gram_parts)."""
  print("== parts (forward, defaults per gate)")
  base = kernels.default_config(jnp.bfloat16, H, H, gated=False)
  for weighted in (True, False):
    kernels._UNWEIGHTED_GRAM = not weighted
    print(f"-- gate=False stages={base.num_stages} Gram weighted by ones: "
          f"{weighted}")
    for b, t in ((2, 32768), (1, 65536)):
      _whole(b, t, False, base, f"B={b} T={t} whole")
      _parts(b, t, False, base)
  kernels._UNWEIGHTED_GRAM = True
  gbase = kernels.default_config(jnp.bfloat16, H, H, gated=True)
  print(f"-- gate=True (fixed decay) stages={gbase.num_stages}")
  for b, t in ((4, 16384), (2, 32768), (1, 65536)):
    _whole(b, t, True, gbase, f"B={b} T={t} whole", bwd=False)
    _parts(b, t, True, gbase)
  print("-- Gram tilings (no gate)")
  for b, t in ((2, 32768), (1, 65536)):
    q, k, v, g = _inputs(b, t, False)
    for over in GRAM_TILINGS:
      s = _captured_static(q, k, v, g, dataclasses.replace(base, **over))
      prep = jax.jit(lambda s=s: kernels._prep(None, None, s, N, b))()
      gram = jax.jit(lambda k_, v_, w, s=s: kernels._gram_call(
          k_, v_, w, s, a_rep=1))
      _line(f"T={t} gram {json.dumps(over)}", b, t,
            _time(gram, k, v, prep["sk"]))
  print("-- whole forward with KernelConfig(gram_parts)")
  for gate, cfg in ((False, base), (True, gbase)):
    for b, t in ((2, 32768), (1, 65536)):
      for parts_ in (2, 4):
        _whole(b, t, gate, dataclasses.replace(cfg, gram_parts=parts_),
               f"gate={gate} T={t} gram_parts={parts_}", bwd=False)


def occupancy():
  """Is the one-split forward's rate set by the number of programs or by
  their length? run49 (H100): T = 4k, B = 16 (512 programs of 64 chunks)
  runs 156 M tokens/s, T = 16k, B = 4 without a split (128 programs of
  256 chunks) 116; both fill the GPU in whole waves. Here the same
  program count at both lengths (B = 4 and B = 16 at T = 4k and 16k), one
  split, forward only, gated and not, at the defaults."""
  print("== occupancy (one split, forward)")
  for gate in (False, True):
    base = kernels.default_config(jnp.bfloat16, H, H, gated=gate,
                                  num_splits=1)
    print(f"-- gate={gate} stages={base.num_stages}")
    for b, t in ((16, 4096), (16, 16384), (4, 4096), (4, 16384),
                 (1, 16384), (1, 65536)):
      _whole(b, t, gate, base, f"B={b:2d} T={t:5d} programs="
             f"{b * N * (H // base.block_v)} chunks={t // base.chunk}",
             bwd=False)
    # Value blocks instead of sequence splits at T = 64k, B = 1 (no Gram
    # pass; q and k re-read per value block, from L2 if a head's programs
    # keep pace): 128 and 256 programs.
    for over in (dict(block_v=16), dict(block_v=16, num_splits=2),
                 dict(block_v=32, num_splits=4)):
      _whole(1, 65536, gate, dataclasses.replace(base, **over),
             f"B= 1 T=65536 {over}", bwd=False)


def main():
  print(common.device_info(), flush=True)
  if "--occupancy" in sys.argv:
    occupancy()
    return 0
  if "--parts" in sys.argv:
    parts()
    return 0
  if "--sweep" in sys.argv:
    sweep(sys.argv[sys.argv.index("--sweep") + 1]
          if len(sys.argv) > sys.argv.index("--sweep") + 1 else None)
    return 0
  base = kernels.default_config(jnp.bfloat16)
  for gate in (False, True):
    print(f"== gate={gate}")
    for b, t in ((16, 4096), (4, 16384), (1, 65536)):
      print(f"-- B={b} T={t}")
      _whole(b, t, gate, base, "default")
      _parts(b, t, gate, base)
  print("== forced split counts / tilings (no gate)")
  for b, t in ((16, 4096), (1, 65536)):
    print(f"-- B={b} T={t}")
    for ns in (1, 2, 4, 8, 16, 32, 128):
      if b * t // 64 < 2 * ns:
        continue
      _whole(b, t, False, dataclasses.replace(base, num_splits=ns),
             f"num_splits={ns}", bwd=False)
    for over in (dict(block_rows=128), dict(block_rows=256),
                 dict(block_v=128, num_warps=8), dict(num_stages=3),
                 dict(chunk=128, num_warps=8),
                 # One pass, no split: narrow value blocks fill the SMs at
                 # B = 1 (q and k re-read per value block, from L2 if the
                 # programs of a head keep pace).
                 dict(num_splits=1, block_v=16),
                 dict(num_splits=1, block_v=32),
                 dict(num_splits=4, block_v=32)):
      _whole(b, t, False, dataclasses.replace(base, **over), str(over),
             bwd=False)
      if t > 4096 and over.get("num_splits") != 1:
        _parts(b, t, False, dataclasses.replace(base, **over))
  return 0


if __name__ == "__main__":
  sys.exit(main())
