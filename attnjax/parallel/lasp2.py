"""LASP-2: sequence-parallel linear attention with one all-gather.

Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention
and Its Hybrid" (2025). The sequence is sharded over a mesh axis of D
devices. Every recurrence of the family is affine in its state, so a shard
acts on the state entering it as ``S_out = A S_in + B``:

* gated / decayed linear attention: ``A = diag(exp(sum of the shard's log
  gates))`` (a scalar or one value per key channel; 0 if a segment reset
  falls inside the shard), ``B = sum_j w_j k_j^T v_j`` (one matmul);
* the delta rule: ``A`` is a full [F, F] matrix, the product of the
  shard's ``exp(g_t)(I - beta_t k_t^T k_t)``; ``A`` and ``B`` come out of the
  chunked (WY/UT) delta rule run once on the augmented value ``[0_F | v]``
  from the state ``[I | 0]``. Affine maps compose, so the delta rule
  parallelises the same way, at [F, F + V] per head instead of [F, V].

Each device computes its ``(A, B)`` summary (plus its first and last segment
ids, so resets at shard boundaries need no extra communication), ONE
all-gather exchanges the summaries (their size is independent of T), every
device folds the summaries of the devices before it into its starting state
(a loop over D, local) and then computes its outputs with the single-device
implementation from that state. The backward pass is autodiff through
``shard_map``: the all-gather transposes to one reduce-scatter of summary
cotangents, again independent of T (plus an all-reduce of the gradients of
replicated arguments such as ``log_decay`` and ``initial_state``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.linear import api
from attnjax.linear.chunked import local_state
from attnjax.linear.delta import delta_rule_chunked

__all__ = ["sequence_parallel_delta_rule_attention",
           "sequence_parallel_linear_attention"]


def _batch_entry(x, mesh, axis_name):
  """The mesh axes the batch dim of ``x`` is sharded over (None if none
  or unknown), never ``axis_name``."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  entry = spec[0] if spec else None
  if entry is None or entry == axis_name:
    return None
  if isinstance(entry, tuple):
    entry = tuple(e for e in entry if e != axis_name) or None
  return entry


def _place(arrays, specs, mesh, axis_name):
  """Explicit mesh axes: reshard so shard_map's in_specs match the inputs."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if types.get(axis_name) != AxisType.Explicit:
    return arrays
  return {name: None if x is None else jax.sharding.reshard(
      x, NamedSharding(mesh, specs[name])) for name, x in arrays.items()}


def _check_mesh(mesh, axis_name, length):
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}")
  d = mesh.shape[axis_name]
  if length % d:
    raise ValueError(f"query length {length} must be divisible by the size "
                     f"{d} of mesh axis {axis_name!r}")
  return d


def _local_resets(seg):
  """Resets inside the shard (its first token's is decided after the
  all-gather, from the previous shard's last segment id)."""
  if seg is None:
    return None
  b = seg.shape[0]
  return jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]],
                         axis=1)


def _gather_summaries(parts, seg, axis_name):
  """ONE all-gather of the summaries and the shard's segment ends.

  ``parts`` are float arrays [B, N, F, c_i]; they travel concatenated along
  the last axis (the batch axis stays where it is, so a batch sharding over
  another mesh axis is untouched), with the first and last segment ids
  bit-cast to float32 in two more columns.

  Returns (list of gathered parts [D, B, N, F, c_i], first-token reset flags
  [D, B] or None).
  """
  cols = [x.astype(jnp.float32) for x in parts]
  lead = cols[0].shape[:3]
  if seg is not None:
    ends = jnp.stack([seg[:, 0], seg[:, -1]], -1).astype(jnp.int32)
    ends = lax.bitcast_convert_type(ends, jnp.float32)  # [B, 2]
    cols.append(jnp.broadcast_to(ends[:, None, None, :], lead + (2,)))
  gathered = lax.all_gather(jnp.concatenate(cols, -1), axis_name)
  out, off = [], 0
  for x in parts:
    out.append(gathered[..., off:off + x.shape[-1]])
    off += x.shape[-1]
  resets = None
  if seg is not None:
    ends = lax.bitcast_convert_type(gathered[:, :, 0, 0, off:], jnp.int32)
    first, last = ends[..., 0], ends[..., 1]  # [D, B]
    resets = jnp.concatenate([jnp.zeros_like(first[:1], bool),
                              first[1:] != last[:-1]], axis=0)
  return out, resets


