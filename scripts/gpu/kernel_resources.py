"""Registers, spills and shared memory of the Triton (Pallas) kernels.

Usage on a GPU machine (project root on PYTHONPATH):

  python3 scripts/gpu/kernel_resources.py [delta] [channel] [scalar]

Runs each family's forward and backward once at a small shape with XLA
dumping its compiled modules, then runs ``ptxas -v`` (Triton's or CUDA's)
on every dumped PTX file and prints one line per kernel entry: registers
per thread, spill stores / loads and static shared memory. The launch
configuration (warps, stages) is the kernels' default; resource use does
not depend on the grid, so the small shape stands for the benchmark's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="xla_dump_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_dump_to={DUMP}"
                           + " --xla_gpu_dump_llvmir")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attnjax  # noqa: E402


def _ptxas():
  cands = []
  try:
    import triton  # noqa: PLC0415
    cands.append(os.path.join(os.path.dirname(triton.__file__), "backends",
                              "nvidia", "bin", "ptxas"))
  except ImportError:
    pass
  try:
    import nvidia.cuda_nvcc  # noqa: PLC0415
    for p in nvidia.cuda_nvcc.__path__:
      cands.append(os.path.join(p, "bin", "ptxas"))
  except ImportError:
    pass
  cands.append(shutil.which("ptxas") or "")
  for c in cands:
    if c and os.path.exists(c):
      return c
  return None


def _inputs(b=1, t=256, n=2, h=128, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  k = jax.random.normal(ks[1], (b, t, n, h))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, n, h), dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, n)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, n)) + 4.0)
  return q, k, v, beta, g


def _fwd_bwd(f, *args):
  def loss(*a):
    out = f(*a)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32) ** 2)
  jax.block_until_ready(jax.jit(f)(*args))
  jax.block_until_ready(jax.jit(jax.grad(loss, argnums=tuple(
      range(len(args)))))(*args))


def run_families(names):
  q, k, v, beta, g = _inputs()
  if "delta" in names:
    _fwd_bwd(lambda q, k, v, beta, g: attnjax.delta_rule_attention(
        q, k, v, beta, gate=g, implementation="pallas"), q, k, v, beta, g)
  if "channel" in names:
    gk = jnp.broadcast_to(g[..., None], k.shape).astype(jnp.float32) * 0.1
    _fwd_bwd(lambda q, k, v, gk: attnjax.linear_attention(
        q, k, v, gate=gk, implementation="pallas"), q, k, v, gk)
  if "scalar" in names:
    _fwd_bwd(lambda q, k, v, g: attnjax.linear_attention(
        q, k, v, gate=g, implementation="pallas"), q, k, v, g)


def report(ptxas):
  """One line per entry function of every dumped PTX file. Triton's shared
  memory is dynamic (sized at launch), so ptxas reports only static smem."""
  files = sorted(glob.glob(os.path.join(DUMP, "**", "*.ptx"),
                          recursive=True))
  print(f"{len(files)} PTX files in {DUMP}; ptxas {ptxas}")
  if not files:  # say what was dumped instead
    names = sorted(glob.glob(os.path.join(DUMP, "**", "*"), recursive=True))
    exts = {}
    for n in names:
      e = os.path.splitext(n)[1]
      exts[e] = exts.get(e, 0) + 1
    print(f"  dumped {len(names)} files by extension: {exts}; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS')!r}")
    print("  " + "\n  ".join(os.path.basename(n) for n in names[:15]))
  for path in files:
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.devnull],
                       capture_output=True, text=True, check=False)
    print(os.path.basename(path))
    entry, spills = None, ""
    for line in (r.stdout + r.stderr).splitlines():
      m = re.search(r"Compiling entry function '([^']+)'", line)
      if m:
        entry, spills = m.group(1), ""
        continue
      m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                    line)
      if m:
        spills = f"spill st/ld {m.group(1)}/{m.group(2)} B"
        continue
      m = re.search(r"Used (\d+) registers(.*)", line)
      if m and entry is not None:
        smem = re.search(r"(\d+) bytes smem", m.group(2))
        print(f"  {entry[:64]:64s} regs {m.group(1):>3s}  {spills:24s}  "
              f"static smem {smem.group(1) if smem else 0} B")
        entry = None
    if r.returncode:
      print(f"  ptxas rc={r.returncode}: {r.stderr[-300:]}")


def main(argv):
  names = [a for a in argv if not a.startswith("-")] or ["delta"]
  run_families(names)
  ptxas = _ptxas()
  if ptxas is None:
    print("no ptxas found (triton, nvidia-cuda-nvcc or PATH)")
    return 1
  report(ptxas)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
