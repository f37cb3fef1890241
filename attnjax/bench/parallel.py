"""Sequence-parallel benchmark: forward+backward time on 1 and 2 devices.

Causal attention, B=1, N=16 heads, H=128, bf16, total length T in {32k,
128k}: ``attnjax.dot_product_attention`` on one device (the baseline t1),
then ``attnjax.parallel.sequence_parallel_attention`` on two devices with
each strategy (ring / ulysses / all_gather, with and without load
balancing), and ringattention 0.1.2 (haoliuhl, ``pip install
ringattention``; its GPU path is its pure-JAX blockwise ring) on 1 and 2
devices when it is importable. Scaling efficiency is ``t1 / (2 * t2)``.

    PYTHONPATH=$PWD python3 -m attnjax.bench.parallel [--quick] [--seqs ...]

or through ``python -m attnjax.bench --suite parallel``. Each row: impl,
strategy, T, devices, load_balance, causal, ms, tflops, efficiency (and
error when a configuration failed, e.g. out of memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import parallel
from attnjax.bench import common
from attnjax.softmax import api as softmax_api
from attnjax.softmax.problem import make_problem

__all__ = ["run", "markdown", "plot", "block_backend"]

HEADS, HEAD_DIM, BATCH = 16, 128, 1
SEQS = (32768, 131072)
# ringattention's chunk sizes (its blockwise kernel): env-overridable.
RA_CHUNK = int(os.environ.get("ATTNJAX_BENCH_RA_CHUNK", "1024"))
# Calls slower than this are timed fewer times (GPU budget).
_SLOW_S = 1.5


def _import_ringattention():
  """ringattention 0.1.2, or None. Its __init__ reads
  ``jax.lib.xla_bridge.get_backend().platform``, gone in jax 0.11: give it
  an equivalent before importing (only to pick its platform variant)."""
  if not hasattr(jax.lib, "xla_bridge"):
    jax.lib.xla_bridge = types.SimpleNamespace(
        get_backend=lambda: types.SimpleNamespace(
            platform=jax.default_backend()))
  try:
    import ringattention  # noqa: PLC0415
  except ImportError:
    return None
  return ringattention


def block_backend(dtype=jnp.bfloat16, t=4096) -> tuple[str, str]:
  """(forward backend the blocks use here, how its backward runs)."""
  x = jax.ShapeDtypeStruct((1, t, HEADS, HEAD_DIM), dtype)
  p, _ = make_problem(jnp.zeros(x.shape, x.dtype), jnp.zeros(x.shape, x.dtype),
                      jnp.zeros(x.shape, x.dtype), is_causal=True)
  for name in softmax_api.resolve_implementations(None, p):
    try:
      jax.eval_shape(lambda q, k, v, name=name: attnjax.dot_product_attention(
          q, k, v, is_causal=True, return_residuals=True,
          implementation=name), x, x, x)
    except (NotImplementedError, ExceptionGroup):
      continue
    how = ("residual backward" if name in
           softmax_api.BACKWARD_IMPLEMENTATIONS else
           "recompute + block VJP")
    return name, how
  return "none", "none"


def _time(fn, *args) -> float:
  """Seconds per call; slow configurations get fewer repeats."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  if once > _SLOW_S:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return min(once, time.perf_counter() - t0)
  return common.time_fn(fn, *args, min_seconds=0.3, repeats=3)


def _fwd_bwd(f):
  def g(q, k, v, do):
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(do)
  return jax.jit(g)


def _inputs(t, dtype, sharding):
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (BATCH, t, HEADS, HEAD_DIM)
  mk = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(
      dtype), out_shardings=sharding)
  return [mk(k) for k in keys]


def _ring_attention_fn(ra, mesh, chunk):
  kw = dict(causal_block_size=1, deterministic=True, dropout_rng=None,
            attn_pdrop=0.0, query_chunk_size=chunk, key_chunk_size=chunk,
            policy=jax.checkpoint_policies.nothing_saveable,
            dtype=jnp.bfloat16, precision=None, prevent_cse=True)
  inner = lambda q, k, v: ra.ringattention_jax(q, k, v, None, None, None,
                                               "seq", True, kw)
  # Its accumulators are not typed for shard_map's varying-axes check.
  return jax.shard_map(inner, mesh=mesh, in_specs=P(None, "seq"),
                       out_specs=P(None, "seq"), check_vma=False)


def _row(impl, strategy, t, devices, lb, seconds=None, error=None):
  flops = common.attention_flops(BATCH, HEADS, t, t, HEAD_DIM, causal=True,
                                 mode="fwd+bwd")
  row = dict(impl=impl, strategy=strategy, T=t, devices=devices,
             load_balance=lb, causal=True)
  if seconds is not None:
    row["ms"] = seconds * 1e3
    row["tflops"] = flops / seconds / 1e12
  if error is not None:
    row["error"] = error[:300]
  return row


def _measure(rows, make_fn, args, **row_kw):
  try:
    s = _time(make_fn(), *args)
    rows.append(_row(seconds=s, **row_kw))
  except Exception as e:  # noqa: BLE001 (one failed config must not stop all)
    rows.append(_row(error=f"{type(e).__name__}: {e}", **row_kw))
  print(_fmt(rows[-1]), flush=True)


def _fmt(r):
  ms = f"{r['ms']:.1f} ms" if "ms" in r else r.get("error", "")
  return (f"  {r['impl']:13s} {r['strategy']:10s} T={r['T']:<7d} "
          f"dev={r['devices']} lb={r['load_balance']!s:5s} {ms}")


