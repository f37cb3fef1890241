"""The delta rule on the GPU: checks, then where the time goes (GPU).

  PYTHONPATH=$PWD python3 scripts/gpu/delta_profile.py [--quick] [--sweep]
      [--seqs=4096,65536] [--no-fla] [--xla] [--grad-sweep] [--ut-sweep]
      [--no-checks] [--forward-states] [--prefetch] [--output-scores]
      [--ut-dots=tf32x3,tf32]  (--ut-sweep: only these inverse_dots)
      [--dots=tf32x3,tf32]  (the whole path with each inverse_dots only)
      [--ut-blocks=32,64]  (DeltaConfig.ut_block_v only: UT kernel, path)
      [--splits=1,4,8,16]  (DeltaConfig.sweep_splits only)
      [--fla-parts]  (fla's forward kernel by kernel, torch.profiler)

1. Checks: ``delta_rule_attention(implementation="pallas")`` against the
   scan (``"xla"``) on the GPU, forward and every gradient, float32 and
   bfloat16, gate + segments + GQA + initial state, odd T.
2. Times (bf16, N = 16, H = Hv = 128, B*T = 65536, gated): the whole
   ``pallas`` path (and ``xla_chunked`` with ``--xla``), forward and
   forward+backward, gated and not; each kernel alone (the UT transform,
   the forward sweep, the backward's state-storing and reverse sweeps and
   its gradient kernel; with ``--sweep`` at a few tilings); fla's
   ``chunk_gated_delta_rule`` and ``chunk_delta_rule`` beside them.
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
import profile_common as pc  # noqa: E402
from pallas_kernels.linear_scan import delta as kdelta  # noqa: E402

N, H, TOKENS = 16, 128, 65536


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
    ok &= pc.check_line(dt, "out/state/dq/dk/dv/dbeta/dg/ds0",
                        (o1, s1) + tuple(g1), (o2, s2) + tuple(g2), tol)
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


def _grad_of(fn, argnums):
  def loss(*a):
    out = fn(*a)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=argnums))


def _static(t, b, cfg):
  bv = cfg.block_v or kdelta._auto_block_v_fwd(b * N, H, kdelta._num_sms())
  bvb = cfg.block_v_bwd or kdelta._auto_block_v(b * N, H, kdelta._num_sms(),
                                                  fill=kdelta._BWD_FILL)
  return kdelta._S(scale=1 / math.sqrt(H), chunk=cfg.chunk, nc=t // cfg.chunk,
                   bv=bv, bvb=bvb, warps=cfg.num_warps,
                   stages=cfg.num_stages, warps_bwd=cfg.num_warps_bwd,
                   stages_bwd=cfg.num_stages_bwd, warps_ut=cfg.num_warps_ut,
                   warps_grad=cfg.grad_warps(H),
                   warps_gut=cfg.num_warps_grad_ut or cfg.grad_warps(H),
                   stages_grad=cfg.num_stages_grad, bvg=cfg.block_v_grad,
                   bkg=cfg.grad_block_k or 0,
                   doubling=cfg.diag_inverse == "doubling",
                   inverse_dots=cfg.inverse_dots,
                   bku=cfg.grad_ut_block_k or 0,
                   buv=cfg.ut_block_v or 0,
                   fwd_states=cfg.forward_states,
                   sep_out=(kdelta._auto_separate_output(
                       b * N, H, kdelta._num_sms())
                            if cfg.separate_output is None
                            else cfg.separate_output),
                   prefetch=cfg.prefetch_weights,
                   packed=cfg.packed_weights,
                   out_scores=cfg.output_scores is True,
                   out_scores_fwd=cfg.output_scores is not False,
                   has_s0=False,
                   has_seg=False, interpret=False, upcast=False, rep=1)


def _kernel_inputs(beta, g, c):
  """beta [B, N, T] and the chunk-C gate weights (gc, wq, wk, and the
  chunk decay repeated per token) in the kernels' layout."""
  from pallas_kernels.linear_scan.kernels import _block_weights  # noqa: PLC0415
  gc, wq, wk, dec = _block_weights(jnp.moveaxis(g, 1, 2), None, c)
  return jnp.moveaxis(beta, 1, 2), gc, wq, wk, jnp.repeat(dec, c, axis=-1)


