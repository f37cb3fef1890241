"""The delta rule on the GPU: checks, then where the time goes (GPU).

  PYTHONPATH=$PWD python3 scripts/gpu/delta_profile.py [--quick] [--sweep]
      [--seqs=4096,65536] [--no-fla]

1. Checks: ``delta_rule_attention(implementation="pallas")`` against the
   scan (``"xla"``) on the GPU, forward and every gradient, float32 and
   bfloat16, gate + segments + GQA + initial state, odd T.
2. Times (bf16, N = 16, H = Hv = 128, B*T = 65536, gated): the whole
   ``pallas`` path (and ``xla_chunked`` at T = 4k), forward and
   forward+backward; the UT-transform kernel and the chunk sweep alone
   (with ``--sweep`` at a few tilings); fla's ``chunk_gated_delta_rule``
   and ``chunk_delta_rule`` beside them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attnjax  # noqa: E402
from attnjax.bench import common  # noqa: E402
from pallas_kernels.linear_scan import delta as kdelta  # noqa: E402

N, H, TOKENS = 16, 128, 65536


def _rel(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6))


def checks():
  ok = True
  for dt, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 5e-2)):
    b, t, n, kh, f, v = 2, 301, 4, 2, 64, 96
    ks = jax.random.split(jax.random.key(1), 6)
    q = jax.random.normal(ks[0], (b, t, n, f)).astype(dt)
    k = jax.random.normal(ks[1], (b, t, kh, f))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dt)
    vv = jax.random.normal(ks[2], (b, t, kh, v)).astype(dt)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, n)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, n)) + 3.0)
    s0 = 0.1 * jax.random.normal(ks[5], (b, n, f, v))
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.key(7), 0.01, (b, t)),
                     axis=1)

    def run(impl):
      def loss(q, k, vv, beta, g, s0):
        o, s = attnjax.delta_rule_attention(
            q, k, vv, beta, gate=g, initial_state=s0, segment_ids=seg,
            return_final_state=True, implementation=impl)
        o32 = o.astype(jnp.float32)
        return jnp.sum(o32 * jnp.sin(o32)) + jnp.sum(s * s), (o, s)
      return jax.jit(jax.value_and_grad(loss, argnums=range(6),
                                        has_aux=True))(q, k, vv, beta, g, s0)
    (_, (o1, s1)), g1 = run("pallas")
    (_, (o2, s2)), g2 = run("xla")
    errs = [_rel(o1, o2), _rel(s1, s2)] + [_rel(x, y) for x, y in
                                           zip(g1, g2)]
    nan = any(bool(jnp.any(jnp.isnan(x.astype(jnp.float32))))
              for x in (o1, s1) + tuple(g1))
    good = max(errs) < tol and not nan
    ok &= good
    print(f"check {jnp.dtype(dt).name}: out/state/dq/dk/dv/dbeta/dg/ds0 rel "
          + " ".join(f"{e:.1e}" for e in errs)
          + f" nan={nan} -> {'ok' if good else 'FAIL'}", flush=True)
  return ok


def _inputs(b, t):
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (b, t, N, H), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, N, H))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, N, H), jnp.bfloat16)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, N)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, N)) + 4.0)
  return q, k, v, beta, g


def _line(label, b, t, sec):
  print(f"  {label:46s} {sec * 1e3:8.3f} ms  {b * t / sec / 1e6:8.2f} "
        "M tok/s", flush=True)


def _time(fn, *args):
  return common.time_fn(fn, *args, min_seconds=0.1, repeats=3)


def _grad_of(fn, argnums):
  def loss(*a):
    out = fn(*a)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=argnums))


def timings(seqs, sweep, fla=True):
  for t in seqs:
    b = TOKENS // t
    print(f"T={t} B={b}", flush=True)
    q, k, v, beta, g = _inputs(b, t)
    for impl in ("pallas",) + (("xla_chunked",) if t <= 4096 else ()):
      f = lambda q, k, v, beta, g, impl=impl: attnjax.delta_rule_attention(  # noqa: E731
          q, k, v, beta, gate=g, implementation=impl)
      try:
        _line(f"{impl} fwd", b, t, _time(jax.jit(f), q, k, v, beta, g))
        _line(f"{impl} fwd+bwd", b, t,
              _time(_grad_of(f, (0, 1, 2, 3, 4)), q, k, v, beta, g))
      except Exception as e:  # noqa: BLE001
        print(f"  {impl} FAILED {type(e).__name__}: {str(e)[:300]}")
    # The parts, on the padded kernel layouts (as delta_rule builds them).
    from pallas_kernels.linear_scan.kernels import _block_weights  # noqa: PLC0415
    c = 64
    bp = jnp.moveaxis(beta, 1, 2)
    gc, wq, wk, dec = _block_weights(jnp.moveaxis(g, 1, 2), None, c)
    dec = jnp.repeat(dec, c, axis=-1)
    configs = [kdelta.DeltaConfig()]
    if sweep:
      configs += [kdelta.DeltaConfig(block_v=bv, block_v_bwd=bvb,
                                     num_warps=w, num_warps_bwd=wb,
                                     num_stages=st, num_stages_bwd=stb,
                                     num_warps_ut=wu)
                  for bv, bvb, w, wb, st, stb, wu in (
                      (64, 64, 4, 4, 3, 3, 1), (32, 32, 4, 4, 3, 3, 4),
                      (32, 32, 2, 2, 3, 3, 2), (128, 64, 8, 4, 2, 3, 2))]
    for cfg in configs:
      st = kdelta._S(scale=1 / math.sqrt(H), chunk=c, nc=t // c,
                     bv=cfg.block_v, bvb=cfg.block_v_bwd, warps=cfg.num_warps,
                     stages=cfg.num_stages, warps_bwd=cfg.num_warps_bwd,
                     stages_bwd=cfg.num_stages_bwd,
                     warps_ut=cfg.num_warps_ut, has_s0=False, has_seg=False,
                     interpret=False, upcast=False, rep=1)
      tag = (f"bv{cfg.block_v}/{cfg.block_v_bwd} w{cfg.num_warps}/"
             f"{cfg.num_warps_bwd} st{cfg.num_stages}/{cfg.num_stages_bwd}"
             f" ut-w{cfg.num_warps_ut}")
      ut = lambda q, k, v, bp, gc, wq, st=st: kdelta._ut(  # noqa: E731
          q, k, v, bp, gc, wq, None, st)
      sw = lambda q, k, a, w, u, wq, wk, dec, st=st: kdelta._sweep(  # noqa: E731
          q, k, a, w, u, wq, wk, dec, None, st)
      try:
        _line(f"UT kernel fwd {tag}", b, t,
              _time(jax.jit(ut), q, k, v, bp, gc, wq))
        _line(f"UT fwd+bwd (bwd in XLA) {tag}", b, t,
              _time(_grad_of(lambda *a: sum(jnp.sum(
                  x.astype(jnp.float32) ** 2) for x in ut(*a)),
                  (0, 1, 2, 3, 4, 5)), q, k, v, bp, gc, wq))
        w_, u_, a_ = jax.jit(ut)(q, k, v, bp, gc, wq)
        _line(f"sweep fwd {tag}", b, t,
              _time(jax.jit(sw), q, k, a_, w_, u_, wq, wk, dec))
        _line(f"sweep fwd+bwd {tag}", b, t,
              _time(_grad_of(sw, (0, 1, 2, 3, 4, 5, 6, 7)), q, k, a_, w_,
                    u_, wq, wk, dec))
        del w_, u_, a_
      except Exception as e:  # noqa: BLE001
        print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:300]}")
    if fla:
      _fla(b, t)


def _fla(b, t):
  try:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415
    from fla.ops.delta_rule import chunk_delta_rule  # noqa: PLC0415
    from fla.ops.gated_delta_rule import (  # noqa: PLC0415
        chunk_gated_delta_rule)
  except Exception as e:  # noqa: BLE001
    print(f"  fla unavailable: {e}")
    return
  from attnjax.bench.linear import _time_torch  # noqa: PLC0415
  dev = "cuda"
  torch.manual_seed(0)
  mk = lambda *s: torch.randn(*s, device=dev).to(torch.bfloat16)  # noqa: E731
  q, v = mk(b, t, N, H), mk(b, t, N, H)
  k = F.normalize(torch.randn(b, t, N, H, device=dev), dim=-1).to(
      torch.bfloat16)
  g = F.logsigmoid(torch.randn(b, t, N, device=dev) + 4)
  beta = torch.sigmoid(torch.randn(b, t, N, device=dev)).to(torch.bfloat16)
  do = mk(b, t, N, H)
  for name, call in (
      ("fla chunk_gated_delta_rule", lambda *a: chunk_gated_delta_rule(
          *a[:3], g=a[3], beta=a[4])),
      ("fla chunk_delta_rule", lambda *a: chunk_delta_rule(
          *a[:3], beta=a[4]))):
    with torch.no_grad():
      try:
        _line(f"{name} fwd", b, t, _time_torch(lambda: call(q, k, v, g, beta)))
      except Exception as e:  # noqa: BLE001
        print(f"  {name} fwd FAILED {type(e).__name__}: {str(e)[:200]}")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]

    def fb():
      call(*leaves)[0].backward(do)
    try:
      _line(f"{name} fwd+bwd", b, t, _time_torch(fb))
    except Exception as e:  # noqa: BLE001
      print(f"  {name} fwd+bwd FAILED {type(e).__name__}: {str(e)[:200]}")
  torch.cuda.empty_cache()


def main(argv):
  quick = "--quick" in argv
  ok = checks()
  t0 = time.time()
  seqs = (4096,) if quick else (4096, 16384, 65536)
  for a in argv:
    if a.startswith("--seqs="):
      seqs = tuple(int(x) for x in a[7:].split(","))
  timings(seqs, "--sweep" in argv, fla="--no-fla" not in argv)
  print(f"timings {time.time() - t0:.0f} s; checks {'ok' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
