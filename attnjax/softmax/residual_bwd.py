"""Residual backward passes of the Pallas backends (BACKWARD_IMPLEMENTATIONS).

Each function runs a backend's existing backward kernels from residuals the
caller supplies, ``fn(problem, out, lse, d_out, d_lse=None) -> (dq, dk,
dv)``, with lse the natural-log normaliser [B, N, T]. Ring attention calls
them with the *global* output and lse of the whole sequence on each
visiting key/value block, so the block's forward is never recomputed.

These adapters use the kernels' internal entry points (the same ones their
``custom_vjp`` rules call); tests/test_parallel_block.py checks the Triton
one in interpret mode and tests/test_parallel_gpu.py both on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.softmax.problem import Problem

__all__ = ["pallas_mosaic_gpu_bwd", "pallas_triton_bwd"]


def _check_no_bias(p: Problem, name: str):
  # Sinks enter through lse; their own gradient is the caller's business.
  if p.bias is not None:
    raise NotImplementedError(f"{name} residual backward: no bias gradient")


def pallas_triton_bwd(p: Problem, out, lse, d_out, d_lse=None):
  """``pallas_triton``'s backward kernels (dQ, dK/dV) from given residuals."""
  from attnjax.softmax import pallas as backend  # noqa: PLC0415
  from pallas_kernels.flash import common  # noqa: PLC0415
  from pallas_kernels.flash import triton as flash_triton  # noqa: PLC0415
  from pallas_kernels.flash import triton_bwd  # noqa: PLC0415

  _check_no_bias(p, "pallas_triton")
  interpret = jax.default_backend() == "cpu"
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("pallas_triton needs a GPU (or interpret)")
  if p.q.dtype not in flash_triton.supported_dtypes:
    raise NotImplementedError(f"pallas_triton: dtype {p.q.dtype}")
  b, t, s, n, kh, h, hv = p.shape
  if max(h, hv) > flash_triton.MAX_HEAD_DIM:
    raise NotImplementedError(f"pallas_triton: head dims {h}, {hv}")
  if p.mask is not None and p.mask.num_heads not in (1, n):
    raise ValueError(f"mask distinguishes {p.mask.num_heads} heads, not {n}")
  sp = common.Spec(
      batch=b, q_len=t, kv_len=s, num_heads=n, num_kv_heads=kh, head_dim=h,
      value_head_dim=hv, dtype=np.dtype(p.q.dtype).name, scale=float(p.scale),
      soft_cap=p.logits_soft_cap,
      bias_shape=None,
      mask_array_shape=None if p.mask_array is None else tuple(
          p.mask_array.shape),
      segment_ids=p.q_segment_ids is not None,
      q_lengths=p.q_lengths is not None, kv_lengths=p.kv_lengths is not None,
      sinks=False, mask=p.mask, interpret=interpret)
  bs = backend.default_block_sizes(p)
  # The kernels keep lse in base 2, [B, T, N].
  lse2 = jnp.transpose(lse, (0, 2, 1)) * common.LOG2E
  dl = None if d_lse is None else jnp.transpose(
      jnp.where(jnp.isfinite(lse), d_lse, 0.0), (0, 2, 1)).astype(jnp.float32)
  dq, dk, dv, _, _ = triton_bwd.backward(
      sp, bs, p.q, p.k, p.v, None, p.mask_array, p.q_segment_ids,
      p.kv_segment_ids, p.q_lengths, p.kv_lengths, None,
      out.astype(p.q.dtype), lse2, d_out.astype(p.q.dtype), dl)
  return dq, dk, dv


def pallas_mosaic_gpu_bwd(p: Problem, out, lse, d_out, d_lse=None):
  """``pallas_mosaic_gpu``'s backward kernels from given residuals."""
  from attnjax.softmax import pallas_mosaic as backend  # noqa: PLC0415

  _check_no_bias(p, "pallas_mosaic_gpu")
  if not backend._on_hopper():  # noqa: SLF001
    raise NotImplementedError("pallas_mosaic_gpu needs an sm_90 GPU")
  return mosaic_bwd_any_device(p, out, lse, d_out, d_lse)


def mosaic_bwd_any_device(p: Problem, out, lse, d_out, d_lse=None):
  """As ``pallas_mosaic_gpu_bwd`` without the device check (lowering tests)."""
  from attnjax.softmax import pallas_mosaic as backend  # noqa: PLC0415

  backend.check_supported(p, need_backward=True)
  plan = backend.make_plan(p)
  pad = backend._pad  # noqa: SLF001
  qp, kp, vp = pad(p.q, 1, plan.tp), pad(p.k, 1, plan.sp), pad(p.v, 1,
                                                                plan.sp)
  qseg, kvseg = pad(p.q_segment_ids, 1, plan.tp), pad(p.kv_segment_ids, 1,
                                                      plan.sp)
  outp = pad(out.astype(p.q.dtype), 1, plan.tp)
  # Padded rows: lse -inf (nothing visible), so they contribute nothing.
  lsep = lse if lse.shape[2] == plan.tp else jnp.pad(
      lse, ((0, 0), (0, 0), (0, plan.tp - lse.shape[2])),
      constant_values=-jnp.inf)
  res = (qp, kp, vp, qseg, kvseg, p.q_lengths, p.kv_lengths, None, outp,
         lsep)
  grads = backend._attention_bwd(  # noqa: SLF001
      plan, res, (d_out.astype(p.q.dtype),
                  None if d_lse is None else d_lse.astype(jnp.float32)))
  return grads[0], grads[1], grads[2]
