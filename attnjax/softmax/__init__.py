"""Softmax attention: API, validation and the XLA backends."""

from attnjax.softmax.api import dot_product_attention as dot_product_attention
from attnjax.softmax.problem import Problem as Problem
from attnjax.softmax.problem import make_problem as make_problem
