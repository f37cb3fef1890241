"""Shared by the GPU profile scripts (run as scripts: this folder is on
sys.path): the GPU-vs-scan check line, the timing line, the timer."""

from __future__ import annotations

import subprocess

import jax.numpy as jnp

from attnjax.bench import common


def rel(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6))


def check_line(dtype, names, got, want, tol):
  """Print max relative errors of ``got`` against ``want`` (sequences of
  arrays named by ``names``) and NaNs in ``got``; True when all pass."""
  errs = [rel(x, y) for x, y in zip(got, want)]
  nan = any(bool(jnp.any(jnp.isnan(x.astype(jnp.float32)))) for x in got)
  good = max(errs) < tol and not nan
  print(f"check {jnp.dtype(dtype).name}: {names} rel "
        + " ".join(f"{e:.1e}" for e in errs)
        + f" nan={nan} -> {'ok' if good else 'FAIL'}", flush=True)
  return good


def line(label, b, t, sec, width=46):
  print(f"  {label:{width}s} {sec * 1e3:8.3f} ms  {b * t / sec / 1e6:8.2f} "
        "M tok/s", flush=True)


def time(fn, *args):
  return common.time_fn(fn, *args, min_seconds=0.1, repeats=3)


def clocks():
  """The GPU's SM clock and power draw now (nvidia-smi), or ''.

  Printed beside timings whose gap might come from the data rather than
  the code: tensor-core power depends on the operands' bits, and a
  power-capped GPU lowers its clock."""
  try:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
         "--format=csv,noheader"], capture_output=True, text=True,
        timeout=10, check=True).stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    return ""
  return f"[{out[0]}]" if out else ""