def _parts(t, b, q, k, v, beta, g, cfg):
  """Each kernel of one configuration alone (padded kernel layouts)."""
  st = _static(t, b, cfg)
  c = cfg.chunk
  bp, gc, wq, wk, dec = _kernel_inputs(beta, g, c)
  tag = (f"C{c} bv{st.bv}/{st.bvb} w{st.warps}/{st.warps_bwd} "
         f"st{st.stages}/{st.stages_bwd} ut-w{st.warps_ut} "
         f"grad-w{st.warps_grad}/ut-w{st.warps_gut}/st{st.stages_grad}"
         f"/bv{st.bvg}/bk{st.bkg or 'F'}{' dbl' if st.doubling else ''}")
  ut = jax.jit(lambda *a: kdelta._ut_call(*a, None, st, store_t=True))
  fwd = jax.jit(lambda *a: kdelta._fwd_call(*a, None, st, False))
  store = jax.jit(lambda *a: kdelta._fwd_call(*a, None, st, True))
  bwd = jax.jit(lambda *a: kdelta._bwd_call(*a, st))
  grads = jax.jit(lambda *a: kdelta._grad_call(*a, None, st))
  core = lambda *a: kdelta._core(*a, None, None, st)  # noqa: E731
  try:
    pc.line(f"UT kernel (+T) {tag}", b, t,
            pc.time(ut, q, k, v, bp, gc, wq))
    w, u, a, tt = ut(q, k, v, bp, gc, wq)
    pc.line(f"sweep fwd {tag}", b, t,
          pc.time(fwd, q, k, a, w, u, wq, wk, dec))
    pc.line(f"sweep fwd, storing states {tag}", b, t,
          pc.time(store, q, k, a, w, u, wq, wk, dec))
    h, vn = store(q, k, a, w, u, wq, wk, dec)
    do = v
    dfin = jnp.zeros((b, N, H, H), jnp.float32)
    pc.line(f"reverse sweep {tag}", b, t,
          pc.time(bwd, q, k, a, w, wq, wk, dec, do, dfin))
    gv, lam, _ = bwd(q, k, a, w, wq, wk, dec, do, dfin)
    pc.line(f"gradient kernel {tag}", b, t,
          pc.time(grads, q, k, v, bp, gc, wq, wk, tt, h, lam, do, gv, vn))
    del w, u, a, tt, h, vn, gv, lam
    pc.line(f"core fwd {tag}", b, t,
          pc.time(jax.jit(core), q, k, v, bp, gc, wq, wk, dec))
    pc.line(f"core fwd+bwd {tag}", b, t,
          pc.time(_grad_of(core, tuple(range(8))), q, k, v, bp, gc, wq, wk,
                dec))
  except Exception as e:  # noqa: BLE001
    print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:400]}")


