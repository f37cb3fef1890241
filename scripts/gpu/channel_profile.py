"""Per-key-channel gates (GLA) on the GPU: checks, then configurations.

  PYTHONPATH=$PWD python3 scripts/gpu/channel_profile.py [--seqs=4096,16384]
      [--no-fla] [--no-checks] [--quick] [--configs=NAME,...]
      [--compile-times] [--kernels]

1. Checks: the chunk-parallel path (``ChannelConfig(chunk_parallel=True)``)
   against the scan on the GPU at H = 128, float32 and bfloat16, forward and
   every gradient, GQA, initial state, odd T.
2. Times at the benchmark's shapes (bf16, N = 16, H = Hv = 128, B*T = 65536,
   the benchmark's gates): forward and forward+backward of the
   chunk-parallel path (the default, chunk 32) at several tilings and of
   the sweep path (chunk 16), with fla's ``chunk_gla`` beside them
   (M tokens/s).

``--configs=`` keeps the configurations whose names contain one of the
given substrings. ``--compile-times`` first compiles each configuration's
forward+backward (T = 4096) in a child process with a 150 s limit and
prints the seconds, so one pathological Triton compile cannot eat the call.
``--kernels`` times each chunk-parallel kernel alone (scores, the sweeps,
the output kernel, the state-gradient sweep, dv/dA, the gradient kernel)
for each chunk-parallel configuration, before the whole-call timings.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/attnjax-jax-cache")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attnjax  # noqa: E402
import profile_common as pc  # noqa: E402
from pallas_kernels.linear_scan import channel  # noqa: E402

N, H, TOKENS = 16, 128, 65536
C = channel.ChannelConfig

CONFIGS = {
    "sweep c16": C(chunk=16, chunk_parallel=False),
    "par c32 bf32 bv64 w4 (default)": C(),
    "par c32 pairs": C(diag="pairs"),
    "par c32 sep fs64 u2": C(separate_output=True, block_f_state=64,
                             sweep_unroll=2),
    "par c32 sep fs64 u4": C(separate_output=True, block_f_state=64,
                             sweep_unroll=4),
    "par c32 sep fs32 u2": C(separate_output=True, block_f_state=32,
                             sweep_unroll=2),
    "par c32 u2": C(sweep_unroll=2),
    "par c32 sep fs64 u4 split2": C(separate_output=True, block_f_state=64,
                                    sweep_unroll=4, seq_splits=2),
    "par c32 sep fs64 u4 split4": C(separate_output=True, block_f_state=64,
                                    sweep_unroll=4, seq_splits=4),
    "par c32 sep fs64 u4 split8": C(separate_output=True, block_f_state=64,
                                    sweep_unroll=4, seq_splits=8),
    "par c32 xla sums": C(kernel_cumsum=False),
    # The fused sweep on sequence splits (two passes: each split's end from
    # zero, the carries, the fused sweep from the entering states).
    "par c32 fsplit4 u2": C(seq_splits=4),
    "par c32 fsplit8 u2": C(seq_splits=8),
    "par c32 fsplit16 u2": C(seq_splits=16),
    "par c32 fsplit16 u2 fs64": C(seq_splits=16, block_f_state=64),
    "par c32 fsplit16 u4 fs64": C(seq_splits=16, block_f_state=64,
                                  sweep_unroll=4),
    # The gradient kernel's elementwise fallback as a loop over key rows
    # (diag="factored_rows"): 168 registers instead of 255 (H100 compile).
    "par c32 rows": C(diag="factored_rows"),
    "par c32 rows wb8": C(diag="factored_rows", num_warps_bwd=8),
    "par c32 rows bf64": C(diag="factored_rows", block_f=64),
    "par c32 rows fsplit16": C(diag="factored_rows", seq_splits=16),
    "par c32 sep fs64 u4 split4 xla sums": C(separate_output=True,
                                             block_f_state=64,
                                             sweep_unroll=4, seq_splits=4,
                                             kernel_cumsum=False),
    "par c32 bf16 bv64 w4": C(block_f=16),
    "par c32 bf64": C(block_f=64),
    "par c32 bf64 wb8": C(block_f=64, num_warps_bwd=8),
    "par c32 bf32 bv32 w4": C(block_v=32),
    "par c32 bf32 bv64 w8": C(num_warps=8, num_warps_bwd=8),
    "par c16 bf32 bv64 w4": C(chunk=16),
    "par c64 bf32 bv64 w4": C(chunk=64),
    "par c32 sep fs64": C(separate_output=True, block_f_state=64),
    "par c32 sep fs32": C(separate_output=True, block_f_state=32),
    "par c32 sep fs128": C(separate_output=True),
    "par c32 fs64": C(block_f_state=64),
    "par c64 sep fs64": C(chunk=64, separate_output=True, block_f_state=64),
    # early_decay: each chunk's decay loaded with its state-independent
    # work, not inside the carried update (beside the default at 16k and
    # beside the auto layout at 32k, B = 2: "A:" selects that pair).
    "par c32 early": C(early_decay=True),
    "A: sep fs64 u4": C(separate_output=True, block_f_state=64,
                        sweep_unroll=4),
    "A: sep fs64 u4 early": C(separate_output=True, block_f_state=64,
                              sweep_unroll=4, early_decay=True),
}


def checks():
  ok = True
  for dt, tol, bf in ((jnp.float32, 2e-3, 16), (jnp.bfloat16, 5e-2, 32)):
    b, t, n, kh, f = 2, 301, 4, 2, 128
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (b, t, n, f)).astype(dt)
    k = (jax.random.normal(ks[1], (b, t, kh, f)) / f ** 0.5).astype(dt)
    v = jax.random.normal(ks[2], (b, t, kh, f)).astype(dt)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, n, f)) + 3.0)
    s0 = 0.1 * jax.random.normal(ks[4], (b, n, f, f))
    cfg = C(chunk=32, chunk_parallel=True, block_f=bf,
            block_v=64 if dt == jnp.bfloat16 else 32)

    def run(fn):
      def loss(q, k, v, g, s0):
        o, s = fn(q, k, v, g, s0)
        o32 = o.astype(jnp.float32)
        return jnp.sum(o32 * jnp.sin(o32)) + jnp.sum(s * s), (o, s)
      return jax.jit(jax.value_and_grad(loss, argnums=range(5),
                                        has_aux=True))(q, k, v, g, s0)
    (_, (o1, s1)), g1 = run(
        lambda q, k, v, g, s0, cfg=cfg: channel.channel_gated_linear_attention(
            q, k, v, g, scale=f ** -0.5, initial_state=s0, config=cfg,
            interpret=False))
    (_, (o2, s2)), g2 = run(
        lambda q, k, v, g, s0: attnjax.linear_attention(
            q, k, v, gate=g, initial_state=s0, return_final_state=True,
            implementation="xla"))
    ok &= pc.check_line(dt, "out/state/dq/dk/dv/dg/ds0",
                        (o1, s1) + tuple(g1), (o2, s2) + tuple(g2), tol)
  return ok


def _inputs(b, t):
  """The benchmark's channel-gate inputs (attnjax.bench.linear)."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, N, H), jnp.bfloat16)
  k = (jax.random.normal(ks[1], (b, t, N, H)) / H ** 0.5).astype(
      jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, N, H), jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, N, H)) + 4.0) / 16
  return q, k, v, g


