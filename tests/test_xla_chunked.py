"""xla_chunked against the reference: the shared suite at several tilings."""

from attnjax.softmax import xla_chunked
from softmax_suite import SoftmaxSuite


class TestXlaChunkedSmallBlocks(SoftmaxSuite):
  """Many blocks per sequence: exercises skipping and ragged last blocks."""

  @staticmethod
  def impl(problem):
    return xla_chunked.xla_chunked_attention(problem, block_q=8, block_kv=16)


class TestXlaChunkedDefaultBlocks(SoftmaxSuite):
  """Default tiling (one block at these lengths)."""

  @staticmethod
  def impl(problem):
    return xla_chunked.xla_chunked_attention(problem)