def _forward_states(t, b, q, k, v, beta, g):
  """DeltaConfig(forward_states=True) and separate_output beside the
  default: the forward sweep writing outputs and the backward's states in
  one pass; the storing sweep plus the chunk-parallel output kernel; the
  core's forward and forward+backward. ``d`` is the layout without
  either (the default before run40)."""
  r = dataclasses.replace
  d = kdelta.DeltaConfig(forward_states=False, separate_output=False)
  bp, gc, wq, wk, dec = _kernel_inputs(beta, g, d.chunk)
  st = _static(t, b, d)
  w, u, a, _ = jax.jit(lambda *x: kdelta._ut_call(
      *x, None, st, store_t=True))(q, k, v, bp, gc, wq)
  try:
    default = jax.jit(lambda *x: kdelta._fwd_call(*x, None, st, False))
    pc.line(f"sweep fwd (outputs only, bv {st.bv})", b, t,
            pc.time(default, q, k, a, w, u, wq, wk, dec))
    both = jax.jit(lambda *x: kdelta._fwd_call(*x, None, st, True,
                                               out=True))
    pc.line("sweep fwd, outputs and states", b, t,
            pc.time(both, q, k, a, w, u, wq, wk, dec))
    store = jax.jit(lambda *x: kdelta._fwd_call(*x, None, st, True,
                                                out=False, final=True))
    pc.line("sweep fwd, states and final state", b, t,
            pc.time(store, q, k, a, w, u, wq, wk, dec))
    _, h, vn = store(q, k, a, w, u, wq, wk, dec)
    outk = jax.jit(lambda *x: kdelta._out_call(*x, st))
    pc.line("output kernel (separate_output)", b, t,
            pc.time(outk, q, a, wq, h, vn))
    del h, vn
  except Exception as e:  # noqa: BLE001
    print(f"  sweeps FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
  del w, u, a
  for cfg in (d, r(d, forward_states=True), r(d, separate_output=True),
              r(d, separate_output=True, forward_states=True)):
    st = _static(t, b, cfg)
    tag = ("forward_states " if cfg.forward_states else "") + (
        "separate_output" if cfg.separate_output else "")
    tag = tag or "neither"
    core = lambda *a, st=st: kdelta._core(*a, None, None, st)  # noqa: E731
    try:
      if not cfg.forward_states:  # the forward is the same with it
        pc.line(f"core fwd {tag} {pc.clocks()}", b, t,
                pc.time(jax.jit(core), q, k, v, bp, gc, wq, wk, dec))
      pc.line(f"core fwd+bwd {tag} {pc.clocks()}", b, t,
              pc.time(_grad_of(core, tuple(range(8))), q, k, v, bp, gc, wq,
                      wk, dec))
    except Exception as e:  # noqa: BLE001
      print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:400]}",
            flush=True)
  # Forward only, last (a time limit takes these first): the states-only
  # sweep with fla's 32 value columns a program, and 128-token chunks
  # (half the sequential steps, each twice the work).
  for tag, cfg in (("separate_output bv32",
                    r(d, separate_output=True, block_v=32)),
                   ("chunk 128", r(d, chunk=128)),
                   ("separate_output chunk 128",
                    r(d, separate_output=True, chunk=128))):
    bp, gc, wq, wk, dec = _kernel_inputs(beta, g, cfg.chunk)
    _core_fwd_line(t, b, tag, cfg, q, k, v, bp, gc, wq, wk, dec)


def _core_fwd_line(t, b, tag, cfg, *args, grad: bool = False):
  """One line: the core's forward (no gradient), or with ``grad`` its
  forward+backward, with ``cfg``."""
  st = _static(t, b, cfg)
  core = lambda *a: kdelta._core(*a, None, None, st)  # noqa: E731
  fn = _grad_of(core, tuple(range(8))) if grad else jax.jit(core)
  try:
    pc.line(f"core fwd{'+bwd' if grad else ''} {tag} {pc.clocks()}", b, t,
            pc.time(fn, *args))
  except Exception as e:  # noqa: BLE001
    print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)


def _prefetch(t, b, q, k, v, beta, g):
  """DeltaConfig(prefetch_weights=True) against the default: the forward
  sweep alone (outputs; states only), then the core's forward and
  forward+backward; gated, with zero gates (wq, wk and the decay all
  ones, in three buffers as in the gated path) and with zero gates in one
  buffer (as XLA folds the ungated path's): if the sweeps' unpipelined
  weight loads are the gated path's extra time, the one-buffer case runs
  faster without prefetch and all three match with it."""
  r = dataclasses.replace
  d = kdelta.DeltaConfig()
  for gated, gate in (("gated", g), ("zero gates", jnp.zeros_like(g))):
    bp, gc, wq, wk, dec = _kernel_inputs(beta, gate, d.chunk)
    st = _static(t, b, d)
    w, u, a, _ = jax.jit(lambda *x, st=st: kdelta._ut_call(
        *x, None, st, store_t=True))(q, k, v, bp, gc, wq)
    weights = [(gated, (wq, wk, dec))]
    if gate is not g:
      weights.append(("zero gates, one buffer", (wq, wq, wq)))
    for name, wts in weights:
      for cfg in (d, r(d, prefetch_weights=True)):
        st = _static(t, b, cfg)
        tag = f"{name}{' prefetch' if st.prefetch else ''}"
        try:
          outs = jax.jit(lambda *x, st=st: kdelta._fwd_call(*x, None, st,
                                                            False))
          pc.line(f"sweep fwd outputs (bv {st.bv}) {tag}", b, t,
                  pc.time(outs, q, k, a, w, u, *wts))
          store = jax.jit(lambda *x, st=st: kdelta._fwd_call(
              *x, None, st, True, out=False, final=True))
          pc.line(f"sweep fwd states {tag}", b, t,
                  pc.time(store, q, k, a, w, u, *wts))
          core = lambda *x, st=st: kdelta._core(  # noqa: E731
              *x, None, None, st)
          pc.line(f"core fwd {tag} {pc.clocks()}", b, t,
                  pc.time(jax.jit(core), q, k, v, bp, gc, *wts))
          pc.line(f"core fwd+bwd {tag} {pc.clocks()}", b, t,
                  pc.time(_grad_of(core, tuple(range(8))), q, k, v, bp, gc,
                          *wts))
        except Exception as e:  # noqa: BLE001
          print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:400]}",
                flush=True)
    del w, u, a