def _grad_fn(cfg):
  def loss(q, k, v, g):
    o = channel.channel_gated_linear_attention(q, k, v, g, scale=H ** -0.5,
                                               config=cfg)[0]
    return jnp.sum(o.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def compile_one(name):
  t = 4096
  args = _inputs(TOKENS // t, t)
  t0 = time.time()
  lowered = _grad_fn(CONFIGS[name]).lower(*args)
  t1 = time.time()
  lowered.compile()
  print(f"  compile {name:28s} lower {t1 - t0:5.1f} s, compile "
        f"{time.time() - t1:6.1f} s", flush=True)


def compile_times(names):
  """The names that compiled within the limit (the persistent compilation
  cache lets the timings reuse their executables)."""
  ok = []
  for name in names:
    try:
      r = subprocess.run([sys.executable, __file__, f"--compile-one={name}"],
                         timeout=150, check=False)
      if r.returncode == 0:
        ok.append(name)
    except subprocess.TimeoutExpired:
      print(f"  compile {name:28s} > 150 s (killed)", flush=True)
  return ok


def kernel_timings(seqs):
  """Each chunk-parallel kernel alone, per configuration."""
  for t in seqs:
    b = TOKENS // t
    q, k, v, g = _inputs(b, t)
    gs = channel._chunk_cumsum(g, channel._SUB)
    do = v
    dfin = jnp.zeros((b, N, H, H), jnp.float32)
    for name, cfg in CONFIGS.items():
      if not cfg.chunk_parallel:
        continue
      s = channel._static(cfg, scale=H ** -0.5, t=t, rep=1, fp=H, vp=H,
                          has_s0=False, interpret=False)
      scores = jax.jit(lambda q, k, gs, s=s: channel._scores_call(
          q, k, gs, None, s))
      gates = channel._sub_gates(g, s)  # raw with kernel_cumsum
      try:
        pc.line(f"{name} T={t}: scores", b, t,
                pc.time(scores, q, k, gates))
        a, qd, kd, dec = scores(q, k, gates)
        if s.splits == 1:
          sweep = jax.jit(lambda *x, s=s: channel._sweep_call(
              *x, None, s, store=False))
          pc.line("  sweep (output + states)", b, t,
                  pc.time(sweep, qd, kd, v, a, dec))
        if s.splits > 1 and not s.sep:  # fused on splits: two passes
          s1 = dataclasses.replace(s, has_s0=False)
          ends = jax.jit(lambda qd, kd, v, dec, s=s1: channel._sweep_call(
              qd, kd, v, None, dec, None, s, store=False, output=False)[0])
          pc.line(f"  split ends sweep (rows {s.fs}, {s.splits} splits)",
                  b, t, pc.time(ends, qd, kd, v, dec))
          carry = jax.jit(lambda e, dec, s=s: channel._carry_through(
              channel._split_decays(dec, s), e, jnp.zeros_like(e[:, :, 0]),
              reverse=False)[0])
          e = ends(qd, kd, v, dec)
          pc.line("  XLA carries through the splits", b, t,
                  pc.time(carry, e, dec))
          ent = carry(e, dec)
          s2 = dataclasses.replace(s, has_s0=True)
          sweep = jax.jit(lambda *x, s=s2: channel._sweep_call(
              *x, s, store=False))
          pc.line("  sweep from the carries (output + states)", b, t,
                  pc.time(sweep, qd, kd, v, a, dec, ent))
          store = jax.jit(lambda *x, s=s2: channel._sweep_call(
              *x, s, store=True))
          pc.line("  the same, storing states", b, t,
                  pc.time(store, qd, kd, v, a, dec, ent))
          _, _, hs = store(qd, kd, v, a, dec, ent)
          del e, ent
        elif s.sep:  # with the pass over the splits when split (no fix-up)
          states = jax.jit(lambda *x, s=s: channel._split_states(
              *x, None, s))
          pc.line(f"  states sweep, storing (rows {s.fs}, "
                  f"{s.splits} splits)", b, t,
                  pc.time(states, qd, kd, v, a, dec))
          _, hs = states(qd, kd, v, a, dec)
          out = jax.jit(lambda *x, s=s: channel._output_call(*x, s))
          pc.line("  output kernel" + (" (joining the splits)"
                                       if s.splits > 1 else ""), b, t,
                  pc.time(out, qd, v, a, hs))
          if s.splits > 1:  # the backward's states: joined by XLA
            join = jax.jit(lambda *x, dt=qd.dtype: channel._join_splits(
                *x, dt))
            pc.line("  XLA join of the split states", b, t,
                    pc.time(join, *hs))
            hs = join(*hs)
        else:
          store = jax.jit(lambda *x, s=s: channel._sweep_call(
              *x, None, s, store=True))
          pc.line("  sweep, storing states", b, t,
                  pc.time(store, qd, kd, v, a, dec))
          _, _, hs = store(qd, kd, v, a, dec)
        dstate = jax.jit(lambda *x, s=s: channel._split_dstate(*x, s))
        pc.line(f"  state-gradient sweep (rows {s.fs}"
                + ((", + XLA join)" if s.sep else ", two passes)")
                   if s.splits > 1 else ")"), b, t,
                pc.time(dstate, qd, do, dec, dfin))
        dhs, _ = dstate(qd, do, dec, dfin)
        dadv = jax.jit(lambda *x, s=s: channel._dadv_call(*x, None, s))
        pc.line("  dv / dA kernel", b, t, pc.time(dadv, a, do, v, kd, dhs))
        _, da = dadv(a, do, v, kd, dhs)
        grads = jax.jit(lambda *x, s=s: channel._grad_call(*x, None, s))
        pc.line(f"  gradient kernel (channel block {s.bf})", b, t,
                pc.time(grads, q, k, v, do, gates, da, hs, dhs))
        del a, qd, kd, dec, hs, dhs, da
      except Exception as e:  # noqa: BLE001
        print(f"  {name} FAILED {type(e).__name__}: {str(e)[:300]}",
              flush=True)


def timings(seqs, fla=True):
  for t in seqs:
    b = TOKENS // t
    print(f"T={t} B={b}", flush=True)
    q, k, v, g = _inputs(b, t)
    for name, cfg in CONFIGS.items():
      def f(q, k, v, g, cfg=cfg):
        return channel.channel_gated_linear_attention(
            q, k, v, g, scale=H ** -0.5, config=cfg)[0]
      try:
        pc.line(f"{name} fwd", b, t, pc.time(jax.jit(f), q, k, v, g))
        pc.line(f"{name} fwd+bwd", b, t, pc.time(_grad_fn(cfg), q, k, v, g))
      except Exception as e:  # noqa: BLE001
        print(f"  {name} FAILED {type(e).__name__}: {str(e)[:300]}",
              flush=True)
    if fla:
      _fla(b, t)


def _fla(b, t):
  try:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415
    from fla.ops.gla import chunk_gla  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001
    print(f"  fla unavailable: {e}")
    return
  from attnjax.bench.linear import _time_torch  # noqa: PLC0415
  dev = "cuda"
  torch.manual_seed(0)

  def leaf(scale=1.0):
    return (torch.randn(b, t, N, H, device=dev) * scale).to(
        torch.bfloat16).requires_grad_()
  q, k, v = leaf(), leaf(H ** -0.5), leaf()
  g = (F.logsigmoid(torch.randn(b, t, N, H, device=dev) + 4) / 16
       ).requires_grad_()
  do = torch.randn(b, t, N, H, device=dev, dtype=torch.bfloat16)
  with torch.no_grad():
    pc.line("fla chunk_gla fwd", b, t,
            _time_torch(lambda: chunk_gla(q, k, v, g)))

  def fb():
    chunk_gla(q, k, v, g)[0].backward(do)
  try:
    pc.line("fla chunk_gla fwd+bwd", b, t, _time_torch(fb))
  except Exception as e:  # noqa: BLE001
    print(f"  fla fwd+bwd FAILED {type(e).__name__}: {str(e)[:200]}")
  torch.cuda.empty_cache()


def main(argv):
  global CONFIGS
  for a in argv:
    if a.startswith("--compile-one="):
      compile_one(a[len("--compile-one="):])
      return 0
    if a.startswith("--configs="):
      keep = a[len("--configs="):].split(",")
      CONFIGS = {n: c for n, c in CONFIGS.items()
                 if any(x in n for x in keep)}
  if "--compile-times" in argv:
    done = compile_times(list(CONFIGS))
    CONFIGS = {n: CONFIGS[n] for n in done}
  ok = True if "--no-checks" in argv else checks()
  t0 = time.time()
  seqs = (4096,) if "--quick" in argv else (4096, 16384, 65536)
  for a in argv:
    if a.startswith("--seqs="):
      seqs = tuple(int(x) for x in a[7:].split(","))
  if "--kernels" in argv:
    kernel_timings(seqs)
  timings(seqs, fla="--no-fla" not in argv)
  print(f"timings {time.time() - t0:.0f} s; checks {'ok' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
