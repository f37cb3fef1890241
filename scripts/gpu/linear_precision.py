"""Long-sequence float32 accuracy of the linear-attention implementations.

Compares "pallas" (default splits and one split), "xla" (the lax.scan
reference) and "xla_chunked" with a float64 chunked evaluation in numpy, at
the shapes of ``test_gpu_pallas_long_sequence`` (B = 1, N = 2, H = 64, heads
with decay rates 2 and 1e-4), and measures how close the device's float32
exp / expm1 come to the correctly rounded values near 1 (a biased exp(g)
for a weak decay compounds over the ~1/|g| steps a state remembers).

  PYTHONPATH=$PWD python3 scripts/gpu/linear_precision.py [T]
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from pallas_kernels.linear_scan import kernels


def _key(*parts):
  return jax.random.key(zlib.crc32(repr(parts).encode()))


def inputs(decay, t):
  b, n, h = 1, 2, 64
  ks = jax.random.split(_key("gpu-long", decay), 5)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, n, h), jnp.float32) / np.sqrt(h)
  v = jax.random.normal(ks[2], (b, t, n, h), jnp.float32)
  if decay == "fixed":
    kw = dict(log_decay=jnp.array([-2.0, -1e-4]))
    g = np.broadcast_to(np.array([-2.0, -1e-4], np.float32), (b, t, n))
  else:
    kw = dict(gate=-jnp.array([2.0, 1e-4]) * (
        0.5 + jax.random.uniform(ks[3], (b, t, n))))
    g = np.asarray(kw["gate"])
  return q, k, v, kw, g


def truth(q, k, v, g, scale, c=64):
  """float64 chunked evaluation (exact decays exp(G_i - G_j))."""
  q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
  g = np.asarray(g, np.float32).astype(np.float64)[0]
  t, n, h = q.shape
  out = np.zeros((t, n, v.shape[-1]))
  st = np.zeros((n, h, v.shape[-1]))
  for hd in range(n):
    s = np.zeros((h, v.shape[-1]))
    for c0 in range(0, t, c):
      sl = slice(c0, c0 + c)
      gc = np.cumsum(g[sl, hd])
      d = np.tril(np.exp(gc[:, None] - gc[None, :]))
      qq, kk, vv = q[sl, hd], k[sl, hd], v[sl, hd]
      out[sl, hd] = scale * (((qq @ kk.T) * d) @ vv
                             + np.exp(gc)[:, None] * (qq @ s))
      s = np.exp(gc[-1]) * s + (kk * np.exp(gc[-1] - gc)[:, None]).T @ vv
    st[hd] = s
  return out[None], st[None]


def exp_accuracy():
  for lo, hi in ((0.5e-4, 1.5e-4), (0.005, 0.02), (0.3, 0.7)):
    g = -np.linspace(lo, hi, 1 << 20, dtype=np.float32)
    g64 = g.astype(np.float64)
    e = np.asarray(jax.jit(jnp.exp)(g), np.float64)
    m = np.asarray(jax.jit(jnp.expm1)(g), np.float64)
    log_err = np.log(e) - g64  # the decay rate actually applied, minus g
    rounded = np.exp(g64).astype(np.float32).astype(np.float64)
    m_err = (m - np.expm1(g64)) / np.abs(np.expm1(g64))
    print(f"g in -[{lo:g}, {hi:g}]: exp: log error mean {log_err.mean():.3g} "
          f"max {np.abs(log_err).max():.3g} (correct rounding: mean "
          f"{(np.log(rounded) - g64).mean():.3g}); expm1 rel error mean "
          f"{m_err.mean():.3g} max {np.abs(m_err).max():.3g}", flush=True)


def main():
  t = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
  print(jax.devices()[0].device_kind, flush=True)
  exp_accuracy()
  for decay in ("fixed", "gate"):
    q, k, v, kw, g = inputs(decay, t)
    t0 = time.time()
    ref, ref_state = truth(q, k, v, g, 1 / np.sqrt(64))
    m, ms = np.abs(ref).max(), np.abs(ref_state).max()
    print(f"{decay}: truth in {time.time() - t0:.1f}s, max|out| {m:.3g}",
          flush=True)
    outs = {}
    for name, impl, splits in (("pallas", "pallas", None),
                               ("pallas_1split", "pallas", 1),
                               ("xla", "xla", None),
                               ("xla_chunked", "xla_chunked", None)):
      base = kernels.default_config
      if splits is not None:
        kernels.default_config = (
            lambda *a, _b=base, **k: dataclasses.replace(
                _b(*a, **k), num_splits=splits))
      try:
        o, s = jax.jit(lambda q, k, v, impl=impl: attnjax.linear_attention(
            q, k, v, implementation=impl, return_final_state=True,
            **kw))(q, k, v)
        o, s = np.asarray(o, np.float64), np.asarray(s, np.float64)
      finally:
        kernels.default_config = base
      outs[name] = o
      err = np.abs(o - ref)
      at = np.unravel_index(err.argmax(), err.shape)
      print(f"  {name:14s} out rel err {err.max() / m:.3g} at {at}, state "
            f"rel err {np.abs(s - ref_state).max() / ms:.3g}", flush=True)

    def grads(impl):
      def loss(q, k, v):
        o = attnjax.linear_attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(o * v)
      return [np.asarray(x, np.float64) for x in
              jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]

    gs = {impl: grads(impl) for impl in ("pallas", "xla_chunked", "xla")}
    for a, b in (("pallas", "xla_chunked"), ("pallas", "xla"),
                 ("xla_chunked", "xla")):
      errs = [np.abs(x - y).max() / np.abs(y).max()
              for x, y in zip(gs[a], gs[b])]
      print(f"  grads {a} vs {b}: rel err dq dk dv "
            + " ".join(f"{e:.3g}" for e in errs), flush=True)


if __name__ == "__main__":
  main()
