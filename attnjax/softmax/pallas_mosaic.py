"""``implementation="pallas_mosaic_gpu"``: FlashAttention-3 style kernels for
Hopper written with Pallas Mosaic GPU (``pallas_kernels/flash/mosaic_gpu*``).

Serves bfloat16/float16 requests with head dim 64 or 128 (H == Hv), any
T and S (padded to whole tiles here), GQA/MQA, static masks built from
``Causal``, ``LocalWindow``, ``ChunkedCausal``, ``Prefix`` and ``Full``
(combined with ``&``/``|``), segment ids, query/key lengths, sinks and a
logits soft cap, forward and backward. Anything else (bias, dense masks,
per-head or block-sparse masks, other dtypes or head dims, no sm_90 GPU)
raises ``NotImplementedError`` so dispatch falls back to the portable kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.softmax.problem import Problem
from pallas_kernels.flash import mosaic_gpu as fwd_lib
from pallas_kernels.flash import mosaic_gpu_bwd as bwd_lib

__all__ = ["mosaic_gpu_attention", "mosaic_attention", "check_supported"]

_LEAVES = (masks_lib.Causal, masks_lib.LocalWindow, masks_lib.ChunkedCausal,
           masks_lib.Prefix, masks_lib.Full)


def _on_hopper() -> bool:
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  return dev.platform == "gpu" and str(
      getattr(dev, "compute_capability", "")).startswith("9")


def _mask_supported(mask) -> bool:
  if isinstance(mask, (masks_lib.And, masks_lib.Or)):
    return _mask_supported(mask.left) and _mask_supported(mask.right)
  return isinstance(mask, _LEAVES)


def check_supported(p: Problem, *, need_backward: bool = True) -> None:
  """Raises NotImplementedError for requests the kernels cannot serve."""
  _, _, _, _, _, h, hv = p.shape
  if p.q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"pallas_mosaic_gpu: dtype {p.q.dtype} (needs "
                              "bfloat16 or float16)")
  heads = bwd_lib.SUPPORTED_HEAD_DIMS if need_backward else (
      fwd_lib.SUPPORTED_HEAD_DIMS)
  if h != hv or h not in heads:
    raise NotImplementedError(f"pallas_mosaic_gpu: head dims H={h}, Hv={hv} "
                              f"(needs H == Hv in {heads})")
  if p.bias is not None:
    raise NotImplementedError("pallas_mosaic_gpu: no bias")
  if p.mask_array is not None:
    raise NotImplementedError("pallas_mosaic_gpu: no dense mask arrays")
  if p.mask is not None:
    if p.mask.num_heads != 1:
      raise NotImplementedError("pallas_mosaic_gpu: no per-head masks")
    if not _mask_supported(p.mask):
      raise NotImplementedError(
          f"pallas_mosaic_gpu: mask {type(p.mask).__name__} (supports "
          "Causal, LocalWindow, ChunkedCausal, Prefix, Full and their & / |)")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one call (a custom_vjp nondiff argument)."""
  mask: masks_lib.Mask | None
  scale: float
  soft_cap: float | None
  t: int
  s: int
  tp: int
  sp: int
  segments: bool
  fwd: fwd_lib.FwdConfig
  bwd: bwd_lib.BwdConfig


