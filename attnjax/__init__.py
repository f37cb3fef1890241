"""attnjax: attention primitives for JAX.

Softmax attention with Pallas flash kernels and composable masks, the linear
attention family with chunked-scan kernels, decoding, sequence parallelism
with ``shard_map``, and Flax NNX modules. The public contract: docs/api.md.
"""

import importlib as _importlib

from attnjax import masks as masks
from attnjax.softmax.api import dot_product_attention as dot_product_attention

__version__ = "0.1.0"

# Names served from submodules on first use (keeps `import attnjax` light).
_LAZY = {
    "linear_attention": "attnjax.linear",
    "delta_rule_attention": "attnjax.linear",
    "linear_attention_step": "attnjax.linear",
    "delta_rule_step": "attnjax.linear",
    "decode_attention": "attnjax.decode",
}
_SUBMODULES = ("bench", "decode", "linear", "models", "nn", "parallel",
               "softmax", "testing")


def __getattr__(name):
  if name in _LAZY:
    return getattr(_importlib.import_module(_LAZY[name]), name)
  if name in _SUBMODULES:
    return _importlib.import_module(f"attnjax.{name}")
  raise AttributeError(f"module 'attnjax' has no attribute {name!r}")


__all__ = (
    "decode_attention",
    "delta_rule_attention",
    "delta_rule_step",
    "dot_product_attention",
    "linear_attention",
    "linear_attention_step",
    "masks",
)