def _output_scores(t, b, q, k, v, beta, g):
  """DeltaConfig(output_scores=True) beside the default layout at this T:
  the UT kernel with and without the scores; with separate_output the
  output kernel reading or forming them; then the core forward and
  forward+backward without and with it (and with prefetch_weights too),
  gated."""
  r = dataclasses.replace
  d = kdelta.DeltaConfig()
  bp, gc, wq, wk, dec = _kernel_inputs(beta, g, d.chunk)
  st = _static(t, b, d)
  try:
    for scores in (True, False):
      ut = jax.jit(lambda *x, sc=scores: kdelta._ut_call(
          *x, None, st, scores=sc))
      pc.line(f"UT kernel {'with' if scores else 'without'} scores", b, t,
              pc.time(ut, q, k, v, bp, gc, wq))
    if st.sep_out:
      w, u, a = jax.jit(lambda *x: kdelta._ut_call(*x, None, st))(
          q, k, v, bp, gc, wq)
      _, h, vn = jax.jit(lambda *x: kdelta._fwd_call(
          *x, None, st, True, out=False, final=True))(
              q, k, a, w, u, wq, wk, dec)
      outk = jax.jit(lambda *x: kdelta._out_call(*x, st))
      pc.line("output kernel, stored scores", b, t,
              pc.time(outk, q, a, wq, h, vn))
      outs = jax.jit(lambda q, wq, h, vn, k, gc: kdelta._out_call(
          q, None, wq, h, vn, st, k=k, gc=gc))
      pc.line("output kernel, forming scores", b, t,
              pc.time(outs, q, wq, h, vn, k, gc))
      del w, u, a, h, vn
  except Exception as e:  # noqa: BLE001
    print(f"  kernels FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
  layout = "separate_output" if st.sep_out else "fused sweep"
  for tag, cfg in ((layout, d),
                   (f"{layout} output_scores", r(d, output_scores=True)),
                   (f"{layout} output_scores prefetch",
                    r(d, output_scores=True, prefetch_weights=True))):
    _core_fwd_line(t, b, tag, cfg, q, k, v, bp, gc, wq, wk, dec)
    _core_fwd_line(t, b, tag, cfg, q, k, v, bp, gc, wq, wk, dec, grad=True)


def _grad_sweep(t, b, q, k, v, beta, g, only_ut=False):
  """The gradient kernel alone at several tilings: its inputs come once
  from the default configuration (they do not depend on the gradient
  kernel's fields), so each tiling costs one compile."""
  r = dataclasses.replace
  d = kdelta.DeltaConfig()
  st = _static(t, b, d)
  bp, gc, wq, wk, dec = _kernel_inputs(beta, g, d.chunk)
  w, u, a, tt = jax.jit(lambda *x: kdelta._ut_call(*x, None, st,
                                                    store_t=True))(
      q, k, v, bp, gc, wq)
  h, vn = jax.jit(lambda *x: kdelta._fwd_call(*x, None, st, True))(
      q, k, a, w, u, wq, wk, dec)
  gv, lam, _ = jax.jit(lambda *x: kdelta._bwd_call(*x, st))(
      q, k, a, w, wq, wk, dec, v, jnp.zeros((b, N, H, H), jnp.float32))
  fused = r(d, grad_block_k=None)
  # The UT pull-back's spills, compiled for an H100 (C = 64, F = V = 128,
  # bf16; scripts/aot/ptxas_report.py, 2026-12-07), stores / loads in
  # bytes: 4 warps whole 884 / 1068, by 64 / 32 columns 720 / 704 and
  # 636 / 636; 8 warps whole 392 / 424, by 64 / 32 / 16 columns 112 / 112,
  # 196 / 196 and 72 / 76. "--grad-sweep=ut" times those alone. Run124
  # (H100, T = 32k, both gradient kernels): 3.99 ms by default, 4.55 at 8
  # warps, by 64 / 32 / 16 columns at 8 warps 4.68 / 5.65 / 7.20 (64 and
  # 32 at 8 warps are refused since: 64 missed bf16's tolerance), by 64
  # at 4 warps 4.15.
  ut_forms = (d, r(d, num_warps_grad_ut=8),
              r(d, grad_ut_block_k=16, num_warps_grad_ut=8),
              r(d, grad_ut_block_k=64))
  if only_ut:
    cfgs = ut_forms
  else:
    cfgs = (fused, r(fused, num_warps_grad=4),
            r(fused, num_stages_grad=1), r(fused, block_v_grad=32),
            r(d, num_warps_grad=8), r(d, grad_block_k=32),
            r(d, num_stages_grad=1), r(d, grad_ut_block_k=32)) + ut_forms
  for cfg in cfgs:
    sg = _static(t, b, cfg)
    tag = (f"grad-w{sg.warps_grad}/ut-w{sg.warps_gut}/st{sg.stages_grad}"
           f"/bv{sg.bvg}/bk{sg.bkg or 'F'}"
           f"{f'/ut-cols{sg.bku}' if sg.bku else ''}")
    try:
      grads = jax.jit(lambda *x, sg=sg: kdelta._grad_call(*x, None, sg))
      pc.line(f"gradient kernel {tag}", b, t,
            pc.time(grads, q, k, v, bp, gc, wq, wk, tt, h, lam, v, gv, vn))
      if sg.bkg and sg.bkg < H:
        # The split's first kernel alone; the rest is the UT pull-back
        # (and the partials' sums).
        first = jax.jit(lambda *x, sg=sg: kdelta._grad_state_call(*x, sg))
        pc.line(f"  of which state products {tag}", b, t,
                pc.time(first, q, k, wq, wk, h, lam, v, gv, vn))
    except Exception as e:  # noqa: BLE001
      print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


def _configs(t, b, q, k, v, beta, g, configs):
  """Each (tag, DeltaConfig, with_grad) of ``configs``: the forward, gated
  and ungated; forward+backward gated where ``with_grad``."""
  for name, cfg, with_grad in configs:
    for gated in (True, False):
      f = lambda q, k, v, beta, g, cfg=cfg, gated=gated: kdelta.delta_rule(  # noqa: E731
          q, k, v, beta, g if gated else None, scale=1 / math.sqrt(H),
          config=cfg)
      tag = f"{name} {'gated' if gated else 'ungated'}"
      try:
        pc.line(f"fwd {tag} {pc.clocks()}", b, t,
                pc.time(jax.jit(f), q, k, v, beta, g))
        if gated and with_grad:
          pc.line(f"fwd+bwd {tag} {pc.clocks()}", b, t,
                  pc.time(_grad_of(f, (0, 1, 2, 3, 4)), q, k, v, beta, g))
      except Exception as e:  # noqa: BLE001
        print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:400]}",
              flush=True)


