"""Ring attention (Liu, Zaharia & Abbeel, https://arxiv.org/abs/2310.01889),
load balanced with a zigzag layout (as ring-flash-attention's zigzag ring).

Called inside ``jax.shard_map`` on the local shards of a sequence sharded
over ``axis_name``. Each device keeps its queries; key/value blocks travel
around the ring with ``lax.ppermute``, one hop per step. At step s, device d
holds the keys of device (d - s) mod n (4 devices)::

            step 0   step 1   step 2   step 3
    dev 0   K0       K3       K2       K1
    dev 1   K1       K0       K3       K2
    dev 2   K2       K1       K0       K3
    dev 3   K3       K2       K1       K0

Each step's transfer (the keys of step s+1) is issued before the step's
block computation and does not depend on it, so XLA overlaps the two.
The block computation is any attnjax backend through
``dot_product_attention(..., return_residuals=True)``: per-step partial
results merge through their log-sum-exp.

Masks are exact: every (query chunk, key chunk) pair of a step becomes a
static band mask (``Causal(offset)``, ``LocalWindow``, ...) in the kernel's
local coordinates, and devices whose pair differs take different
``lax.switch`` branches. Pairs with no visible keys are not computed, and a
step that no device needs is skipped with its transfer (windows).

Backward (``jax.custom_vjp``): the same ring again; dQ stays local while the
dK/dV accumulators travel with their key/value block, and each block's
gradients come from the saved *global* output and log-sum-exp (no forward
recomputation where the backend registers a residual backward). Sinks enter
once, in the final normaliser, not per step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.parallel import _block
from attnjax.parallel._common import (LocalProblem, axis_size, filled,
                                      hashable_impl, shift, vary, vary_all,
                                      vma)
from attnjax.parallel._plan import Layout, Step, ring_schedule

__all__ = ["ring_attention"]

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  axis_name: object
  n: int
  steps: tuple[Step, ...]
  scale: float
  soft_cap: float | None
  implementation: object


def _per_device(cfg, step: Step, fn, *operands):
  """Runs ``fn(calls, *operands)`` with this device's calls for ``step``."""
  if len(step.branches) == 1:
    return fn(step.branches[0], *operands)
  # Every operand varies over the axis *before* the switch: an invariant one
  # would be cast inside a branch, and its transpose (a psum) would then run
  # on only the devices taking that branch.
  operands = vary_all(operands, cfg.axis_name)
  idx = jnp.asarray(step.table, jnp.int32)[lax.axis_index(cfg.axis_name)]
  return lax.switch(idx, [functools.partial(fn, b) for b in step.branches],
                    *operands)


def _rows(x, c, axis=1):
  return None if x is None else lax.slice_in_dim(x, c.q0, c.q1, axis=axis)


def _cols(x, c):
  return None if x is None else lax.slice_in_dim(x, c.k0, c.k1, axis=1)


def _fwd_calls(cfg, calls, q, q_seg, kv, o, lse):
  k, v, kv_seg = kv
  t = q.shape[1]
  for c in calls:
    ob, lb = _block.block_forward(
        _rows(q, c), _cols(k, c), _cols(v, c), _rows(q_seg, c),
        _cols(kv_seg, c), mask=c.mask, scale=cfg.scale,
        soft_cap=cfg.soft_cap, implementation=cfg.implementation)
    if c.q0 == 0 and c.q1 == t:
      o, lse = _block.merge(o, lse, ob, lb)
    else:
      om, lm = _block.merge(_rows(o, c), _rows(lse, c, 2), ob, lb)
      o = lax.dynamic_update_slice_in_dim(o, om, c.q0, 1)
      lse = lax.dynamic_update_slice_in_dim(lse, lm, c.q0, 2)
  return o, lse


