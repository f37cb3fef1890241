"""The per-device block computation and the log-sum-exp merge.

Forward: any attnjax backend through ``dot_product_attention(...,
return_residuals=True)``. Backward from the *global* residuals: a backend's
registered residual backward (``attnjax.softmax.api.BACKWARD_IMPLEMENTATIONS``)
when it has one, else the block's own VJP with cotangents rescaled to the
global normaliser (exact, at the price of recomputing the block forward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.softmax import api as softmax_api
from attnjax.softmax.problem import make_problem

__all__ = ["block_forward", "block_backward", "merge", "rows_vjp_weights"]

F32 = jnp.float32


def _seg(q_seg, kv_seg):
  return None if q_seg is None else (q_seg, kv_seg)


def block_forward(q, k, v, q_seg, kv_seg, *, mask, scale, soft_cap,
                  implementation):
  """(out [B, T, N, Hv] in q.dtype, lse float32 [B, N, T]) of one block."""
  return softmax_api.dot_product_attention(
      q, k, v, mask=mask, segment_ids=_seg(q_seg, kv_seg), scale=scale,
      logits_soft_cap=soft_cap, return_residuals=True,
      implementation=implementation)


def _safe_exp_diff(a, b):
  """exp(a - b) with -inf in either giving 0 (never NaN)."""
  ok = jnp.isfinite(a) & jnp.isfinite(b)
  return jnp.where(ok, jnp.exp(jnp.where(ok, a - b, 0.0)), 0.0)


def merge(o, lse, o_b, lse_b):
  """Log-sum-exp merge of a partial result (o_b, lse_b) into (o, lse).

  o: float32 [B, T, N, Hv]; lse: float32 [B, N, T]. A row that is fully
  masked in one partial has lse -inf there and contributes nothing.
  """
  new = jnp.logaddexp(lse, lse_b)
  w = _safe_exp_diff(lse, new)
  w_b = _safe_exp_diff(lse_b, new)
  t = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # [B, N, T] -> [B, T, N, 1]
  return o * t(w) + o_b.astype(F32) * t(w_b), new


def rows_vjp_weights(lse_b, lse):
  """w = exp(lse_b - lse): a partial's share of the global normaliser."""
  return _safe_exp_diff(lse_b, lse)


def block_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, *, mask,
                   scale, soft_cap, implementation):
  """(dq, dk, dv) float32 of one block from the global (out, lse).

  ``out``/``lse`` are the final output and normaliser of the rows ``q``
  (all key blocks and sinks included), ``d_out``/``d_lse`` their cotangents.
  """
  problem, _ = make_problem(q, k, v, mask=mask,
                            segment_ids=_seg(q_seg, kv_seg), scale=scale,
                            logits_soft_cap=soft_cap)
  names = softmax_api.resolve_implementations(implementation, problem)
  errors = []
  for name in names:
    try:
      if name in softmax_api.BACKWARD_IMPLEMENTATIONS:
        bwd = softmax_api.load_backward(name)
        grads = bwd(problem, out, lse, d_out, d_lse)
      else:
        grads = _recompute_backward(q, k, v, q_seg, kv_seg, out, lse, d_out,
                                    d_lse, mask=mask, scale=scale,
                                    soft_cap=soft_cap, name=name)
      return tuple(g.astype(F32) for g in grads)
    except NotImplementedError as e:
      errors.append(NotImplementedError(f"{name}: {e}"))
  raise ExceptionGroup("no attention implementation can run this block's "
                       "backward pass", errors)


def _recompute_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, *,
                        mask, scale, soft_cap, name):
  """The block's VJP at its own residuals, cotangents mapped from global.

  With w = exp(lse_b - lse): out = sum_b w_b out_b, so d out_b = w_b dO and
  d lse_b = w_b (rowsum(dO * out_b) - rowsum(dO * out) + d_lse).
  """
  fn = lambda q, k, v: block_forward(q, k, v, q_seg, kv_seg, mask=mask,
                                     scale=scale, soft_cap=soft_cap,
                                     implementation=name)
  (out_b, lse_b), vjp = jax.vjp(fn, q, k, v)
  w = rows_vjp_weights(lse_b, lse)
  do = d_out.astype(F32)
  t = lambda x: jnp.swapaxes(x, 1, 2)[..., None]
  dot_b = jnp.einsum("btnv,btnv->bnt", do, out_b.astype(F32))
  dot = jnp.einsum("btnv,btnv->bnt", do, out.astype(F32))
  d_lse = jnp.zeros_like(lse) if d_lse is None else d_lse
  d_lse_b = w * (dot_b - dot + jnp.where(jnp.isfinite(lse), d_lse, 0.0))
  d_out_b = (do * t(w)).astype(out_b.dtype)
  return vjp((d_out_b, d_lse_b))