def _splits(t, b, q, k, v, beta, g, splits):
  """DeltaConfig(sweep_splits=P) for each P (1: the one long sweep);
  forward+backward at the first and the largest P."""
  _configs(t, b, q, k, v, beta, g,
           [(f"splits {p}", kdelta.DeltaConfig(sweep_splits=p),
             p in (splits[0], splits[-1])) for p in splits])


def _dots(t, b, q, k, v, beta, g, dots):
  """The whole kernel path with each DeltaConfig.inverse_dots, the first
  again last (drift); forward+backward for each."""
  _configs(t, b, q, k, v, beta, g,
           [(f"inverse_dots {d}", kdelta.DeltaConfig(inverse_dots=d), True)
            for d in dots + dots[:1]])


def _ut_blocks(t, b, q, k, v, beta, g, blocks):
  """DeltaConfig(ut_block_v=x) for each x beside the default: the UT
  kernel alone (the forward's, without scores; the first again last),
  then the whole path (forward gated and not, forward+backward gated)."""
  r = dataclasses.replace
  d = kdelta.DeltaConfig()
  bp, gc, wq, _, _ = _kernel_inputs(beta, g, d.chunk)
  cfgs = [d] + [r(d, ut_block_v=x) for x in blocks] + [d]
  for cfg in cfgs:
    st = _static(t, b, cfg)
    ut = jax.jit(lambda *a, st=st: kdelta._ut_call(*a, None, st,
                                                   scores=False))
    tag = f"UT kernel ut_block_v {cfg.ut_block_v}"
    try:
      pc.line(tag, b, t, pc.time(ut, q, k, v, bp, gc, wq))
    except Exception as e:  # noqa: BLE001
      print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:300]}",
            flush=True)
  _configs(t, b, q, k, v, beta, g,
           [(f"ut_block_v {c.ut_block_v}", c, True) for c in cfgs])