def _forward(cfg, q, k, v, q_seg, kv_seg, sinks):
  b, t, nh, _ = q.shape
  axes = vma(q, k, v, q_seg, kv_seg)
  o = vary(filled(q, (b, t, nh, v.shape[-1]), 0.0, F32), axes)
  lse = vary(filled(q, (b, nh, t), -jnp.inf, F32), axes)
  steps = cfg.steps
  cur = (k, v, kv_seg)
  if steps:
    cur = shift(cur, cfg.axis_name, cfg.n, steps[0].s)
  for i, st in enumerate(steps):
    # Issue the next transfer first: it depends only on `cur`, so XLA can
    # run it while this step's block is computed.
    nxt = (shift(cur, cfg.axis_name, cfg.n, steps[i + 1].s - st.s)
           if i + 1 < len(steps) else None)
    o, lse = _per_device(cfg, st, functools.partial(_fwd_calls, cfg), q,
                         q_seg, cur, o, lse)
    cur = nxt
  if sinks is not None:
    # The sink joins the normaliser once: out = o * exp(lse - lse_total).
    sink = jnp.broadcast_to(sinks.astype(F32)[None, :, None], lse.shape)
    total = jnp.logaddexp(lse, sink)
    w = _block.rows_vjp_weights(lse, total)
    o = o * jnp.swapaxes(w, 1, 2)[..., None]
    lse = total
  return o.astype(q.dtype), lse


def _bwd_calls(cfg, calls, q, q_seg, out, lse, d_out, d_lse, kv, dq):
  k, v, kv_seg = kv
  dk = jnp.zeros_like(k, F32)
  dv = jnp.zeros_like(v, F32)
  for c in calls:
    gq, gk, gv = _block.block_backward(
        _rows(q, c), _cols(k, c), _cols(v, c), _rows(q_seg, c),
        _cols(kv_seg, c), _rows(out, c), _rows(lse, c, 2), _rows(d_out, c),
        _rows(d_lse, c, 2), mask=c.mask, scale=cfg.scale,
        soft_cap=cfg.soft_cap, implementation=cfg.implementation)
    dq = lax.dynamic_update_slice_in_dim(dq, _rows(dq, c) + gq, c.q0, 1)
    dk = lax.dynamic_update_slice_in_dim(dk, _cols(dk, c) + gk, c.k0, 1)
    dv = lax.dynamic_update_slice_in_dim(dv, _cols(dv, c) + gv, c.k0, 1)
  return dq, dk, dv


def _backward(cfg, res, cotangents):
  q, k, v, q_seg, kv_seg, sinks, out, lse = res
  d_out, d_lse = cotangents
  d_lse = jnp.where(jnp.isfinite(lse), d_lse.astype(F32), 0.0)
  axes = vma(q, k, v, q_seg, kv_seg)
  dq = vary(jnp.zeros_like(q, F32), axes)
  acc = (vary(jnp.zeros_like(k, F32), axes),
         vary(jnp.zeros_like(v, F32), axes))
  steps = cfg.steps
  cur = (k, v, kv_seg)
  if steps:
    cur = shift(cur, cfg.axis_name, cfg.n, steps[0].s)
  for i, st in enumerate(steps):
    nxt = (shift(cur, cfg.axis_name, cfg.n, steps[i + 1].s - st.s)
           if i + 1 < len(steps) else None)
    dq, dk_b, dv_b = _per_device(cfg, st, functools.partial(_bwd_calls, cfg),
                                 q, q_seg, out, lse, d_out, d_lse, cur, dq)
    # The accumulators travel with their key/value block: the block's own
    # gradients are computed without them, so their transfer overlaps the
    # next step's compute.
    acc = (acc[0] + dk_b, acc[1] + dv_b)
    if i + 1 < len(steps):
      acc = shift(acc, cfg.axis_name, cfg.n, steps[i + 1].s - st.s)
    cur = nxt
  # Home: the accumulators of step s belong to device d - s. They are
  # rounded to the output dtype first, as they would be there anyway: the
  # one transfer not hidden behind compute moves half the bytes (bf16).
  acc = (acc[0].astype(k.dtype), acc[1].astype(v.dtype))
  if steps:
    acc = shift(acc, cfg.axis_name, cfg.n, -steps[-1].s)
  dsinks = None
  if sinks is not None:
    # d lse / d sink = exp(sink - lse); d out / d sink = -that * out.
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w = jnp.where(jnp.isfinite(lse),
                  jnp.exp(sinks.astype(F32)[None, :, None] - lse_safe), 0.0)
    delta = jnp.einsum("btnv,btnv->bnt", d_out.astype(F32), out.astype(F32))
    dsinks = jnp.sum(w * (d_lse - delta), axis=(0, 2)).astype(sinks.dtype)
  return dq.astype(q.dtype), acc[0], acc[1], None, None, dsinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_seg, kv_seg, sinks):
  return _forward(cfg, q, k, v, q_seg, kv_seg, sinks)


