"""The portable Pallas (Triton) flash kernel against the reference.

CPU: the kernel runs in the Pallas interpreter at small tiles (16 x 16), so
every case has several query and key blocks: ragged last blocks, EMPTY-tile
skipping, FULL/PARTIAL tiles and GQA head packing are all exercised.
"""

from attnjax.softmax import pallas as pallas_backend
from softmax_suite import SoftmaxSuite

SMALL = pallas_backend.BlockSizes(
    block_q=16, block_kv=16, num_warps=4, num_stages=2, block_q_dq=16,
    block_kv_dq=16, block_q_dkv=16, block_kv_dkv=16)


class TestPallasTritonInterpret(SoftmaxSuite):
  """The shared suite at 16 x 16 tiles in interpret mode."""

  @staticmethod
  def impl(problem):
    return pallas_backend.triton_attention(problem, block_sizes=SMALL,
                                           interpret=True)
