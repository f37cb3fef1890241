"""The chunked (WY / UT) form of the (gated) delta rule in jnp.

Within a chunk starting from state ``S_0`` the delta rule is an ordinary
linear recurrence with *pseudo-values* ``u_t``:

  S_t = exp(g_t) S_{t-1} + k_t^T u_t,
  u_t = beta_t (v_t - exp(g_t) k_t S_{t-1}).

Unrolling ``S_{t-1}`` inside the chunk gives a unit lower-triangular system
``(I + L) u = beta v - beta exp(G) (k S_0)`` with
``L[t, j] = beta_t exp(G_t - G_j) k_t . k_j`` for ``j < t`` (the UT transform
of Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", and its gated form in "Gated Delta Networks"). Solving it
once per chunk gives ``U`` and ``W`` with ``u = U - W S_0``; the chunk's
output is ``scale * (exp(G) q S_0 + (q k^T * D) u)`` and its final state
``exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j^T u_j``. Only that last step,
which is affine in ``S_0``, runs sequentially over chunks. All decays are
chunk-relative cumulative log gates (exponents <= 0).

Autodiff gives the backward pass.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.linear.chunked import mm, pad_time, segment_masks

__all__ = ["delta_rule_chunked", "delta_rule_pallas"]

_HI = lax.Precision.HIGHEST


def _chunk_terms(q, k, v, beta, log_gate, resets, scale, c):
  """The chunk-local UT transform and decayed operands, all float32.

  Returns ``(u_v, w_k, aqk, qg, kg, decay)``, the first five [B, N, nc, C,
  *] and ``decay`` [B, N, nc] (see the module docstring), and the padded
  length: everything the chunk-to-chunk pass needs.
  """
  b, t, n, f = q.shape
  kh, vd = k.shape[2], v.shape[-1]
  dtype = q.dtype
  nc = -(-t // c)
  tp = nc * c
  rep = n // kh
  k = jnp.repeat(k, rep, axis=2)
  v = jnp.repeat(v, rep, axis=2)
  # Padding: beta = 0 and g = 0 leave the state untouched.
  q, k, v, beta, log_gate, resets = (pad_time(x, tp) for x in
                                     (q, k, v, beta, log_gate, resets))

  def chunks(x):  # [B, Tp, N, ...] -> [B, N, nc, C, ...]
    x = x.reshape((b, nc, c) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  bc = chunks(beta.astype(jnp.float32))
  if log_gate is None:
    gc = jnp.zeros((b, n, nc, c), jnp.float32)
  else:
    gc = jnp.cumsum(chunks(log_gate.astype(jnp.float32)), axis=-1)
  seg = segment_masks(resets, c)

  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  incl = jnp.tril(jnp.ones((c, c), bool))
  if seg is not None:
    same = seg.same[:, None]
    strict, incl = strict & same, incl & same
  diff = gc[..., :, None] - gc[..., None, :]
  d_strict = jnp.exp(jnp.where(strict, diff, -jnp.inf))
  d_incl = jnp.exp(jnp.where(incl, diff, -jnp.inf))
  g_in = jnp.exp(gc)
  g_out = jnp.exp(gc[..., -1:] - gc)
  decay = jnp.exp(gc[..., -1])  # [B, N, nc]
  if seg is not None:
    g_in = g_in * seg.upto[:, None]
    g_out = g_out * seg.after[:, None]
    decay = decay * seg.whole[:, None]

  # UT transform: one triangular solve per chunk for both right-hand sides.
  kk = mm("bncif,bncjf->bncij", kc, kc, dtype=dtype)
  lower = bc[..., :, None] * kk * d_strict
  eye = jnp.eye(c, dtype=jnp.float32)
  rhs = jnp.concatenate([bc[..., None] * vc.astype(jnp.float32),
                         (bc * g_in)[..., None] * kc.astype(jnp.float32)],
                        axis=-1)
  sol = lax.linalg.triangular_solve(eye + lower, rhs, left_side=True,
                                    lower=True, unit_diagonal=True)
  u_v, w_k = sol[..., :vd], sol[..., vd:]
  aqk = scale * mm("bncif,bncjf->bncij", qc, kc, dtype=dtype) * d_incl
  qg = scale * qc.astype(jnp.float32) * g_in[..., None]
  kg = kc.astype(jnp.float32) * g_out[..., None]
  return (u_v, w_k, aqk, qg, kg, decay), tp


def delta_rule_chunked(q, k, v, beta, log_gate=None, resets=None, *,
                       scale: float, initial_state=None,
                       chunk_size: int = 64):
  """Chunked (gated) delta rule.

  Args:
    q: [B, T, N, F]; k: [B, T, K, F]; v: [B, T, K, V].
    beta: [B, T, N].
    log_gate: None or [B, T, N] float32 log decays.
    resets: None or bool [B, T].
    scale: output scale.
    initial_state: None or float32 [B, N, F, V].
    chunk_size: C.

  Returns:
    ``(out float32 [B, T, N, V], final_state float32 [B, N, F, V])``.
  """
  b, t, n, f = q.shape
  vd = v.shape[-1]
  terms, tp = _chunk_terms(q, k, v, beta, log_gate, resets, scale,
                           int(chunk_size))
  u_v, w_k, aqk, qg, kg, decay = terms

  def step(s, x):
    u_c, w_c, a_c, q_c, k_c, d_c = x
    u = u_c - jnp.einsum("bnif,bnfv->bniv", w_c, s, precision=_HI)
    o = (jnp.einsum("bnif,bnfv->bniv", q_c, s, precision=_HI)
         + jnp.einsum("bnij,bnjv->bniv", a_c, u, precision=_HI))
    s = d_c[..., None, None] * s + jnp.einsum("bnjf,bnjv->bnfv", k_c, u,
                                               precision=_HI)
    return s, o

  s0 = (jnp.zeros((b, n, f, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u_v, w_k, aqk, qg, kg, decay))
  s, out = lax.scan(step, s0, xs)  # out [nc, B, N, C, V]
  out = jnp.moveaxis(out, 0, 2).reshape(b, n, tp, vd)
  return jnp.moveaxis(out, 1, 2)[:, :t], s


def delta_rule_pallas(q, k, v, beta, log_gate=None, resets=None, *,
                      scale: float, initial_state=None,
                      chunk_size: int = 64, config=None):
  """The (gated) delta rule through ``pallas_kernels.linear_scan.delta``
  (the UT transform and both sweeps as Pallas kernels). Arguments and
  result as ``delta_rule_chunked``; ``config`` a ``DeltaConfig``.
  """
  from pallas_kernels.linear_scan import delta as kernels
  return kernels.delta_rule(q, k, v, beta, log_gate, resets, scale=scale,
                            initial_state=initial_state, config=config,
                            chunk=chunk_size)
