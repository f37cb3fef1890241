"""Linear attention: attnjax vs flash-linear-attention vs causal softmax.

One process, one GPU, bf16, B * T = 65536 tokens, N = 16 heads, H = Hv = 128
(the anchors of docs/research: flash-linear-attention 0.6.0's
``chunk_simple_gla`` measured 68 M tokens/s forward and 12.7 M tokens/s
forward+backward at T = 4096 with a fixed decay, 36 / 8.8 at T = 65536).

Rows: ``impl, family, variant, T, B, mode, ms, tokens_per_s`` (plus
``error`` when a configuration fails). Variants:

* ``no_decay``: plain causal linear attention.
* ``fixed_decay``: a fixed per-head decay (RetNet / Lightning; fla
  ``g_gamma``), a constant in the backward pass (not differentiated, as
  fla's ``g_gamma``).
* ``scalar_gate``: data-dependent scalar gates (Mamba-2 / simple GLA; fla
  ``g``; its backward may refuse to run on Triton < 3.7.1).
* ``channel_gate``: per-key-channel gates (GLA; fla ``chunk_gla``).
* ``delta``: DeltaNet, the delta rule without a gate (fla
  ``chunk_delta_rule``; L2-normalised keys, sigmoid write strengths).
* ``gated_delta``: Gated DeltaNet (fla ``chunk_gated_delta_rule``; its
  backward may refuse to run on Triton < 3.7.1).

attnjax implementations: ``pallas`` where it serves the variant, else
``xla_chunked``; causal softmax: ``attnjax.dot_product_attention`` with
``cudnn`` and ``pallas``. Memory: JAX preallocates 75% of the GPU by default,
leaving torch the rest (enough here); set ``XLA_PYTHON_CLIENT_MEM_FRACTION``
before starting Python to change that.

Run alone: ``python -m attnjax.bench.linear [--quick] [--variants a,b]
[--seqs 4096,65536]``; or through ``python -m attnjax.bench --suite linear``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from attnjax.bench import common

__all__ = ["add_ratios", "markdown", "plot", "run"]

TOKENS = 65536
HEADS = 16
HEAD_DIM = 128
VARIANTS = ("no_decay", "fixed_decay", "scalar_gate", "channel_gate",
            "delta", "gated_delta")
_DELTA = ("delta", "gated_delta")


def _inputs(b, t, variant, key=0):
  n, h = HEADS, HEAD_DIM
  ks = jax.random.split(jax.random.key(key), 6)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, n, h), jnp.float32)
  if variant in _DELTA:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  else:
    k = k / math.sqrt(h)
  k = k.astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, n, h), jnp.bfloat16)
  extra = {}
  if variant == "fixed_decay":
    extra["log_decay"] = -jnp.exp(jnp.linspace(-5.0, -1.0, n))
  elif variant in ("scalar_gate", "gated_delta"):
    extra["gate"] = jax.nn.log_sigmoid(
        jax.random.normal(ks[3], (b, t, n)) + 4.0)
  elif variant == "channel_gate":
    extra["gate"] = jax.nn.log_sigmoid(
        jax.random.normal(ks[3], (b, t, n, h)) + 4.0) / 16
  if variant in _DELTA:
    extra["beta"] = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, n)))
  return q, k, v, extra


def _attnjax_fn(variant, implementation, mode):
  from attnjax import linear  # noqa: PLC0415

  def fwd(q, k, v, extra):
    if variant in _DELTA:
      return linear.delta_rule_attention(
          q, k, v, extra["beta"], gate=extra.get("gate"),
          implementation=implementation)
    return linear.linear_attention(
        q, k, v, log_decay=extra.get("log_decay"), gate=extra.get("gate"),
        implementation=implementation)

  if mode == "fwd":
    return jax.jit(fwd)

  def loss(q, k, v, extra):
    return jnp.sum(fwd(q, k, v, extra).astype(jnp.float32) * v.astype(
        jnp.float32))
  # A fixed decay is a constant, as in RetNet / Lightning Attention and as
  # fla's g_gamma (which has no gradient): not differentiated. Gates are.
  argnums = (0, 1, 2) if variant == "fixed_decay" else (0, 1, 2, 3)
  return jax.jit(jax.grad(loss, argnums=argnums))


def _softmax_fn(implementation, mode):
  import attnjax  # noqa: PLC0415

  def fwd(q, k, v):
    return attnjax.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=implementation)
  if mode == "fwd":
    return jax.jit(fwd)
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      fwd(q, k, v).astype(jnp.float32) * v.astype(jnp.float32)),
                          argnums=(0, 1, 2)))


def _row(impl, family, variant, t, b, mode, sec=None, error=None):
  row = dict(suite="linear", impl=impl, family=family, variant=variant, T=t,
             B=b, N=HEADS, H=HEAD_DIM, mode=mode, dtype="bfloat16")
  if sec is not None:
    row["ms"] = sec * 1e3
    row["tokens_per_s"] = b * t / sec
  if error is not None:
    row["error"] = error
  tps = row.get("tokens_per_s")
  common.append_row(row)
  print(f"linear {impl:24s} {variant:13s} T={t:6d} B={b:3d} {mode:8s} "
        + (f"{row['ms']:9.3f} ms {tps / 1e6:8.2f} M tok/s" if tps else
           f"FAILED {error}"), flush=True)
  return row


def _err(e):
  return f"{type(e).__name__}: {str(e)[:200]}"


def _time_torch(fn, min_seconds=0.25, repeats=5):
  import torch  # noqa: PLC0415
  fn()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  fn()
  torch.cuda.synchronize()
  once = max(time.perf_counter() - t0, 1e-6)
  n = max(1, min(200, int(min_seconds / once)))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(n):
      fn()
    torch.cuda.synchronize()
    samples.append((time.perf_counter() - t0) / n)
  return statistics.median(samples)


def _fla_rows(variant, t, b, modes):
  """flash-linear-attention 0.6.0 (torch) at the same shape, if importable."""
  try:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415
    from fla.ops.delta_rule import chunk_delta_rule  # noqa: PLC0415
    from fla.ops.gated_delta_rule import (  # noqa: PLC0415
        chunk_gated_delta_rule)
    from fla.ops.gla import chunk_gla  # noqa: PLC0415
    from fla.ops.simple_gla import chunk_simple_gla  # noqa: PLC0415
  except Exception:  # noqa: BLE001 (absent or broken: no fla rows)
    return []
  n, h = HEADS, HEAD_DIM
  dev = "cuda"
  torch.manual_seed(0)

  def leaf(*shape, scale=1.0):
    x = torch.randn(*shape, device=dev, dtype=torch.float32) * scale
    return x.to(torch.bfloat16).requires_grad_()

  q = leaf(b, t, n, h)
  k = leaf(b, t, n, h, scale=1 / math.sqrt(h))
  v = leaf(b, t, n, h)
  do = torch.randn(b, t, n, h, device=dev, dtype=torch.bfloat16)
  name = {"channel_gate": "fla chunk_gla",
          "delta": "fla chunk_delta_rule",
          "gated_delta": "fla chunk_gated_delta_rule"}.get(
              variant, "fla chunk_simple_gla")
  if variant == "no_decay":
    call = lambda: chunk_simple_gla(q, k, v)  # noqa: E731
  elif variant == "fixed_decay":
    gg = -torch.exp(torch.linspace(-5.0, -1.0, n, device=dev))
    call = lambda: chunk_simple_gla(q, k, v, g_gamma=gg)  # noqa: E731
  elif variant == "scalar_gate":
    g = F.logsigmoid(torch.randn(b, t, n, device=dev) + 4).requires_grad_()
    call = lambda: chunk_simple_gla(q, k, v, g=g)  # noqa: E731
  elif variant == "channel_gate":
    g = (F.logsigmoid(torch.randn(b, t, n, h, device=dev) + 4) / 16
         ).requires_grad_()
    call = lambda: chunk_gla(q, k, v, g=g)  # noqa: E731
  else:
    kn = F.normalize(k.detach().float(), dim=-1).to(
        torch.bfloat16).requires_grad_()
    beta = torch.sigmoid(torch.randn(b, t, n, device=dev)).to(
        torch.bfloat16).requires_grad_()
    if variant == "delta":
      call = lambda: chunk_delta_rule(q, kn, v, beta=beta)  # noqa: E731
    else:
      g = F.logsigmoid(torch.randn(b, t, n, device=dev) + 4
                       ).requires_grad_()
      call = lambda: chunk_gated_delta_rule(  # noqa: E731
          q, kn, v, g=g, beta=beta)
  rows = []
  for mode in modes:
    try:
      if mode == "fwd":
        with torch.no_grad():
          sec = _time_torch(call)
      else:
        def fb():
          o = call()[0]
          o.backward(do)
        sec = _time_torch(fb)
      rows.append(_row(name, "fla", variant, t, b, mode, sec))
    except Exception as e:  # noqa: BLE001
      rows.append(_row(name, "fla", variant, t, b, mode, error=_err(e)))
  del q, k, v, do
  torch.cuda.empty_cache()
  return rows


def grid(quick: bool):
  if quick:
    return (4096, 32768, 65536), ("no_decay", "fixed_decay", "scalar_gate")
  return (4096, 16384, 32768, 65536), VARIANTS


def run(quick: bool = False, seqs=None, variants=None,
        modes=("fwd", "fwd+bwd"), softmax: bool = True, impls=None,
        softmax_seqs=None, fla: bool = True) -> list[dict]:
  """Times every (variant, T, mode); returns the rows (see module doc).

  ``impls``: attnjax implementations to time (GPU default: pallas, and
  xla_chunked where pallas fails or at T = 4096 for scale);
  ``softmax_seqs``: the T of the causal softmax rows (default: ``seqs``).
  """
  on_gpu = jax.default_backend() == "gpu"
  g_seqs, g_vars = grid(quick)
  seqs = seqs or g_seqs
  variants = variants or g_vars
  impls = list(impls or (["pallas", "xla_chunked"] if on_gpu else
                         ["xla_chunked"]))
  if not on_gpu:  # a smoke run: tiny and attnjax-only
    seqs, softmax, impls = (256,), False, ["xla_chunked"]
  softmax_seqs = set(seqs if softmax_seqs is None else softmax_seqs)
  rows = []
  for t in sorted(set(seqs) | (softmax_seqs if softmax else set())):
    b = max(1, TOKENS // t) if on_gpu else 1
    for variant in variants if t in seqs else ():
      q, k, v, extra = _inputs(b, t, variant)
      for impl in impls:
        for mode in modes:
          label = f"attnjax {impl}"
          try:
            sec = common.time_fn(_attnjax_fn(variant, impl, mode), q, k, v,
                                 extra)
            rows.append(_row(label, "attnjax", variant, t, b, mode, sec))
          except NotImplementedError as e:
            rows.append(_row(label, "attnjax", variant, t, b, mode,
                             error=_err(e)))
          except Exception as e:  # noqa: BLE001
            rows.append(_row(label, "attnjax", variant, t, b, mode,
                             error=_err(e)))
        if impl == "pallas" and rows[-1].get("tokens_per_s") and t > 4096:
          break  # xla_chunked only where pallas fails, or at 4k for scale
      del q, k, v, extra
      gc.collect()
      if on_gpu and fla:
        rows += _fla_rows(variant, t, b, modes)
    if softmax and t in softmax_seqs:
      q, k, v, _ = _inputs(b, t, "no_decay")
      for impl in ("cudnn", "pallas"):
        for mode in modes:
          label = f"softmax {impl}"
          try:
            sec = common.time_fn(_softmax_fn(impl, mode), q, k, v)
            rows.append(_row(label, "softmax", "causal", t, b, mode, sec))
          except Exception as e:  # noqa: BLE001
            rows.append(_row(label, "softmax", "causal", t, b, mode,
                             error=_err(e)))
      del q, k, v
      gc.collect()
  add_ratios(rows)
  return rows


def add_ratios(rows):
  """Per (T, mode): attnjax's best / fla on the same variant, and attnjax's
  best / the best causal softmax."""
  best = {}
  for r in rows:
    if not r.get("tokens_per_s"):
      continue
    key = (r["family"], r["variant"], r["T"], r["mode"])
    best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
  for r in rows:
    if r["family"] != "attnjax" or not r.get("tokens_per_s"):
      continue
    fla = best.get(("fla", r["variant"], r["T"], r["mode"]))
    soft = best.get(("softmax", "causal", r["T"], r["mode"]))
    if fla:
      r["ratio_vs_fla"] = r["tokens_per_s"] / fla
    if soft:
      r["ratio_vs_softmax"] = r["tokens_per_s"] / soft


def markdown(rows) -> str:
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  groups = {}
  for r in rows:
    groups.setdefault((r["variant"], r["T"], r["B"], r["mode"]), {})[
        r["impl"]] = r
  header = ["variant", "T", "B", "pass"] + impls + [
      "attnjax best / fla", "attnjax best / best softmax"]
  table = []
  softmax = {(k[1], k[3]): g for k, g in groups.items() if k[0] == "causal"}
  for key, by_impl in groups.items():
    if key[0] == "causal":
      continue
    ours = [r["tokens_per_s"] for r in by_impl.values()
            if r["family"] == "attnjax" and r.get("tokens_per_s")]
    fla = [r["tokens_per_s"] for r in by_impl.values()
           if r["family"] == "fla" and r.get("tokens_per_s")]
    soft = [r["tokens_per_s"] for r in softmax.get(
        (key[1], key[3]), {}).values() if r.get("tokens_per_s")]
    vals = []
    for i in impls:
      r = by_impl.get(i) or softmax.get((key[1], key[3]), {}).get(i)
      vals.append(r["tokens_per_s"] / 1e6 if r and r.get("tokens_per_s")
                  else None)
    table.append(list(key) + vals + [
        max(ours) / max(fla) if ours and fla else None,
        max(ours) / max(soft) if ours and soft else None])
  note = ("M tokens/s (B*T = 65536, N = 16, H = Hv = 128, bf16); softmax "
          "columns are causal attention at the same T; — = not supported or "
          "failed (see the JSON rows' `error`).")
  return note + "\n\n" + common.markdown_table(header, table)


def plot(rows):
  def draw(plt):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
      series = {}
      for r in rows:
        if r["mode"] != mode or not r.get("tokens_per_s"):
          continue
        name = r["impl"] + ("" if r["family"] == "softmax"
                            else f" [{r['variant']}]")
        series.setdefault(name, []).append((r["T"], r["tokens_per_s"] / 1e6))
      for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=name,
                linestyle="--" if "softmax" in name else "-")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("T (B*T = 65536)")
      ax.set_ylabel("M tokens/s")
      ax.set_title(f"linear attention, {mode}")
      ax.legend(fontsize=6)
    return fig
  return draw


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m attnjax.bench.linear")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--seqs", default=None)
  p.add_argument("--variants", default=None)
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--no-softmax", action="store_true")
  p.add_argument("--no-fla", action="store_true",
                 help="skip flash-linear-attention (its autotuning is slow)")
  p.add_argument("--impls", default=None,
                 help="attnjax implementations, e.g. pallas")
  p.add_argument("--softmax-seqs", default=None,
                 help="T of the causal softmax rows (default: --seqs)")
  p.add_argument("--from-rows", default=None,
                 help="measure nothing: report the rows of these "
                 "comma-separated $ATTNJAX_BENCH_ROWS files")
  p.add_argument("--report", default=None,
                 help="write linear-<device>.json/md/png into this folder")
  args = p.parse_args(argv)
  ints = lambda s: [int(x) for x in s.split(",")] if s else None  # noqa: E731
  if args.from_rows:
    rows, info = common.read_rows(args.from_rows.split(","))
    rows = [{k: v for k, v in r.items() if not k.startswith("ratio_")}
            for r in rows]
    add_ratios(rows)
  else:
    info = common.device_info()
    for var in ("ATTNJAX_LINEAR_SCAN_CONFIG", "ATTNJAX_CHANNEL_CONFIG",
                "ATTNJAX_DELTA_CONFIG"):  # tuning overrides of the defaults
      if os.environ.get(var):
        info[var[len("ATTNJAX_"):].lower()] = os.environ[var]
    common.append_row({"_info": info})
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    rows = run(quick=args.quick, seqs=ints(args.seqs),
               variants=args.variants.split(",") if args.variants else None,
               modes=tuple(args.modes.split(",")),
               softmax=not args.no_softmax,
               impls=args.impls.split(",") if args.impls else None,
               softmax_seqs=ints(args.softmax_seqs), fla=not args.no_fla)
  md = markdown(rows)
  print("\n" + md)
  if args.report:
    print("wrote " + ", ".join(common.write_report(
        args.report, "linear", info or common.device_info(), rows, md,
        plot(rows))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
