"""attnjax: attention primitives for JAX (Pallas kernels, masks, parallelism).

The public contract is documented in docs/api.md.
"""

from attnjax import masks as masks
from attnjax.softmax.api import dot_product_attention as dot_product_attention

__version__ = "0.1.0"

__all__ = (
    "dot_product_attention",
    "masks",
)