def _lcm(*xs):
  return functools.reduce(lambda a, b: a * b // math.gcd(a, b), xs)


def _round_up(x, m):
  return -(-x // m) * m


@functools.lru_cache(maxsize=512)
def _ranges(mask, t, s, tp, sp, bq, bk, segments, transpose):
  """kv_block_ranges of the (bq, bk) tiling (transposed for dK/dV)."""
  nq, nk = tp // bq, sp // bk
  kinds = np.zeros((nq, nk), np.int8)
  vq, vk = -(-t // bq), -(-s // bk)
  if mask is None:
    kinds[:vq, :vk] = masks_lib.FULL
  else:
    kinds[:vq, :vk] = mask.block_kinds(t, s, bq, bk)[0][0]
  if s % bk:  # the last real key block holds padding: mask elementwise
    kinds[:, vk - 1] = np.minimum(kinds[:, vk - 1], masks_lib.PARTIAL)
  if segments:
    kinds = np.minimum(kinds, masks_lib.PARTIAL)
  return fwd_lib.kv_block_ranges(kinds.T if transpose else kinds)


def _predicate(plan):
  if plan.mask is None:
    return None
  mask = plan.mask
  return lambda qi, ki: mask.kernel_predicate(qi, ki)


def _pad(x, axis, size):
  if x is None or x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _forward(plan, q, k, v, qseg, kvseg, qlen, kvlen, sinks):
  cfg = plan.fwd
  qp, kp, vp = _pad(q, 1, plan.tp), _pad(k, 1, plan.sp), _pad(v, 1, plan.sp)
  qseg, kvseg = _pad(qseg, 1, plan.tp), _pad(kvseg, 1, plan.sp)
  ranges = _ranges(plan.mask, plan.t, plan.s, plan.tp, plan.sp, cfg.tile_q,
                   cfg.block_kv, plan.segments, False)
  out, lse = fwd_lib.flash_forward(
      qp, kp, vp, scale=plan.scale, ranges=ranges, predicate=_predicate(plan),
      kv_len_static=plan.s, soft_cap=plan.soft_cap, q_segment_ids=qseg,
      kv_segment_ids=kvseg, q_lengths=qlen, kv_lengths=kvlen, sinks=sinks,
      config=cfg)
  return out, lse, (qp, kp, vp, qseg, kvseg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, qseg, kvseg, qlen, kvlen, sinks):
  out, lse, _ = _forward(plan, q, k, v, qseg, kvseg, qlen, kvlen, sinks)
  return out[:, :plan.t], lse[:, :, :plan.t]


def _attention_fwd(plan, q, k, v, qseg, kvseg, qlen, kvlen, sinks):
  out, lse, (qp, kp, vp, qsegp, kvsegp) = _forward(
      plan, q, k, v, qseg, kvseg, qlen, kvlen, sinks)
  res = (qp, kp, vp, qsegp, kvsegp, qlen, kvlen, sinks, out, lse)
  return (out[:, :plan.t], lse[:, :, :plan.t]), res


def _attention_bwd(plan, res, cotangents):
  qp, kp, vp, qseg, kvseg, qlen, kvlen, sinks, out, lse = res
  d_out, d_lse = cotangents
  cfg = plan.bwd
  f32 = jnp.float32
  do = _pad(d_out, 1, plan.tp).astype(qp.dtype)
  finite = jnp.isfinite(lse)
  # D_i = rowsum(dO * O) (FA2 Algorithm 2 line 4); an lse cotangent adds
  # p * dlse to dS, i.e. subtracts dlse from D.
  delta = jnp.einsum("btnv,btnv->bnt", do.astype(f32), out.astype(f32))
  dlse = jnp.zeros_like(lse) if d_lse is None else _pad(d_lse.astype(f32), 2,
                                                         plan.tp)
  dlse = jnp.where(finite, dlse, 0.0)
  delta_k = delta - dlse
  lse2 = jnp.where(finite, lse * fwd_lib.LOG2E, jnp.inf)
  pred = _predicate(plan)
  common = dict(scale=plan.scale, predicate=pred, kv_len_static=plan.s,
                soft_cap=plan.soft_cap, q_segment_ids=qseg,
                kv_segment_ids=kvseg, kv_lengths=kvlen, config=cfg)
  dkv_ranges = _ranges(plan.mask, plan.t, plan.s, plan.tp, plan.sp,
                       cfg.block_q_dkv, cfg.tile_kv, plan.segments, True)
  if cfg.fused_dq:
    dk, dv, dq = bwd_lib.flash_backward_dkv(
        qp, kp, vp, do, lse2, delta_k, ranges=dkv_ranges, **common)
  else:
    dk, dv = bwd_lib.flash_backward_dkv(qp, kp, vp, do, lse2, delta_k,
                                        ranges=dkv_ranges, **common)
    dq_ranges = _ranges(plan.mask, plan.t, plan.s, plan.tp, plan.sp,
                        cfg.tile_q, cfg.block_kv_dq, plan.segments, False)
    dq = bwd_lib.flash_backward_dq(qp, kp, vp, do, lse2, delta_k,
                                   ranges=dq_ranges, **common)
  dsinks = None
  if sinks is not None:
    # d lse / d sink = exp(sink - lse); d out / d sink = -exp(sink - lse) out.
    w = jnp.where(finite, jnp.exp(sinks.astype(f32)[None, :, None]
                                  - jnp.where(finite, lse, 0.0)), 0.0)
    dsinks = jnp.sum((w * (dlse - delta))[:, :, :plan.t],
                     axis=(0, 2)).astype(sinks.dtype)
  return (dq[:, :plan.t], dk[:, :plan.s], dv[:, :plan.s], None, None, None,
          None, dsinks)


_attention.defvjp(_attention_fwd, _attention_bwd)


_DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops",
                      "--xla_gpu_exclude_nondeterministic_ops")


def deterministic_ops() -> bool:
  """Whether ``XLA_FLAGS`` asks XLA for deterministic GPU ops.

  ``--xla_gpu_deterministic_ops`` or ``--xla_gpu_exclude_nondeterministic_ops``
  (bare, ``=true`` or ``=1``; the last mention of each wins), read when a
  plan is made. Then the backward keeps its bitwise-repeatable two-kernel
  form at every head dim; otherwise H = 64 and 128 take the fused
  backward, whose dQ sums land in a varying order, at the shapes where it
  was measured faster (``default_bwd_config``). Set the flag before the first
  call: jit caches the plan with the traced function.
  """
  on = dict.fromkeys(_DETERMINISM_FLAGS, False)
  for tok in os.environ.get("XLA_FLAGS", "").split():
    name, eq, val = tok.partition("=")
    if name in on:
      on[name] = not eq or val.lower() in ("true", "1")
  return any(on.values())


def make_plan(p: Problem, *, fwd_config: fwd_lib.FwdConfig | None = None,
              bwd_config: bwd_lib.BwdConfig | None = None) -> _Plan:
  """The static plan of a (supported) problem; tiles default per head dim,
  the backward's also on :func:`deterministic_ops` and the shape."""
  _, t, s, n, kh, h, _ = p.shape
  causal = p.mask is not None
  fwd = fwd_config or fwd_lib.default_fwd_config(
      h, causal, q_len=t, kv_len=s,
      soft_cap=p.logits_soft_cap is not None,
      long_rows=isinstance(p.mask, masks_lib.Causal))
  bwd = bwd_config or bwd_lib.default_bwd_config(
      h, deterministic=deterministic_ops(), q_len=t, groups=n // kh,
      masked=causal)
  tp = _round_up(t, _lcm(fwd.tile_q, bwd.block_q_dkv, bwd.tile_q))
  sp = _round_up(s, _lcm(fwd.block_kv, bwd.tile_kv, bwd.block_kv_dq))
  return _Plan(mask=p.mask, scale=float(p.scale), soft_cap=p.logits_soft_cap,
               t=t, s=s, tp=tp, sp=sp, segments=p.q_segment_ids is not None,
               fwd=fwd, bwd=bwd)


def mosaic_attention(p: Problem, *, fwd_config=None, bwd_config=None,
                     need_backward: bool = True):
  """The kernels without the device check (for lowering tests and tuning).

  Returns:
    ``(out [B, T, N, Hv], lse float32 [B, N, T])``.
  """
  check_supported(p, need_backward=need_backward)
  plan = make_plan(p, fwd_config=fwd_config, bwd_config=bwd_config)
  sinks = None if p.sinks is None else p.sinks.astype(jnp.float32)
  if not need_backward:
    out, lse, _ = _forward(plan, p.q, p.k, p.v, p.q_segment_ids,
                           p.kv_segment_ids, p.q_lengths, p.kv_lengths, sinks)
    return out[:, :plan.t], lse[:, :, :plan.t]
  out, lse = _attention(plan, p.q, p.k, p.v, p.q_segment_ids,
                        p.kv_segment_ids, p.q_lengths, p.kv_lengths, sinks)
  return out, lse


def mosaic_gpu_attention(p: Problem):
  """Returns (out, lse); raises NotImplementedError off sm_90 or when the
  request has features the kernels do not support.

  >>> import jax, jax.numpy as jnp, attnjax
  >>> q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  >>> # on an H100: attnjax.dot_product_attention(q, q, q,
  >>> #     implementation="pallas_mosaic_gpu")
  """
  if not _on_hopper():
    raise NotImplementedError("pallas_mosaic_gpu needs an sm_90 (Hopper) GPU")
  return mosaic_attention(p)
