"""The "xla" backend is the reference itself: run the suite for its plumbing
(make_problem + dense masks) and compare it with jax.nn directly."""

from attnjax.softmax import xla
from softmax_suite import SoftmaxSuite


class TestXla(SoftmaxSuite):

  @staticmethod
  def impl(problem):
    return xla.xla_attention(problem)
