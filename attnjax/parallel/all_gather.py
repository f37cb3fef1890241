"""All-gather sequence parallelism: gather K/V, keep the local queries.

Inside ``jax.shard_map``: one ``all_gather`` gives every device the whole
key/value sequence, and the local query rows attend to it with one kernel
call per query chunk (a static band mask at that chunk's global offset, so
causal tiles past the diagonal are skipped). The backward pass is the
transpose: a reduce-scatter of dK/dV. It moves the same bytes as a full
ring but at once and without overlap, holds the whole K/V on every device
(memory O(S K H)), and runs the fewest, largest kernel calls: cheapest when
K (the kv head count) is small (GQA/MQA), as in Llama-3's context parallelism.

Which keys each device sees (n=4, causal, contiguous | zigzag)::

    contiguous: dev d queries chunk d     -> keys [0, (d+1) T/4)
    zigzag:     dev d queries chunks d, 7-d -> keys [0, (d+1) T/8) and
                                               [0, (8-d) T/8): equal work
"""

from __future__ import annotations

import functools
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.parallel._common import (LocalProblem, axis_size, filled,
                                      reorder_chunks, vary, vary_all, vma,
                                      zigzag_order)
from attnjax.parallel._plan import Layout, all_gather_calls
from attnjax.softmax import api as softmax_api

__all__ = ["all_gather_attention"]


def _run(calls, q, q_seg, k, v, kv_seg, sinks, *, lp, implementation):
  b, t, nh, _ = q.shape
  axes = vma(q, k, v, q_seg, kv_seg)
  out = vary(filled(q, (b, t, nh, v.shape[-1]), 0, q.dtype), axes)
  for c in calls:
    # Calls of one device cover disjoint rows, each against all its keys.
    seg = None
    if q_seg is not None:
      seg = (q_seg[:, c.q0:c.q1], kv_seg[:, c.k0:c.k1])
    ob = softmax_api.dot_product_attention(
        q[:, c.q0:c.q1], k[:, c.k0:c.k1], v[:, c.k0:c.k1], mask=c.mask,
        segment_ids=seg, sinks=sinks, logits_soft_cap=lp.soft_cap,
        scale=lp.scale, implementation=implementation)
    out = lax.dynamic_update_slice_in_dim(out, ob, c.q0, 1)
  return out


def all_gather_attention(
    query,
    key,
    value,
    *,
    axis_name,
    is_causal: bool = False,
    segment_ids=None,
    local_window_size=None,
    sinks=None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    implementation=None,
    layout: Literal["contiguous", "zigzag"] = "contiguous",
    kv_layout: Literal["contiguous", "zigzag"] | None = None,
):
  """All-gather attention over local sequence shards, inside shard_map.

  Args: as ``attnjax.parallel.ring_attention``; ``kv_layout`` (default:
  ``layout``) is the keys' layout, which may differ from the queries' since
  the keys are gathered whole anyway.

  Returns:
    Local output [B, T/n, N, Hv].

  Example:

  >>> import jax, attnjax.parallel as ap
  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("seq",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
  >>> f = jax.jit(jax.shard_map(
  ...     lambda q, k, v: ap.all_gather_attention(q, k, v, axis_name="seq",
  ...                                             is_causal=True),
  ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")))
  >>> f(q, q, q).shape
  (1, 64, 2, 16)
  """
  lp = LocalProblem(query, key, value, is_causal=is_causal,
                    segment_ids=segment_ids,
                    local_window_size=local_window_size, sinks=sinks,
                    logits_soft_cap=logits_soft_cap, scale=scale)
  kv_layout = layout if kv_layout is None else kv_layout
  for name, lay in (("layout", layout), ("kv_layout", kv_layout)):
    if lay not in ("contiguous", "zigzag"):
      raise ValueError(f"{name} must be 'contiguous' or 'zigzag', got "
                       f"{lay!r}")
  n = axis_size(axis_name)
  zig = layout == "zigzag" and n > 1
  gather = lambda x: None if x is None else lax.all_gather(
      x, axis_name, axis=1, tiled=True)
  k, v, kv_seg = gather(lp.k), gather(lp.v), gather(lp.kv_seg)
  if kv_layout == "zigzag" and n > 1:
    inv = np.argsort(zigzag_order(n))
    k, v, kv_seg = (reorder_chunks(x, inv) for x in (k, v, kv_seg))
  qlay = Layout(n, n * lp.q.shape[1], zig)
  branches, table = all_gather_calls(qlay, k.shape[1], lp.band)
  impl = implementation
  if impl is not None and not isinstance(impl, str):
    impl = tuple(impl)
  fns = [functools.partial(_run, b, lp=lp, implementation=impl)
         for b in branches]
  args = (lp.q, lp.q_seg, k, v, kv_seg, lp.sinks)
  if len(fns) == 1:
    out = fns[0](*args)
  else:
    # Operands vary over the axis before the switch (see ring._per_device).
    args = vary_all(args, axis_name)
    idx = jnp.asarray(table, jnp.int32)[lax.axis_index(axis_name)]
    out = lax.switch(idx, fns, *args)
  return lp.finish(out)
