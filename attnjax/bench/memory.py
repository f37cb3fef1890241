"""Peak scratch memory against T, from the compiler's memory analysis.

For each implementation and length, compiles forward and gradient and reads
``compiled.memory_analysis().temp_size_in_bytes`` (no execution, so lengths
whose materialised logits would not fit still report). Rabe & Staats report a
59x (inference) / 32x (differentiation) reduction at T = 16384.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import attnjax
from attnjax.bench import common


def temp_bytes(fn, *shapes):
  return jax.jit(fn).lower(*shapes).compile().memory_analysis(
  ).temp_size_in_bytes


# Longest T at which "xla" is compiled on a GPU (16 heads: 16 GiB of logits).
XLA_MAX_T = 16384


def run(quick: bool = False) -> list[dict]:
  on_gpu = jax.default_backend() == "gpu"
  n, h = (16, 128) if on_gpu else (1, 64)
  dt = jnp.bfloat16 if on_gpu else jnp.float32
  seqs = [1024, 4096, 16384] if quick else [1024, 4096, 16384, 32768, 65536,
                                            131072]
  impls = ["xla", "xla_chunked"] + (
      ["pallas_mosaic_gpu", "pallas_triton"] if on_gpu else [])
  rows = []
  for t in seqs:
    s = jax.ShapeDtypeStruct((1, t, n, h), dt)
    for impl in impls:
      if on_gpu and impl == "xla" and t > XLA_MAX_T:
        # Its float32 logits alone (N * T * T * 4 bytes) exceed the GPU, and
        # XLA's autotuner fails allocating them while compiling.
        rows += [dict(suite="memory", impl=impl, t=t, n=n, h=h, mode=m,
                      dtype=jnp.dtype(dt).name,
                      error="skipped: T x T logits exceed GPU memory")
                 for m in ("fwd", "fwd+bwd")]
        continue
      f = lambda q, k, v, impl=impl: attnjax.dot_product_attention(
          q, k, v, is_causal=True, implementation=impl).astype(
              jnp.float32).sum()
      for mode, fn in (("fwd", f), ("fwd+bwd", jax.grad(f, (0, 1, 2)))):
        row = dict(suite="memory", impl=impl, t=t, n=n, h=h, mode=mode,
                   dtype=jnp.dtype(dt).name)
        try:
          row["temp_mib"] = temp_bytes(fn, s, s, s) / 2**20
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print(f"memory T={t:6d} {impl:12s} {mode:8s} "
              f"{row.get('temp_mib', float('nan')):12.1f} MiB", flush=True)
    if linear := _linear_row(t, n, h, dt):
      rows += linear
  return rows


def _linear_row(t, n, h, dt):
  try:
    from attnjax import linear  # noqa: PLC0415
  except ImportError:
    return []
  s = jax.ShapeDtypeStruct((1, t, n, h), dt)
  f = lambda q, k, v: linear.linear_attention(q, k, v).astype(
      jnp.float32).sum()
  rows = []
  for mode, fn in (("fwd", f), ("fwd+bwd", jax.grad(f, (0, 1, 2)))):
    row = dict(suite="memory", impl="linear_attention", t=t, n=n, h=h,
               mode=mode, dtype=jnp.dtype(dt).name)
    try:
      row["temp_mib"] = temp_bytes(fn, s, s, s) / 2**20
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    rows.append(row)
  return rows


def markdown(rows) -> str:
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  table = []
  for t in sorted({r["t"] for r in rows}):
    for mode in ("fwd", "fwd+bwd"):
      by = {r["impl"]: r.get("temp_mib") for r in rows
            if r["t"] == t and r["mode"] == mode}
      ratio = (by.get("xla") / by["xla_chunked"]
               if by.get("xla") and by.get("xla_chunked") else None)
      table.append([t, mode] + [by.get(i) for i in impls] + [ratio])
  return ("Scratch memory (MiB) of causal attention, B=1, from "
          "compile().memory_analysis() (temp buffers; inputs and outputs "
          "excluded).\n\n" + common.markdown_table(
              ["T", "pass"] + impls + ["xla / xla_chunked"], table))


def plot(rows):
  def draw(plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
      for mode, style in (("fwd", "-"), ("fwd+bwd", "--")):
        pts = sorted((r["t"], r["temp_mib"]) for r in rows
                     if r["impl"] == impl and r["mode"] == mode
                     and r.get("temp_mib"))
        if pts:
          ax.loglog(*zip(*pts), style, marker="o", label=f"{impl} {mode}")
    ax.set_xlabel("T")
    ax.set_ylabel("scratch MiB")
    ax.legend(fontsize=7)
    return fig
  return draw