def _run_shard_map(local, mesh, axis_name, seq_arrays, rep_arrays):
  """shard_map over every mesh axis: T on ``axis_name``, the batch kept on
  whatever other axes the query's batch dim is sharded over (Explicit), all
  else replicated. (Leaving the other axes automatic is not an option in
  jax 0.11: the all-gather's transpose then fails under Explicit axes.)"""
  bat = _batch_entry(seq_arrays["q"], mesh, axis_name)
  specs = {k: P(bat, axis_name) for k in seq_arrays}
  specs.update({k: (P() if k == "log_decay" else P(bat))
                for k in rep_arrays})
  seq_arrays = _place(seq_arrays, specs, mesh, axis_name)
  rep_arrays = _place(rep_arrays, specs, mesh, axis_name)
  in_specs = tuple({k: (None if v is None else specs[k])
                    for k, v in group.items()}
                   for group in (seq_arrays, rep_arrays))
  # check_vma=False: the final state is replicated by construction (every
  # device folds the same gathered summaries); shard_map then divides its
  # cotangent by D and sums replicated inputs' gradients over the axis.
  # Jitted so that an eager call runs as one program, not op by op.
  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=in_specs,
      out_specs=(P(bat, axis_name), P(bat)), check_vma=False))(
          seq_arrays, rep_arrays)


def sequence_parallel_linear_attention(
    query, key, value, *, mesh, axis_name: str = "seq", feature_map=None,
    log_decay=None, gate=None, normalize: bool = False,
    scale: float | None = None, initial_state=None,
    return_final_state: bool = False, segment_ids=None,
    chunk_size: int | None = None, implementation=None):
  """``attnjax.linear_attention`` on global arrays sharded over ``axis_name``.

  Equals ``linear_attention`` on the unsharded arrays (every variant: plain,
  normalised, fixed decay, scalar and per-channel gates, feature maps, GQA,
  initial/final state, segment resets) with one all-gather of per-device
  state summaries in the forward pass (LASP-2; see the module docstring).

  Args:
    query, key, value: [B, T, N, H], [B, T, K, H], [B, T, K, Hv] global
      arrays; T must be divisible by the size of mesh axis ``axis_name``.
    mesh: a ``jax.sharding.Mesh`` (Auto or Explicit axes). With Explicit
      axes the batch stays sharded over the other axes its query has (e.g.
      "data"); other dims are replicated for the call.
    axis_name: the sequence axis of the mesh.
    feature_map, log_decay, gate, normalize, scale, initial_state,
    return_final_state, segment_ids, chunk_size, implementation: as
      ``attnjax.linear_attention`` (``implementation`` is used for each
      device's local outputs).

  Returns:
    ``out`` [B, T, N, Hv] sharded like the inputs over ``axis_name``, or
    ``(out, final_state)``.

  >>> import jax, jax.numpy as jnp
  >>> from attnjax.parallel.lasp2 import sequence_parallel_linear_attention
  >>> mesh = jax.make_mesh((1,), ("seq",))
  >>> x = jnp.ones((1, 8, 2, 4))
  >>> sequence_parallel_linear_attention(x, x, x, mesh=mesh).shape
  (1, 8, 2, 4)
  """
  # Validate on the global arrays (shapes only; concrete decays by value).
  jax.eval_shape(lambda *a: (api.prepare_linear(
      *a[:3], feature_map=feature_map, log_decay=a[3], gate=a[4],
      normalize=normalize, scale=scale, initial_state=a[5],
      segment_ids=a[6], chunk_size=chunk_size), ())[1],
                 query, key, value, log_decay, gate, initial_state,
                 segment_ids)
  n = query.shape[2]
  api._check_log_decay(log_decay, n)  # noqa: SLF001 (values, if concrete)
  api.resolve(implementation)
  _check_mesh(mesh, axis_name, query.shape[1])
  dtype = value.dtype

  def local(seq, rep):
    p = api.prepare_linear(
        seq["q"], seq["k"], seq["v"], feature_map=feature_map,
        log_decay=rep["log_decay"], gate=seq["gate"], normalize=normalize,
        scale=scale, chunk_size=chunk_size)
    b, _, _, f = p.q.shape
    seg = seq["seg"]
    resets = _local_resets(seg)
    v_sum = p.v
    if normalize:  # the key sum rides along as a column of ones
      v_sum = jnp.concatenate([p.v, jnp.ones_like(p.v[..., :1])], -1)
    vc = v_sum.shape[-1]
    s_loc, log_a = local_state(p.k, v_sum, p.log_gate, resets, num_heads=n)
    (s_all, log_all), first_reset = _gather_summaries(
        [s_loc, log_a[..., None]], seg, axis_name)
    if first_reset is not None:
      log_all = jnp.where(first_reset[:, :, None, None, None], -jnp.inf,
                          log_all)
    me = lax.axis_index(axis_name)
    s0 = rep["s0"]
    state = (jnp.zeros((b, n, f, vc), jnp.float32) if s0 is None
             else s0.astype(jnp.float32))
    start = state
    for e in range(s_all.shape[0]):  # fold the summaries, in device order
      state = jnp.exp(log_all[e]) * state + s_all[e]
      start = jnp.where(e < me, state, start)
    if first_reset is not None:
      resets = resets.at[:, 0].set(jnp.take(first_reset, me, axis=0))
    p = dataclasses.replace(p, initial_state=start, resets=resets)
    out, _ = api.run(p, implementation)
    return out.astype(dtype), state

  seq_arrays = {"q": query, "k": key, "v": value, "gate": gate,
                "seg": segment_ids}
  rep_arrays = {"log_decay": log_decay, "s0": initial_state}
  out, final = _run_shard_map(local, mesh, axis_name, seq_arrays, rep_arrays)
  return (out, final) if return_final_state else out


