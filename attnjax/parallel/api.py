"""``attnjax.parallel.sequence_parallel_attention``: global arrays in, global
arrays out; the strategy runs under ``jax.shard_map`` over one mesh axis."""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.parallel import _plan
from attnjax.parallel._common import (from_zigzag, kv_head_replicas,
                                      to_zigzag)
from attnjax.parallel.all_gather import all_gather_attention
from attnjax.parallel.ring import ring_attention
from attnjax.parallel.ulysses import ulysses_attention
from attnjax.softmax import api as softmax_api
from attnjax.softmax.problem import make_problem

__all__ = ["STRATEGIES", "choose_strategy", "sequence_parallel_attention",
           "use_zigzag"]

type Strategy = Literal["ring", "ulysses", "all_gather", "auto"]
STRATEGIES = ("ring", "ulysses", "all_gather", "auto")

_STRATEGY_FNS = {
    "ring": ring_attention,
    "ulysses": ulysses_attention,
    "all_gather": all_gather_attention,
}

# Below this many query positions per device the collectives' latency, not
# their bandwidth, dominates: one all-gather beats n ring steps.
_SHORT_LOCAL_LEN = 1024


def _ulysses_ok(num_heads, num_kv_heads, n) -> bool:
  if num_heads % n:
    return False
  try:
    kv_head_replicas(num_heads, num_kv_heads, n)
  except NotImplementedError:
    return False
  return True


def choose_strategy(*, num_heads: int, num_kv_heads: int, num_devices: int,
                    q_len: int, kv_len: int, multi_host: bool = False) -> str:
  """The ``strategy="auto"`` rule (docs/parallel.md explains it).

  1. One device: "all_gather" (no communication at all).
  2. The gathered K/V is no bigger than the local Q and O shards
     (``K * S <= N * T / n``: few kv heads, or a short key sequence), or the
     local length is under 1024 (latency-bound): "all_gather". It moves the
     fewest bytes then and runs one kernel call per query chunk.
  3. The query heads split evenly over the devices (with kv heads
     replicated when K < n) and the axis stays within one host: "ulysses"
     (the kernel runs whole sequences; two all-to-alls per direction over
     fast intra-host links).
  4. Otherwise "ring": works for any head count, holds only 1/n of K/V, and
     hides its transfers behind compute (the choice across hosts).

  Example:

  >>> choose_strategy(num_heads=16, num_kv_heads=16, num_devices=2,
  ...                 q_len=131072, kv_len=131072)
  'ulysses'
  """
  n = num_devices
  if n == 1:
    return "all_gather"
  if num_kv_heads * kv_len * n <= num_heads * q_len or q_len // n < (
      _SHORT_LOCAL_LEN):
    return "all_gather"
  if not multi_host and _ulysses_ok(num_heads, num_kv_heads, n):
    return "ulysses"
  return "ring"


def use_zigzag(strategy: str, n: int, q_len: int, kv_len: int,
               band: _plan.Band) -> bool:
  """``load_balance=True`` rule: zigzag when it lowers the busiest device's
  visible (query, key) pairs by more than 5% (causal masks; never for full
  attention or small windows, where contiguous shards are already even)."""
  if n == 1 or strategy == "ulysses" or band.is_full:
    return False
  if q_len % (2 * n) or kv_len % (2 * n):
    return False
  lays = [(_plan.Layout(n, q_len, z), _plan.Layout(n, kv_len, z))
          for z in (False, True)]
  work = [max(_plan.device_work(ql, kl, band)) for ql, kl in lays]
  return work[1] < 0.95 * work[0]


def _explicit_axes(mesh) -> set:
  return {a for a, t in zip(mesh.axis_names, mesh.axis_types)
          if t == AxisType.Explicit}