def _ut_sweep(t, b, q, k, v, beta, g, dots=None):
  """The UT kernel alone (gated) at several warp counts and inverses,
  with and without the scores (run24/26 timed it with them only)."""
  r = dataclasses.replace
  d = kdelta.DeltaConfig()
  bp, gc, wq, _, _ = _kernel_inputs(beta, g, d.chunk)
  cfgs = (d, r(d, num_warps_ut=4), r(d, num_warps_ut=8),
          r(d, num_warps_ut=4, diag_inverse="substitution"),
          r(d, inverse_dots="ieee"),
          r(d, inverse_dots="ieee", diag_inverse="substitution"),
          r(d, inverse_dots="tf32"),
          r(d, inverse_dots="tf32", diag_inverse="substitution"))
  if dots:  # the default tiling with each of these inverse_dots only
    cfgs = [r(d, inverse_dots=x) for x in dots]
  for cfg in cfgs:
    st = _static(t, b, cfg)
    tag = (f"ut-w{st.warps_ut}{' dbl' if st.doubling else ' sub'}"
           f"{'' if st.inverse_dots == 'tf32x3' else ' ' + st.inverse_dots}")
    # (store T, form scores): the forward alone without the scores (the
    # output_scores=None default), with them, and under differentiation.
    for store_t, scores in ((False, False), (False, True), (True, True)):
      ut = jax.jit(lambda *a, st=st, store_t=store_t, scores=scores:
                   kdelta._ut_call(*a, None, st, store_t=store_t,
                                   scores=scores))
      try:
        pc.line(f"UT kernel {tag}{' (+T)' if store_t else ''}"
                f"{' (+scores)' if scores else ''}", b, t,
                pc.time(ut, q, k, v, bp, gc, wq))
      except Exception as e:  # noqa: BLE001
        print(f"  {tag} FAILED {type(e).__name__}: {str(e)[:300]}",
              flush=True)