def _ring_fwd(cfg, q, k, v, q_seg, kv_seg, sinks):
  out, lse = _forward(cfg, q, k, v, q_seg, kv_seg, sinks)
  return (out, lse), (q, k, v, q_seg, kv_seg, sinks, out, lse)


_ring.defvjp(_ring_fwd, _backward)


def ring_attention(
    query,
    key,
    value,
    *,
    axis_name,
    is_causal: bool = False,
    segment_ids=None,
    local_window_size=None,
    sinks=None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    implementation=None,
    layout: Literal["contiguous", "zigzag"] = "contiguous",
    return_residuals: bool = False,
):
  """Ring attention over local shards, inside ``jax.shard_map``.

  The result on each device equals rows of
  ``attnjax.dot_product_attention`` on the whole (unsharded) sequence.

  Args:
    query: local [B, T/n, N, H] (or unbatched [T/n, N, H]).
    key, value: local [B, S/n, K, H] / [B, S/n, K, Hv].
    axis_name: the mesh axis the sequence is sharded over.
    is_causal: key j visible to query i iff j <= i (global positions).
    segment_ids: local int ids [B, T/n], or (q_ids, kv_ids).
    local_window_size: (left, right) or int, in global positions.
    sinks: float [N] sink logits (replicated).
    logits_soft_cap: c > 0: logits -> c * tanh(logits / c).
    scale: logit scale (default 1/sqrt(H)).
    implementation: the per-block attnjax backend (None: the fastest that
      returns residuals on this platform).
    layout: "contiguous": device d holds positions [d L/n, (d+1) L/n);
      "zigzag": device d holds chunks d and 2n-1-d of 2n (see
      ``attnjax.parallel.to_zigzag``), which balances causal work.
    return_residuals: also return the global log-sum-exp [B, N, T/n].

  Returns:
    Local output [B, T/n, N, Hv] (and lse).

  Example:

  >>> import jax, jax.numpy as jnp, attnjax.parallel as ap
  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("seq",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
  >>> f = jax.jit(jax.shard_map(
  ...     lambda q, k, v: ap.ring_attention(q, k, v, axis_name="seq",
  ...                                       is_causal=True),
  ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")))
  >>> f(q, q, q).shape
  (1, 64, 2, 16)
  """
  lp = LocalProblem(query, key, value, is_causal=is_causal,
                    segment_ids=segment_ids,
                    local_window_size=local_window_size, sinks=sinks,
                    logits_soft_cap=logits_soft_cap, scale=scale)
  if layout not in ("contiguous", "zigzag"):
    raise ValueError(f"layout must be 'contiguous' or 'zigzag', got "
                     f"{layout!r}")
  if not isinstance(return_residuals, bool):
    raise ValueError(f"return_residuals must be a bool, got "
                     f"{return_residuals!r}")
  n = axis_size(axis_name)
  zig = layout == "zigzag"
  for name, x in (("query", lp.q), ("key", lp.k)):
    if zig and x.shape[1] % 2:
      raise ValueError(f"{name}: a zigzag shard holds two equal chunks, so "
                       f"its local length must be even, got {x.shape[1]}")
  qlay = Layout(n, n * lp.q.shape[1], zig)
  klay = Layout(n, n * lp.k.shape[1], zig)
  cfg = _Config(axis_name=axis_name, n=n,
                steps=ring_schedule(qlay, klay, lp.band), scale=lp.scale,
                soft_cap=lp.soft_cap,
                implementation=hashable_impl(implementation))
  sinks = lp.sinks
  if sinks is not None:
    # Varying like the shards, so its cotangent is summed over the ring.
    sinks = vary(sinks, vma(lp.q))
  out, lse = _ring(cfg, lp.q, lp.k, lp.v, lp.q_seg, lp.kv_seg, sinks)
  out = lp.finish(out)
  if return_residuals:
    return out, lp.finish(lse)
  return out
