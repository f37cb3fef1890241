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


def default_block_sizes(p: Problem) -> BlockSizes:
  """Heuristic tiles for an H100 (Hopper) / A100 class GPU.

  Forward: 128 query rows (positions x packed GQA heads) against 64 keys
  (32 at head dim 256, where K+V tiles would overflow shared memory), 4 warps
  for head dims <= 64 and 8 above. Backward: the dQ kernel mirrors the
  forward; the dK/dV kernel holds a 128-key (64 at head dim 256) block of K
  and V and their two float32 accumulators, walking 64-row query tiles
  (32 at head dim 256). Small problems shrink the tiles (``tile_shape``).
  """
  _, _, _, _, _, h, hv = p.shape
  width = max(common.next_pow2(h), common.next_pow2(hv))
  f32 = np.dtype(p.q.dtype) == np.float32
  if width <= 64:
    return BlockSizes(block_q=128, block_kv=64, num_warps=4, num_stages=3,
                      block_q_dq=128, block_kv_dq=64, num_warps_dq=4,
                      num_stages_dq=2, block_q_dkv=64, block_kv_dkv=128,
                      num_warps_dkv=4, num_stages_dkv=2)
  if width <= 128 and not f32:
    return BlockSizes(block_q=128, block_kv=64, num_warps=8, num_stages=3,
                      block_q_dq=128, block_kv_dq=64, num_warps_dq=8,
                      num_stages_dq=2, block_q_dkv=64, block_kv_dkv=128,
                      num_warps_dkv=8, num_stages_dkv=2)
  # Head dim 256 (or float32 at 128: twice the bytes per element).
  return BlockSizes(block_q=64, block_kv=32, num_warps=8, num_stages=2,
                    block_q_dq=64, block_kv_dq=32, num_warps_dq=8,
                    num_stages_dq=2, block_q_dkv=32, block_kv_dkv=64,
                    num_warps_dkv=8, num_stages_dkv=2)


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