def timings(seqs, sweep, fla=True, xla=False, grad_sweep=False,
            ut_sweep=False, forward_states=False, prefetch=False,
            output_scores=False, ut_dots=None, splits=None, dots=None,
            ut_blocks=None):
  for t in seqs:
    b = TOKENS // t
    print(f"T={t} B={b}", flush=True)
    q, k, v, beta, g = _inputs(b, t)
    if splits:  # sweep_splits only
      _splits(t, b, q, k, v, beta, g, splits)
      continue
    if dots:  # inverse_dots only, the whole kernel path
      _dots(t, b, q, k, v, beta, g, dots)
      continue
    if ut_blocks:  # ut_block_v only
      _ut_blocks(t, b, q, k, v, beta, g, ut_blocks)
      continue
    if grad_sweep:  # the gradient kernel's tilings only
      _grad_sweep(t, b, q, k, v, beta, g, only_ut=grad_sweep == "ut")
      continue
    if ut_sweep:  # the UT kernel's warps and inverses only
      _ut_sweep(t, b, q, k, v, beta, g, ut_dots)
      continue
    if forward_states:  # the opt-in sweep layouts only
      _forward_states(t, b, q, k, v, beta, g)
      continue
    if prefetch:  # prefetch_weights against the default only
      _prefetch(t, b, q, k, v, beta, g)
      continue
    if output_scores:  # output_scores against separate_output only
      _output_scores(t, b, q, k, v, beta, g)
      continue
    # "gated, zero gates": the gated path's inputs (three distinct weight
    # arrays) with the ungated values: whether the gated forward's extra
    # time comes from the values or from the arrays. "gated" runs again
    # last (drift), and each line ends with the SM clock and power draw
    # read right after it (a power-capped clock would be data-dependent).
    for impl in ("pallas",) + (("xla_chunked",) if xla else ()):
      for gated, gate in ((True, g), (False, g), ("zero", jnp.zeros_like(g)),
                          (True, g)):
        f = lambda q, k, v, beta, g, impl=impl, gated=gated: (  # noqa: E731
            attnjax.delta_rule_attention(
                q, k, v, beta, gate=g if gated else None,
                implementation=impl))
        name = f"{impl} " + {True: "gated", False: "ungated",
                              "zero": "gated, zero gates"}[gated]
        try:
          sec = pc.time(jax.jit(f), q, k, v, beta, gate)
          pc.line(f"{name} fwd {pc.clocks()}", b, t, sec)
          sec = pc.time(_grad_of(f, (0, 1, 2, 3, 4)), q, k, v, beta, gate)
          pc.line(f"{name} fwd+bwd {pc.clocks()}", b, t, sec)
        except Exception as e:  # noqa: BLE001
          print(f"  {name} FAILED {type(e).__name__}: {str(e)[:300]}")
    configs = [kdelta.DeltaConfig()]
    if sweep:
      r = dataclasses.replace
      d = kdelta.DeltaConfig()
      configs += [r(d, diag_inverse="substitution"),
                  r(d, num_warps_ut=4),
                  r(d, num_warps_ut=4, num_warps_grad_ut=8),
                  r(d, grad_block_k=None),
                  r(d, grad_block_k=32), r(d, num_stages_grad=1)]
    for cfg in configs:
      _parts(t, b, q, k, v, beta, g, cfg)
    if fla:
      _fla(b, t)


def _fla_setup(b, t):
  """(torch, [(name, call(q, k, v, g, beta))], (q, k, v, g, beta), dO):
  fla's gated and ungated delta rules at [b, t] with the benchmark's
  inputs (bf16; L2-normalised keys); None where fla is absent."""
  try:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415
    from fla.ops.delta_rule import chunk_delta_rule  # noqa: PLC0415
    from fla.ops.gated_delta_rule import (  # noqa: PLC0415
        chunk_gated_delta_rule)
  except Exception as e:  # noqa: BLE001
    print(f"  fla unavailable: {e}")
    return None
  dev = "cuda"
  torch.manual_seed(0)
  mk = lambda *s: torch.randn(*s, device=dev).to(torch.bfloat16)  # noqa: E731
  q, v = mk(b, t, N, H), mk(b, t, N, H)
  k = F.normalize(torch.randn(b, t, N, H, device=dev), dim=-1).to(
      torch.bfloat16)
  g = F.logsigmoid(torch.randn(b, t, N, device=dev) + 4)
  beta = torch.sigmoid(torch.randn(b, t, N, device=dev)).to(torch.bfloat16)
  calls = [
      ("fla chunk_gated_delta_rule", lambda *a: chunk_gated_delta_rule(
          *a[:3], g=a[3], beta=a[4])),
      ("fla chunk_delta_rule", lambda *a: chunk_delta_rule(
          *a[:3], beta=a[4]))]
  return torch, calls, (q, k, v, g, beta), mk(b, t, N, H)


