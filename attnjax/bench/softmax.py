"""Softmax attention: attnjax's backends side by side with jax.nn and tokamax.

Grid (issue 3/4): T in {1k, 4k, 16k} with B*T = 16k tokens, causal and full,
H in {64, 128, 256} with N*H = 2048, plus GQA N=16 K=4 at H=128, bf16,
forward and forward+backward. Every row's ratio is attnjax's best over the best
other implementation measured in the same process.
"""

from __future__ import annotations

import dataclasses
import traceback

import jax
import jax.numpy as jnp

import attnjax
from attnjax.bench import common

# (H, N, K) head configurations of the grid.
HEAD_CONFIGS = {"64": (64, 32, 32), "128": (128, 16, 16),
                "128gqa": (128, 16, 4), "256": (256, 8, 8)}


@dataclasses.dataclass(frozen=True)
class Config:
  b: int
  t: int
  n: int
  k: int
  h: int
  causal: bool
  dtype: str = "bfloat16"

  def label(self):
    return (f"H={self.h} N:K={self.n}:{self.k} T={self.t} B={self.b} "
            f"{'causal' if self.causal else 'full'}")


def implementations(on_gpu: bool):
  """name -> (family, factory(causal) -> f(q, k, v))."""
  impls = {}

  def ours(name):
    return lambda causal: (lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=causal, implementation=name))

  if on_gpu:
    for name in ("pallas_mosaic_gpu", "pallas_triton"):
      impls[f"attnjax {name}"] = ("attnjax", ours(name))
    impls["jax.nn cudnn"] = ("other", lambda causal: (
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")))
    try:
      import tokamax  # noqa: PLC0415
      for name in ("mosaic", "triton"):
        impls[f"tokamax {name}"] = ("other", (
            lambda name: lambda causal: (
                lambda q, k, v: tokamax.dot_product_attention(
                    q, k, v, is_causal=causal, implementation=name)))(name))
    except Exception as e:  # noqa: BLE001 - optional anchor
      print(f"tokamax not available: {type(e).__name__}: {e}")
  else:
    for name in ("xla_chunked", "xla"):
      impls[f"attnjax {name}"] = ("attnjax", ours(name))
    impls["jax.nn xla"] = ("other", lambda causal: (
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                     is_causal=causal)))
  return impls


def grid(quick: bool, on_gpu: bool, heads=None, seqs=None):
  if quick:
    if on_gpu:
      return [Config(4, 4096, 16, 16, 128, c) for c in (False, True)]
    return [Config(2048 // t, t, 4, 4, 64, c, "float32")
            for t in (256, 1024) for c in (False, True)]
  heads = heads or list(HEAD_CONFIGS)
  seqs = seqs or [1024, 4096, 16384]
  out = []
  for hc in heads:
    h, n, k = HEAD_CONFIGS[hc]
    for t in seqs:
      for c in (False, True):
        out.append(Config(16384 // t, t, n, k, h, c))
  return out


def _rel_err(fn, q, k, v, causal):
  """Relative error against the float32 reference on the first sequence."""
  q1, k1, v1 = (x[:1].astype(jnp.float32) for x in (q, k, v))
  ref = attnjax.dot_product_attention(q1, k1, v1, is_causal=causal,
                                      implementation="xla")
  got = fn(q[:1], k[:1], v[:1]).astype(jnp.float32)
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def run(quick: bool = False, heads=None, seqs=None, modes=("fwd", "fwd+bwd"),
        impl_filter=None) -> list[dict]:
  on_gpu = jax.default_backend() == "gpu"
  impls = implementations(on_gpu)
  if impl_filter:
    impls = {k: v for k, v in impls.items()
             if any(f in k for f in impl_filter)}
  rows = []
  for cfg in grid(quick, on_gpu, heads, seqs):
    keys = jax.random.split(jax.random.key(cfg.t * 7 + cfg.h + cfg.causal), 4)
    dt = jnp.dtype(cfg.dtype)
    q = jax.random.normal(keys[0], (cfg.b, cfg.t, cfg.n, cfg.h), dt)
    k = jax.random.normal(keys[1], (cfg.b, cfg.t, cfg.k, cfg.h), dt)
    v = jax.random.normal(keys[2], (cfg.b, cfg.t, cfg.k, cfg.h), dt)
    do = jax.random.normal(keys[3], q.shape, dt)
    for name, (family, make) in impls.items():
      fwd = make(cfg.causal)
      for mode in modes:
        row = dict(suite="softmax", impl=name, family=family,
                   **dataclasses.asdict(cfg), mode=mode)
        flops = common.attention_flops(cfg.b, cfg.n, cfg.t, cfg.t, cfg.h,
                                       causal=cfg.causal, mode=mode)
        try:
          if mode == "fwd":
            f = jax.jit(fwd)
            sec = common.time_fn(f, q, k, v)
            if cfg.t <= 4096:
              row["rel_err"] = _rel_err(f, q, k, v, cfg.causal)
          else:
            f = jax.jit(lambda q, k, v, do, fwd=fwd: jax.vjp(fwd, q, k, v)[1](
                do))
            sec = common.time_fn(f, q, k, v, do)
          row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
        except Exception as e:  # noqa: BLE001 - record and go on
          msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          row.update(ms=None, tflops=None, error=msg)
          if not isinstance(e, NotImplementedError | ExceptionGroup):
            traceback.print_exc(limit=2)
        rows.append(row)
        tf = row.get("tflops")
        print(f"{cfg.label():44s} {mode:8s} {name:26s} "
              f"{'%8.1f TFLOP/s' % tf if tf else row.get('error', '')[:60]}",
              flush=True)
  add_ratios(rows)
  return rows


def add_ratios(rows):
  """ratio = attnjax's best / best other, per configuration and mode."""
  groups = {}
  for r in rows:
    key = tuple(r[k] for k in ("b", "t", "n", "k", "h", "causal", "mode"))
    groups.setdefault(key, []).append(r)
  for group in groups.values():
    best_other = max((r["tflops"] for r in group
                      if r["family"] == "other" and r.get("tflops")),
                     default=None)
    for r in group:
      if r["family"] == "attnjax" and r.get("tflops") and best_other:
        r["ratio_vs_best_other"] = r["tflops"] / best_other


def markdown(rows) -> str:
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  groups = {}
  for r in rows:
    key = (r["h"], f"{r['n']}:{r['k']}", r["t"], int(r["causal"]), r["mode"])
    groups.setdefault(key, {})[r["impl"]] = r
  header = ["H", "N:K", "T", "causal", "pass"] + impls + [
      "attnjax best / best other"]
  table = []
  for key, by_impl in groups.items():
    ours = [r.get("tflops") for r in by_impl.values()
            if r["family"] == "attnjax" and r.get("tflops")]
    others = [r.get("tflops") for r in by_impl.values()
              if r["family"] == "other" and r.get("tflops")]
    ratio = (max(ours) / max(others)) if ours and others else None
    table.append(list(key) + [
        by_impl.get(i, {}).get("tflops") for i in impls] + [ratio])
  return ("TFLOP/s (forward 4*B*N*T*S*H, halved when causal; "
          "forward+backward 3.5x); — = not supported or failed.\n\n"
          + common.markdown_table(header, table))


def plot(rows):
  def draw(plt):
    import numpy as np  # noqa: PLC0415
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys(
        (r["h"], r["n"], r["k"], r["t"], r["causal"], r["mode"])
        for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.55), 4.5))
    width = 0.8 / max(len(impls), 1)
    for i, name in enumerate(impls):
      vals = []
      for key in keys:
        match = [r for r in rows if r["impl"] == name and (
            r["h"], r["n"], r["k"], r["t"], r["causal"], r["mode"]) == key]
        vals.append(match[0].get("tflops") or 0 if match else 0)
      ax.bar(np.arange(len(keys)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4)
    ax.set_xticklabels([f"H{h} {n}:{k}\nT{t // 1024}k {'c' if c else 'f'} "
                        f"{m}" for h, n, k, t, c, m in keys], fontsize=6,
                       rotation=90)
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7)
    ax.set_title("softmax attention")
    return fig
  return draw