def _batch_axes(x, mesh, axis_name) -> tuple:
  """Explicit mesh axes x's batch dimension is sharded over (kept as is)."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  if not spec:
    return ()
  entry = spec[0]
  entry = (entry,) if isinstance(entry, str) else tuple(entry or ())
  explicit = _explicit_axes(mesh)
  return tuple(a for a in entry if a != axis_name and a in explicit)


def _multi_host(mesh, axis_name) -> bool:
  devs = np.asarray(mesh.devices)
  ax = mesh.axis_names.index(axis_name)
  procs = np.vectorize(lambda d: d.process_index)(devs)
  return bool(np.any(procs != np.take(procs, [0], axis=ax)))


def sequence_parallel_attention(
    query,
    key,
    value,
    *,
    mesh,
    axis_name="seq",
    strategy: Strategy = "ring",
    load_balance: bool = True,
    is_causal: bool = False,
    segment_ids=None,
    local_window_size=None,
    sinks=None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    implementation=None,
):
  """Attention over a sequence sharded along a mesh axis.

  The result equals ``attnjax.dot_product_attention`` on the unsharded
  arrays (as do its gradients); it is sharded like the query (sequence on
  ``axis_name``). Works under ``jax.jit``, for Auto and Explicit mesh axes,
  on one host or on several started with ``jax.distributed.initialize``.

  Args:
    query: [B, T, N, H] (or unbatched [T, N, H]); T sharded (or to be
      sharded) over ``axis_name``.
    key, value: [B, S, K, H], [B, S, K, Hv]; S sharded likewise.
    mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``.
    axis_name: the sequence axis of the mesh.
    strategy: "ring" (K/V rotate, overlapped with compute), "ulysses"
      (all-to-all to head sharding), "all_gather" (K/V gathered), or "auto"
      (``choose_strategy``).
    load_balance: lay the sequence out in zigzag order so causal work is
      even across devices (``use_zigzag`` decides when it helps; the data
      is permuted inside and the result returned in the original order).
    is_causal, segment_ids, local_window_size, sinks, logits_soft_cap,
      scale: as ``attnjax.dot_product_attention``.
    implementation: the per-device attnjax backend (None: the fastest).

  Returns:
    [B, T, N, Hv], sharded like the query.

  Raises:
    ValueError: invalid arguments (the message names the argument).
    NotImplementedError: ``strategy="ulysses"`` with heads that cannot be
      split over the devices.

  Example:

  >>> import jax, attnjax.parallel as ap
  >>> mesh = jax.make_mesh((jax.device_count(),), ("seq",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 4, 16))
  >>> out = jax.jit(lambda q: ap.sequence_parallel_attention(
  ...     q, q, q, mesh=mesh, is_causal=True))(q)
  >>> out.shape
  (1, 64, 4, 16)
  """
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got "
                     f"{type(mesh).__name__}")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got "
                     f"{strategy!r}")
  if not isinstance(load_balance, (bool, np.bool_)):
    raise ValueError(f"load_balance must be a bool, got {load_balance!r}")
  p, unbatched = make_problem(
      query, key, value, is_causal=is_causal, segment_ids=segment_ids,
      local_window_size=local_window_size, sinks=sinks,
      logits_soft_cap=logits_soft_cap, scale=scale)
  softmax_api.resolve_implementations(implementation)  # validates names
  b, t, s, nh, kh, _, _ = p.shape
  n = mesh.shape[axis_name]
  kw = dict(is_causal=is_causal, local_window_size=local_window_size,
            logits_soft_cap=p.logits_soft_cap, scale=p.scale,
            implementation=implementation)
  if n == 1:
    seg = None if p.q_segment_ids is None else (p.q_segment_ids,
                                                p.kv_segment_ids)
    out = softmax_api.dot_product_attention(p.q, p.k, p.v, segment_ids=seg,
                                            sinks=p.sinks, **kw)
    return out[0] if unbatched else out
  for name, length in (("query", t), ("key", s)):
    if length % n:
      raise ValueError(
          f"{name} length {length} must be divisible by the {n} devices of "
          f"mesh axis {axis_name!r}")
  if strategy == "auto":
    strategy = choose_strategy(num_heads=nh, num_kv_heads=kh, num_devices=n,
                               q_len=t, kv_len=s,
                               multi_host=_multi_host(mesh, axis_name))
  band = _plan.band_from_flags(is_causal, local_window_size)
  zig = bool(load_balance) and use_zigzag(strategy, n, t, s, band)
  layout = "zigzag" if zig else "contiguous"
  fn = _STRATEGY_FNS[strategy]

  arrays = {"q": p.q, "k": p.k, "v": p.v}
  if p.q_segment_ids is not None:
    arrays["q_seg"] = p.q_segment_ids
    arrays["kv_seg"] = p.kv_segment_ids
  sinks_arr = p.sinks
  # Explicit axes: the arrays are resharded to (batch as the query's, T on
  # axis_name, heads replicated) and every axis used becomes manual, so the
  # kernels see plain local arrays. Auto axes other than axis_name stay
  # automatic.
  batch = ()
  if axis_name in _explicit_axes(mesh):
    batch = _batch_axes(p.q, mesh, axis_name)
    bspec = batch if len(batch) != 1 else batch[0]
    bspec = bspec or None
    specs = {name: P(bspec, axis_name, *([None] * (x.ndim - 2)))
             for name, x in arrays.items()}
    arrays = {name: jax.sharding.reshard(x, NamedSharding(mesh, specs[name]))
              for name, x in arrays.items()}
    out_spec = specs["q"]
  else:
    specs = {name: P(None, axis_name) for name in arrays}
    out_spec = P(None, axis_name)

  extra = {}
  if strategy == "all_gather":
    # Keys are gathered whole: only the queries need the zigzag layout.
    extra["kv_layout"] = "contiguous"
  zig_names = ("q", "q_seg") if strategy == "all_gather" else tuple(arrays)

  def local(arrays, sinks):
    if zig:
      arrays = {name: to_zigzag(x, axis_name) if name in zig_names else x
                for name, x in arrays.items()}
    seg = None
    if "q_seg" in arrays:
      seg = (arrays["q_seg"], arrays["kv_seg"])
    out = fn(arrays["q"], arrays["k"], arrays["v"], axis_name=axis_name,
             segment_ids=seg, sinks=sinks, layout=layout, **kw, **extra)
    return from_zigzag(out, axis_name) if zig else out

  in_specs = (specs, None if sinks_arr is None else P())
  # check_vma=False: the strategies are written to pass the varying-axes
  # check (ring_attention etc. work inside a user's checked shard_map), but
  # a Pallas kernel whose out_shape carries no varying-axes type would fail
  # it; unchecked, replicated inputs' cotangents are still summed at the
  # boundary (sinks).
  out = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                      out_specs=out_spec, axis_names={axis_name, *batch},
                      check_vma=False)(arrays, sinks_arr)
  return out[0] if unbatched else out