def _fla(b, t):
  setup = _fla_setup(b, t)
  if setup is None:
    return
  from attnjax.bench.linear import _time_torch  # noqa: PLC0415
  torch, calls, (q, k, v, g, beta), do = setup
  for name, call in calls:
    with torch.no_grad():
      try:
        pc.line(f"{name} fwd", b, t,
                _time_torch(lambda: call(q, k, v, g, beta)))
      except Exception as e:  # noqa: BLE001
        print(f"  {name} fwd FAILED {type(e).__name__}: {str(e)[:200]}")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]

    def fb():
      call(*leaves)[0].backward(do)
    try:
      pc.line(f"{name} fwd+bwd", b, t, _time_torch(fb))
    except Exception as e:  # noqa: BLE001
      print(f"  {name} fwd+bwd FAILED {type(e).__name__}: {str(e)[:200]}")
  torch.cuda.empty_cache()


def _fla_parts(b, t, reps: int = 20):
  """fla's forwards kernel by kernel (torch.profiler, CUDA time per call,
  averaged over ``reps`` calls after a warm-up), gated and not, beside
  which ``--output-scores`` gives ours (UT kernel without scores, the
  states sweep, the output kernel forming the scores)."""
  setup = _fla_setup(b, t)
  if setup is None:
    return
  torch, calls, args, _ = setup
  from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
  for name, call in calls:
    with torch.no_grad():
      try:
        for _ in range(3):
          call(*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
          for _ in range(reps):
            call(*args)
          torch.cuda.synchronize()
      except Exception as e:  # noqa: BLE001
        print(f"  {name} FAILED {type(e).__name__}: {str(e)[:200]}")
        continue
    total = 0.0
    print(f"  {name} fwd, per call:")
    # The kernels alone: an operator's own device time would count its
    # kernels twice.
    cuda = torch.autograd.DeviceType.CUDA
    evs = [e for e in prof.key_averages()
           if getattr(e, "device_type", cuda) == cuda]
    for ev in sorted(evs or prof.key_averages(),
                     key=lambda e: -_device_us(e)):
      us = _device_us(ev) / reps
      if us <= 0:
        continue
      total += us
      print(f"    {ev.key[:60]:60s} {us / 1e3:8.3f} ms  x{ev.count // reps}")
    print(f"    {'(sum of kernels)':60s} {total / 1e3:8.3f} ms")
  torch.cuda.empty_cache()


def _device_us(ev):
  """An event's total device (CUDA) time in microseconds, across torch
  versions (``device_time_total``, formerly ``cuda_time_total``)."""
  for attr in ("self_device_time_total", "device_time_total",
               "self_cuda_time_total", "cuda_time_total"):
    val = getattr(ev, attr, None)
    if val is not None:
      return float(val)
  return 0.0


def main(argv):
  quick = "--quick" in argv
  ok = True if "--no-checks" in argv else checks()
  t0 = time.time()
  seqs = (4096,) if quick else (4096, 16384, 65536)
  ut_dots = splits = dots = ut_blocks = None
  for a in argv:
    if a.startswith("--splits="):
      splits = tuple(int(x) for x in a[len("--splits="):].split(","))
    if a.startswith("--seqs="):
      seqs = tuple(int(x) for x in a[7:].split(","))
    if a.startswith("--ut-dots="):
      ut_dots = tuple(a[len("--ut-dots="):].split(","))
    if a.startswith("--dots="):
      dots = tuple(a[len("--dots="):].split(","))
    if a.startswith("--ut-blocks="):
      ut_blocks = tuple(int(x) for x in a[len("--ut-blocks="):].split(","))
  if "--fla-parts" in argv:  # fla's forward kernels alone
    for t in seqs:
      print(f"T={t} B={TOKENS // t}", flush=True)
      _fla_parts(TOKENS // t, t)
    print(f"timings {time.time() - t0:.0f} s; checks {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1
  timings(seqs, "--sweep" in argv, fla="--no-fla" not in argv,
          xla="--xla" in argv, grad_sweep=("ut" if "--grad-sweep=ut" in argv
                      else "--grad-sweep" in argv),
          ut_sweep="--ut-sweep" in argv,
          forward_states="--forward-states" in argv,
          prefetch="--prefetch" in argv,
          output_scores="--output-scores" in argv, ut_dots=ut_dots,
          splits=splits, dots=dots, ut_blocks=ut_blocks)
  print(f"timings {time.time() - t0:.0f} s; checks {'ok' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
