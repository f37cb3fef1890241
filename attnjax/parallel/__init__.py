"""Sequence parallelism with ``jax.shard_map`` (contract: API.md section 5).

Global arrays: ``sequence_parallel_attention(q, k, v, mesh=..., strategy=
"ring" | "ulysses" | "all_gather" | "auto")``. Inside a user's shard_map on
local shards: ``ring_attention``, ``ulysses_attention``,
``all_gather_attention``; ``to_zigzag``/``from_zigzag`` permute local shards
into the load-balanced layout. Linear attention (LASP-2):
``sequence_parallel_linear_attention`` and
``sequence_parallel_delta_rule_attention``. Guide: docs/parallel.md.
"""

import importlib as _importlib

from attnjax.parallel._common import from_zigzag as from_zigzag
from attnjax.parallel._common import to_zigzag as to_zigzag
from attnjax.parallel.all_gather import (
    all_gather_attention as all_gather_attention)
from attnjax.parallel.api import choose_strategy as choose_strategy
from attnjax.parallel.api import (
    sequence_parallel_attention as sequence_parallel_attention)
from attnjax.parallel.ring import ring_attention as ring_attention
from attnjax.parallel.ulysses import ulysses_attention as ulysses_attention

# Written separately (attnjax/parallel/lasp2.py); imported on first use so
# this package works before and without it.
_LAZY = {
    "sequence_parallel_delta_rule_attention": "attnjax.parallel.lasp2",
    "sequence_parallel_linear_attention": "attnjax.parallel.lasp2",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(_importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'attnjax.parallel' has no attribute "
                       f"{name!r}")


__all__ = (
    "all_gather_attention",
    "choose_strategy",
    "from_zigzag",
    "ring_attention",
    "sequence_parallel_attention",
    "sequence_parallel_delta_rule_attention",
    "sequence_parallel_linear_attention",
    "to_zigzag",
    "ulysses_attention",
)
