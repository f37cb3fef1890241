"""DeepSpeed-Ulysses sequence parallelism (https://arxiv.org/abs/2309.14509).

Inside ``jax.shard_map``: an all-to-all turns sequence-sharded q, k, v
([B, T/n, N, H] on each device) into head-sharded ones ([B, T, N/n, H]), any
attnjax kernel runs the *whole* sequence for its heads, and a second
all-to-all turns the output back. Masks need no translation (every device
sees every position), and the work is even by construction.

Which heads each device holds (n=2, N=4 query heads, K=2 kv heads)::

              before (sequence)         after all-to-all (heads)
    dev 0     q[  0:T/2, h0 h1 h2 h3]   q[0:T, h0 h1]  k,v[0:T, g0]
    dev 1     q[T/2:T,   h0 h1 h2 h3]   q[0:T, h2 h3]  k,v[0:T, g1]

GQA with fewer kv heads than devices (K < n, or K not a multiple of n):
each kv head is repeated r times first, r = lcm(K, n) / K, so that the kv
heads split evenly and query head i still reads kv head i // (N / K). This
needs N to be a multiple of lcm(K, n); otherwise NotImplementedError.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.parallel._common import (LocalProblem, axis_size,
                                      kv_head_replicas, reorder_chunks,
                                      zigzag_order)
from attnjax.softmax import api as softmax_api

__all__ = ["ulysses_attention"]


def _seq_to_heads(x, axis_name):
  return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1,
                        tiled=True)


def _heads_to_seq(x, axis_name):
  return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2,
                        tiled=True)


def ulysses_attention(
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
):
  """Ulysses attention over local sequence shards, inside ``jax.shard_map``.

  Args: as ``attnjax.parallel.ring_attention`` (``layout`` says how the
  local shards map to global positions; the kernel always sees the original
  order).

  Returns:
    Local output [B, T/n, N, Hv].

  Raises:
    NotImplementedError: the query heads cannot be split over the devices.

  Example:

  >>> import jax, attnjax.parallel as ap
  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("seq",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 8, 16))
  >>> f = jax.jit(jax.shard_map(
  ...     lambda q, k, v: ap.ulysses_attention(q, k, v, axis_name="seq"),
  ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")))
  >>> f(q, q, q).shape
  (1, 64, 8, 16)
  """
  lp = LocalProblem(query, key, value, is_causal=is_causal,
                    segment_ids=segment_ids,
                    local_window_size=local_window_size, sinks=sinks,
                    logits_soft_cap=logits_soft_cap, scale=scale)
  if layout not in ("contiguous", "zigzag"):
    raise ValueError(f"layout must be 'contiguous' or 'zigzag', got "
                     f"{layout!r}")
  n = axis_size(axis_name)
  q, k, v = lp.q, lp.k, lp.v
  nh, kh = q.shape[2], k.shape[2]
  if nh % n:
    raise NotImplementedError(
        f"ulysses splits the query heads over the devices: N={nh} is not a "
        f"multiple of the {n} devices on axis {axis_name!r}")
  reps = kv_head_replicas(nh, kh, n)
  if reps > 1:
    k = jnp.repeat(k, reps, axis=2)
    v = jnp.repeat(v, reps, axis=2)
  q, k, v = (_seq_to_heads(x, axis_name) for x in (q, k, v))
  q_seg, kv_seg = lp.q_seg, lp.kv_seg
  if q_seg is not None:
    q_seg = lax.all_gather(q_seg, axis_name, axis=1, tiled=True)
    kv_seg = lax.all_gather(kv_seg, axis_name, axis=1, tiled=True)
  sinks = lp.sinks
  if sinks is not None:
    per = nh // n
    sinks = lax.dynamic_slice_in_dim(sinks, lax.axis_index(axis_name) * per,
                                     per)
  if layout == "zigzag" and n > 1:
    # Gathered in device order = zigzag chunk order; restore the original.
    inv = np.argsort(zigzag_order(n))
    q, k, v, q_seg, kv_seg = (reorder_chunks(x, inv)
                              for x in (q, k, v, q_seg, kv_seg))
  out = softmax_api.dot_product_attention(
      q, k, v, is_causal=lp.is_causal,
      local_window_size=lp.local_window_size,
      segment_ids=None if q_seg is None else (q_seg, kv_seg), sinks=sinks,
      logits_soft_cap=lp.soft_cap, scale=lp.scale,
      implementation=implementation)
  if layout == "zigzag" and n > 1:
    out = reorder_chunks(out, zigzag_order(n))
  return lp.finish(_heads_to_seq(out, axis_name))