def run(quick: bool = False, seqs=None) -> list[dict]:
  """Benchmark rows (see module docstring); prints each as it goes."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  if seqs is None:
    seqs = SEQS if on_gpu and not quick else ((4096,) if on_gpu else (1024,))
  devs = jax.devices()
  ndev = 2 if len(devs) >= 2 else 1
  ra = _import_ringattention()
  name, how = block_backend(dtype)
  print(f"parallel: {len(devs)} x {devs[0].device_kind}; block backend "
        f"{name} ({how}); ringattention "
        f"{'found' if ra is not None else 'not installed'}", flush=True)
  rows = []
  one = Mesh(np.array(devs[:1]), ("seq",), axis_types=(AxisType.Auto,))
  two = Mesh(np.array(devs[:ndev]), ("seq",), axis_types=(AxisType.Auto,))
  for t in seqs:
    chunk = min(RA_CHUNK, t // (2 * ndev))
    args1 = _inputs(t, dtype, NamedSharding(one, P()))
    _measure(rows, lambda: _fwd_bwd(lambda q, k, v: (
        attnjax.dot_product_attention(q, k, v, is_causal=True))), args1,
             impl="attnjax", strategy="single", t=t, devices=1, lb=False)
    if ra is not None:
      _measure(rows, lambda: _fwd_bwd(_ring_attention_fn(ra, one, chunk)),
               args1, impl="ringattention", strategy="ring", t=t,
               devices=1, lb=False)
    del args1
    if ndev < 2:
      continue
    args2 = _inputs(t, dtype, NamedSharding(two, P(None, "seq")))
    for strategy, lbs in (("ring", (True, False)), ("ulysses", (False,)),
                          ("all_gather", (True, False))):
      for lb in lbs:
        _measure(rows, lambda strategy=strategy, lb=lb: _fwd_bwd(
            lambda q, k, v: parallel.sequence_parallel_attention(
                q, k, v, mesh=two, strategy=strategy, load_balance=lb,
                is_causal=True)), args2, impl="attnjax", strategy=strategy,
                 t=t, devices=2, lb=lb)
    if ra is not None:
      _measure(rows, lambda: _fwd_bwd(_ring_attention_fn(ra, two, chunk)),
               args2, impl="ringattention", strategy="ring", t=t, devices=2,
               lb=False)
    del args2
  add_ratios(rows)
  return rows


def add_ratios(rows):
  """efficiency = t1 / (devices * t) with t1 the same impl on one device."""
  base = {(r["impl"], r["T"]): r["ms"] for r in rows
          if r["devices"] == 1 and "ms" in r}
  for r in rows:
    t1 = base.get((r["impl"], r["T"]))
    if "ms" in r and t1:
      r["efficiency"] = t1 / (r["devices"] * r["ms"])


def _get(rows, **kw):
  for r in rows:
    if all(r.get(k) == v for k, v in kw.items()) and "ms" in r:
      return r
  return None


def markdown(rows) -> str:
  name, how = block_backend()
  table = common.markdown_table(
      ["T", "impl", "strategy", "devices", "load balance", "ms", "TFLOP/s",
       "efficiency"],
      [[r["T"], r["impl"], r["strategy"], r["devices"], r["load_balance"],
        r.get("ms"), r.get("tflops"), r.get("efficiency")] for r in rows])
  lines = [f"Causal fwd+bwd, B={BATCH}, N={HEADS}, H={HEAD_DIM}; per-device "
           f"block backend: {name} ({how}). efficiency = t1 / (n * tn), t1 "
           "the same implementation on one device.", "", table, "",
           "Goals (2 devices):", ""]
  for t in sorted({r["T"] for r in rows}):
    ring = _get(rows, T=t, impl="attnjax", strategy="ring", devices=2,
                load_balance=True)
    ring_u = _get(rows, T=t, impl="attnjax", strategy="ring", devices=2,
                  load_balance=False)
    ra = _get(rows, T=t, impl="ringattention", devices=2)
    best = min((r for r in rows if r["T"] == t and r["devices"] == 2
                and r["impl"] == "attnjax" and "ms" in r),
               key=lambda r: r["ms"], default=None)
    if best is None:
      continue
    out = [f"- T={t}: best {best['strategy']} (lb={best['load_balance']}) "
           f"efficiency {best.get('efficiency', float('nan')):.3f} "
           "(goal >= 0.90 at 128k)"]
    if ring and ring_u:
      out.append(f"ring load-balanced vs not: "
                 f"{ring_u['ms'] / ring['ms']:.2f}x (goal >= 1.5x)")
    if ra:
      out.append(f"vs ringattention: {ra['ms'] / best['ms']:.2f}x "
                 "(goal >= 1.5x)")
    lines.append("; ".join(out))
  return "\n".join(lines)


def plot(rows):
  def draw(plt):
    seqs = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(seqs), figsize=(6 * len(seqs), 4),
                             squeeze=False)
    for ax, t in zip(axes[0], seqs):
      rs = [r for r in rows if r["T"] == t and "ms" in r]
      labels = [f"{r['impl']}\n{r['strategy']}\n{r['devices']}dev"
                + (" lb" if r["load_balance"] else "") for r in rs]
      ax.bar(range(len(rs)), [r["ms"] for r in rs])
      ax.set_xticks(range(len(rs)), labels, fontsize=7)
      ax.set_ylabel("fwd+bwd ms")
      ax.set_title(f"causal, T={t}")
    fig.tight_layout()
    return fig
  return draw


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seqs", default=None, help="e.g. 32768,131072")
  ap.add_argument("--out", default=None, help="write rows as JSON here")
  args = ap.parse_args(argv)
  seqs = tuple(int(s) for s in args.seqs.split(",")) if args.seqs else None
  rows = run(quick=args.quick, seqs=seqs)
  print("\n" + markdown(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"info": common.device_info(), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