def sequence_parallel_delta_rule_attention(
    query, key, value, beta, *, mesh, axis_name: str = "seq", gate=None,
    scale: float | None = None, initial_state=None,
    return_final_state: bool = False, segment_ids=None,
    chunk_size: int | None = None, implementation=None):
  """``attnjax.delta_rule_attention`` sharded over ``axis_name`` (LASP-2).

  Each device summarises its shard as the affine map ``S -> A S + B`` with
  ``A`` [H, H] per head (the product of its delta-rule transitions) and
  ``B`` [H, Hv]; one all-gather exchanges the ``(A, B)`` summaries, a local
  fold gives each device its starting state. Arguments as
  ``delta_rule_attention`` plus ``mesh`` and ``axis_name``.

  >>> import jax, jax.numpy as jnp
  >>> from attnjax.parallel.lasp2 import (
  ...     sequence_parallel_delta_rule_attention)
  >>> mesh = jax.make_mesh((1,), ("seq",))
  >>> x = jnp.ones((1, 8, 2, 4)) / 2
  >>> sequence_parallel_delta_rule_attention(
  ...     x, x, x, jnp.ones((1, 8, 2)) / 2, mesh=mesh).shape
  (1, 8, 2, 4)
  """
  jax.eval_shape(lambda *a: (api.prepare_delta(
      *a[:4], gate=a[4], scale=scale, initial_state=a[5], segment_ids=a[6],
      chunk_size=chunk_size), ())[1],
                 query, key, value, beta, gate, initial_state, segment_ids)
  api.resolve(implementation)
  _check_mesh(mesh, axis_name, query.shape[1])
  n = query.shape[2]
  dtype = value.dtype

  def local(seq, rep):
    p = api.prepare_delta(seq["q"], seq["k"], seq["v"], seq["beta"],
                          gate=seq["gate"], scale=scale,
                          chunk_size=chunk_size)
    b, _, _, f = p.q.shape
    vd = p.v.shape[-1]
    seg = seq["seg"]
    resets = _local_resets(seg)
    # The shard's affine map from the augmented run [0 | v] from [I | 0].
    v_aug = jnp.concatenate([jnp.zeros(p.v.shape[:3] + (f,), p.v.dtype),
                             p.v], -1)
    eye = jnp.broadcast_to(jnp.eye(f, dtype=jnp.float32), (b, n, f, f))
    init = jnp.concatenate([eye, jnp.zeros((b, n, f, vd), jnp.float32)], -1)
    _, ab = delta_rule_chunked(p.q, p.k, v_aug, p.beta, p.log_gate, resets,
                               scale=p.scale, initial_state=init,
                               chunk_size=p.chunk_size or 64)
    (a_all, b_all), first_reset = _gather_summaries(
        [ab[..., :f], ab[..., f:]], seg, axis_name)
    if first_reset is not None:
      a_all = jnp.where(first_reset[:, :, None, None, None], 0.0, a_all)
    me = lax.axis_index(axis_name)
    s0 = rep["s0"]
    state = (jnp.zeros((b, n, f, vd), jnp.float32) if s0 is None
             else s0.astype(jnp.float32))
    start = state
    for e in range(a_all.shape[0]):
      state = jnp.einsum("bnfg,bngv->bnfv", a_all[e], state,
                         precision=lax.Precision.HIGHEST) + b_all[e]
      start = jnp.where(e < me, state, start)
    if first_reset is not None:
      resets = resets.at[:, 0].set(jnp.take(first_reset, me, axis=0))
    p = dataclasses.replace(p, initial_state=start, resets=resets)
    out, _ = api.run(p, implementation)
    return out.astype(dtype), state

  seq_arrays = {"q": query, "k": key, "v": value, "beta": beta, "gate": gate,
                "seg": segment_ids}
  rep_arrays = {"s0": initial_state}
  out, final = _run_shard_map(local, mesh, axis_name, seq_arrays, rep_arrays)
  return (out, final) if return_final_state else out
