"""``implementation="pallas_triton"``: the portable Pallas flash kernel.

Wraps ``pallas_kernels.flash.triton.flash_attention`` (Triton on NVIDIA GPUs,
the Pallas interpreter on CPU) and chooses its tiles and launch parameters
from the shapes and dtype. See ``docs/pallas_triton.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.softmax.problem import Problem
from pallas_kernels.flash import common
from pallas_kernels.flash import triton as flash_triton

__all__ = ["triton_attention", "default_block_sizes", "BlockSizes"]

BlockSizes = flash_triton.BlockSizes


# (block_q, block_kv, num_warps, num_stages) of the forward, dQ and dK/dV
# kernels, by padded head dim, for 16-bit inputs on Hopper. Every entry
# compiles (sm_90a) to wgmma for all dots and fits the 227 KiB of shared
# memory; at 256 the fastest tiles on an H100 spill a little (the forward's
# float32 [128, 256] accumulator; dK/dV's two [64, 256] ones) and still beat
# the spill-free ones by 1.5-2x. See docs/pallas_triton.md; tune with
# scripts/gpu/triton_sweep.py.
_TILES_16BIT = {
    64: ((128, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2)),
    128: ((128, 64, 8, 3), (128, 64, 8, 3), (32, 128, 8, 3)),
    256: ((128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2)),
}
# float32 (full-precision FMA dots, no tensor cores): small tiles, 8 warps,
# so that nothing spills (checked at head dims 64, 128 and 256).
_TILES_F32 = {
    64: ((64, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
    256: ((32, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)),
}


def default_block_sizes(p: Problem) -> BlockSizes:
  """Heuristic tiles for a Hopper-class GPU, from head dim and dtype.

  Forward: 128 query rows (positions x packed GQA heads) against 64 keys.
  dQ mirrors the forward up to head dim 128 (64 x 64, 4 warps at 256).
  dK/dV holds a block of 128 keys (64 at head dim 256, where its float32 dK
  and dV accumulators grow) and walks 32-64 query rows per step; the key
  block stays >= 64 because it is the M dimension of all four dK/dV
  matmuls, and Triton only emits Hopper wgmma for M >= 64. Measured on an
  H100 with ``scripts/gpu/triton_sweep.py`` (docs/pallas_triton.md). Small
  problems shrink the tiles (``pallas_kernels.flash.common.tile_shape``).
  """
  _, _, _, _, _, h, hv = p.shape
  width = max(16, common.next_pow2(h), common.next_pow2(hv))
  if np.dtype(p.q.dtype) == np.float32:
    fwd, dq, dkdv = _TILES_F32[64 if width <= 64 else 256]
  else:
    fwd, dq, dkdv = _TILES_16BIT[max(64, width)]
  return BlockSizes(
      block_q=fwd[0], block_kv=fwd[1], num_warps=fwd[2], num_stages=fwd[3],
      block_q_dq=dq[0], block_kv_dq=dq[1], num_warps_dq=dq[2],
      num_stages_dq=dq[3], block_q_dkv=dkdv[0], block_kv_dkv=dkdv[1],
      num_warps_dkv=dkdv[2], num_stages_dkv=dkdv[3])


def triton_attention(p: Problem, *, block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None):
  """Flash attention through Pallas Triton. Returns ``(out, lse)``.

  Args:
    p: the validated problem.
    block_sizes: override the heuristic tiles (tests use small ones).
    interpret: force the Pallas interpreter; default: on CPU.

  Raises:
    NotImplementedError: dtype other than float32/bfloat16/float16, head
      dims above 256, or a mask the tiles cannot follow (a BlockSparse layout
      not aligned to the kernel tiles).

  Example (interpret mode on CPU):

  >>> import jax.numpy as jnp
  >>> from attnjax.softmax.problem import make_problem
  >>> q = jnp.ones((1, 20, 2, 16))
  >>> out, lse = triton_attention(make_problem(q, q, q, is_causal=True)[0])
  >>> out.shape, lse.shape
  ((1, 20, 2, 16), (1, 2, 20))
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if p.q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"pallas_triton: dtype {p.q.dtype}")
  _, _, _, _, _, h, hv = p.shape
  if max(h, hv) > flash_triton.MAX_HEAD_DIM:
    raise NotImplementedError(
        f"pallas_triton: head dims {h}, {hv} exceed "
        f"{flash_triton.MAX_HEAD_DIM}")
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("pallas_triton needs a GPU (or interpret)")
  bs = block_sizes or default_block_sizes(p)
  return flash_triton.flash_attention(
      p.q, p.k, p.v, bias=p.bias, mask_array=p.mask_array,
      q_segment_ids=p.q_segment_ids, kv_segment_ids=p.kv_segment_ids,
      q_lengths=p.q_lengths, kv_lengths=p.kv_lengths, sinks=p.sinks,
      scale=p.scale, logits_soft_cap=p.logits_soft_cap, mask=p.mask,
      block_sizes=bs, interpret=interpret)
