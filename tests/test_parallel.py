"""Sequence parallelism on 8 fake CPU devices against the one-device reference.

Every case runs ``sequence_parallel_attention`` (or ``ring_attention`` inside
a user's shard_map) under ``jax.jit`` and compares the output and the VJP
(dq, dk, dv, dsinks under a random cotangent) with autodiff of the
materialised reference (``implementation="xla"``) on the unsharded arrays.
The default run covers every pair of (strategy, causal, load balance, GQA,
segment ids, window) values; ``pytest -m long`` runs the full product.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import parallel, testing
from attnjax.parallel import _common, _plan

F32, BF16 = jnp.float32, jnp.bfloat16
N_DEV = 8


def _key(*parts):
  return jax.random.key(zlib.crc32(repr(parts).encode()))


def _mesh(kind="auto"):
  devs = jax.devices()[:N_DEV]
  if kind == "auto":
    return jax.make_mesh((N_DEV,), ("seq",), axis_types=(AxisType.Auto,),
                         devices=devs)
  if kind == "auto4":  # cheaper to compile: feature tests with many calls
    return jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Auto,),
                         devices=devs[:4])
  if kind == "explicit":
    return jax.make_mesh((N_DEV,), ("seq",),
                         axis_types=(AxisType.Explicit,), devices=devs)
  if kind == "data_seq":  # batch over "data", sequence over "seq"
    return jax.make_mesh((2, 4), ("data", "seq"),
                         axis_types=(AxisType.Explicit,) * 2, devices=devs)
  raise ValueError(kind)


def _inputs(name, *, t=64, s=None, n=8, k=8, dtype=F32, batch=2, h=16):
  return testing.attention_inputs(_key(name), batch=batch, q_len=t,
                                  kv_len=s, num_heads=n, num_kv_heads=k,
                                  head_dim=h, dtype=dtype)


def _vjp_fn(fn):
  def run(q, k, v, sinks, d_out):
    out, vjp = jax.vjp(fn, q, k, v, sinks)
    sharding = jax.typeof(out).sharding
    if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
      # Explicit axes type the cotangent like the output.
      d_out = jax.sharding.reshard(d_out, sharding)
    return out, vjp(d_out)
  return run


def check(strategy="ring", *, load_balance=True, mesh_kind="auto",
          dtype=F32, t=64, s=None, n=8, k=8, batch=2, seg=None, sinks=None,
          implementation=None, put=None, q_scale=None, **kw):
  """sequence_parallel_attention vs the reference: output and VJP.

  ``q_scale``: queries multiplied by it (large logits). The logits then
  carry float32 rounding of about |logit| * 2^-24 each, so the tolerances
  scale with max |logit| / 10 (and the gradients with their magnitude)."""
  inp = _inputs((strategy, load_balance, mesh_kind, str(dtype), t, s, n, k,
                 sorted(kw)), t=t, s=s, n=n, k=k, dtype=dtype, batch=batch)
  tol = None
  if q_scale is not None:
    inp = dataclasses.replace(inp, q=(inp.q * q_scale).astype(inp.q.dtype))
    kr = jnp.repeat(inp.k, n // k, axis=2).astype(F32)
    logits = jnp.einsum("btnh,bsnh->bnts", inp.q.astype(F32), kr)
    tol = max(1.0, float(jnp.max(jnp.abs(logits))) / inp.q.shape[-1] ** 0.5
              / 10)
  mesh = _mesh(mesh_kind)
  has_sinks = sinks is not None
  sinks = jnp.zeros((n,), F32) if sinks is None else sinks

  def sp(q, k_, v, snk):
    return parallel.sequence_parallel_attention(
        q, k_, v, mesh=mesh, strategy=strategy, load_balance=load_balance,
        segment_ids=seg, sinks=snk if has_sinks else None,
        implementation=implementation, **kw)

  def ref(q, k_, v, snk):
    return attnjax.dot_product_attention(
        q, k_, v, segment_ids=seg, sinks=snk if has_sinks else None,
        implementation="xla", **kw)

  args = (inp.q, inp.k, inp.v, sinks, inp.d_out)
  if put is not None:
    args = put(mesh, args)
  out, grads = jax.jit(_vjp_fn(sp))(*args)
  up = lambda x: x.astype(F32)
  out_r, grads_r = jax.jit(_vjp_fn(ref))(up(inp.q), up(inp.k), up(inp.v),
                                         sinks, up(inp.d_out))
  assert out.dtype == dtype and out.shape == out_r.shape
  testing.assert_finite(out, "out")
  testing.assert_close(out, out_r, dtype, name="out", scale=tol)
  for name, a, e in zip(("dq", "dk", "dv", "dsinks"), grads, grads_r):
    if name == "dsinks" and not has_sinks:
      continue
    testing.assert_finite(a, name)
    scale = float(jnp.max(jnp.abs(e))) if name == "dsinks" else None
    if tol is not None:
      scale = tol * max(1.0, float(jnp.max(jnp.abs(e))))
    testing.assert_close(a, e, dtype, grad=True, name=name, scale=scale)
  return out, out_r


def _case_kw(causal, gqa, seg, window, t=64):
  kw = dict(is_causal=causal, k=2 if gqa else 8)
  if seg:
    kw["seg"] = testing.random_segment_ids(_key("seg", causal, gqa), 2, t, 4)
  if window:
    # Wide enough that load balancing still picks zigzag shards (with
    # (11, 5) contiguous shards are already even and lb had no effect).
    kw["local_window_size"] = (40, 5)
  return kw


def _id(strategy, causal, lb, gqa, seg, window):
  return "-".join([strategy, "causal" if causal else "full",
                   "lb" if lb else "nolb", "gqa" if gqa else "mha",
                   "seg" if seg else "noseg", "win" if window else "nowin"])


# A covering array: every pair of factor values appears (and every
# strategy x causal x load-balance triple), 12 cases instead of 96.
PAIRWISE = [
    ("ring", 1, 1, 1, 1, 1), ("ring", 1, 0, 0, 1, 1),
    ("ring", 0, 1, 0, 0, 1), ("ring", 0, 0, 0, 1, 0),
    ("ulysses", 1, 1, 1, 1, 0), ("ulysses", 1, 0, 0, 1, 1),
    ("ulysses", 0, 1, 1, 1, 0), ("ulysses", 0, 0, 1, 0, 0),
    ("all_gather", 1, 1, 0, 0, 1), ("all_gather", 1, 0, 1, 1, 0),
    ("all_gather", 0, 1, 0, 0, 0), ("all_gather", 0, 0, 0, 0, 0),
]
FULL = list(itertools.product(("ring", "ulysses", "all_gather"),
                              (1, 0), (1, 0), (1, 0), (1, 0), (1, 0)))


def test_pairwise_cases_cover_every_pair():
  levels = [sorted({c[i] for c in FULL}) for i in range(6)]
  for i, j in itertools.combinations(range(6), 2):
    have = {(c[i], c[j]) for c in PAIRWISE}
    assert have == set(itertools.product(levels[i], levels[j])), (i, j)
  assert {c[:3] for c in PAIRWISE} == {c[:3] for c in FULL}


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: _id(*c))
def test_matrix(case):
  strategy, causal, lb, gqa, seg, window = case
  # Alternate the block backend: None picks "xla" at these sizes (block
  # backward by recomputation), "xla_chunked" has a residual backward.
  impl = "xla_chunked" if PAIRWISE.index(case) % 2 else None
  kw = _case_kw(bool(causal), gqa, seg, window)
  # The load-balance factor takes effect (zigzag shards) wherever the
  # strategy supports it and the mask is not full.
  band = _plan.band_from_flags(kw["is_causal"], kw.get("local_window_size"))
  zig = parallel.api.use_zigzag(strategy, N_DEV, 64, 64, band)
  assert zig == (strategy != "ulysses" and (causal or window)), case
  check(strategy, load_balance=bool(lb), implementation=impl, **kw)


@pytest.mark.long
@pytest.mark.parametrize("case", FULL, ids=lambda c: _id(*c))
def test_matrix_full(case):
  strategy, causal, lb, gqa, seg, window = case
  check(strategy, load_balance=bool(lb),
        **_case_kw(bool(causal), gqa, seg, window))


# Features -------------------------------------------------------------------


def test_ring_sinks_soft_cap_window_zigzag():
  sinks = jax.random.normal(_key("sinks"), (8,)) * 2
  check("ring", mesh_kind="auto4", is_causal=True, local_window_size=(40, 0),
        sinks=sinks, logits_soft_cap=2.5, k=4)


@pytest.mark.parametrize("strategy", ["ulysses", "all_gather"])
def test_sinks_and_soft_cap(strategy):
  sinks = jnp.linspace(-1.0, 2.0, 8)
  check(strategy, mesh_kind="auto4", is_causal=True, sinks=sinks,
        logits_soft_cap=4.0, k=2)


def test_ring_cross_attention_lengths_differ():
  # T != S: 32 queries, 96 keys, causal (top-left), zigzag on both.
  check("ring", mesh_kind="auto4", t=32, s=96, is_causal=True,
        local_window_size=(30, 4), k=4)


@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses"])
def test_fully_masked_rows_are_zero(strategy):
  """Query segment 9 exists in no key: those rows see nothing anywhere
  (zeros, and finite gradients). The other ids are random, so with
  zigzag shards (ring, all_gather) a permutation of either side's ids
  would show."""
  ids = testing.random_segment_ids(_key("masked-rows"), 2, 64, 4)
  qs = ids.at[0, 5:30].set(9)
  out, _ = check(strategy, mesh_kind="auto4", seg=(qs, ids), is_causal=True,
                 k=2, implementation="xla_chunked")
  np.testing.assert_array_equal(np.asarray(out[0, 5:30]), 0.0)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_zigzag_with_random_segments(strategy):
  """Causal zigzag shards with random query and key segment ids of their
  own: both sides' ids must follow their tokens into zigzag order."""
  qs = testing.random_segment_ids(_key("zig-seg-q"), 2, 64, 3)
  ks = testing.random_segment_ids(_key("zig-seg-k"), 2, 64, 3)
  assert parallel.api.use_zigzag(strategy, 4, 64, 64, _plan.Band(hi=0))
  check(strategy, mesh_kind="auto4", seg=(qs, ks), is_causal=True, k=2)


@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses"])
def test_large_logits(strategy):
  """Queries x 30 (logits up to ~100: exp overflows float32 without the
  running max): the merged partials stay finite and match."""
  check(strategy, mesh_kind="auto4", is_causal=True, k=2, q_scale=30.0,
        implementation="xla_chunked" if strategy == "ring" else None)


def test_ring_with_pallas_triton_interpret():
  """A real Pallas kernel per block (the Triton kernel, interpreted on CPU)
  and its residual backward inside the ring."""
  check("ring", mesh_kind="auto4", t=32, batch=1, is_causal=True, k=2,
        implementation="pallas_triton")


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "all_gather"])
def test_bf16(strategy):
  check(strategy, mesh_kind="auto4", dtype=BF16, is_causal=True, k=2)


@pytest.mark.parametrize("strategy,t,mesh_kind", [
    ("ring", 40, "auto"), ("all_gather", 40, "auto"),
    ("ring", 48, "auto4"), ("all_gather", 48, "auto4")])
def test_odd_rows_per_device(strategy, t, mesh_kind):
  """5 rows a device (T = 40 over 8: contiguous shards) and 6 (T = 48 over
  4: zigzag halves of 6, odd block sizes inside each device)."""
  check(strategy, mesh_kind=mesh_kind, t=t, is_causal=True, k=2,
        seg=testing.random_segment_ids(_key("odd-seg", t), 2, t, 3))


def test_explicit_mesh_replicated_input_is_resharded():
  # jax.make_mesh makes Explicit axes; inputs arrive replicated.
  def put(mesh, args):
    rep = NamedSharding(mesh, P())
    return tuple(jax.device_put(a, rep) for a in args)
  check("ring", mesh_kind="explicit", put=put, is_causal=True, k=4)


def test_data_and_sequence_mesh():
  # Batch sharded over "data", sequence over "seq" (4 devices).
  def put(mesh, args):
    spec = lambda a: P("data", "seq") if a.ndim == 4 else P()
    return tuple(jax.device_put(a, NamedSharding(mesh, spec(a)))
                 for a in args)
  out, _ = check("ring", mesh_kind="data_seq", put=put, is_causal=True,
                 local_window_size=(20, 0), k=2, implementation="xla_chunked")
  assert out.sharding.spec[:2] == ("data", "seq"), out.sharding.spec


def test_unbatched_and_auto():
  mesh = _mesh()
  inp = _inputs("unbatched", batch=1)
  q, k, v = inp.q[0], inp.k[0], inp.v[0]
  got = jax.jit(lambda q, k, v: parallel.sequence_parallel_attention(
      q, k, v, mesh=mesh, strategy="auto", is_causal=True))(q, k, v)
  want = attnjax.dot_product_attention(q, k, v, is_causal=True,
                                       implementation="xla")
  testing.assert_close(got, want, F32)


def test_ring_attention_in_user_shard_map_with_residuals():
  """ring_attention called directly on zigzag shards inside a checked
  shard_map (check_vma=True); lse and its cotangent flow
  (return_residuals=True), and the replicated sinks' gradient is summed
  over the ring."""
  mesh = _mesh("auto4")
  inp = _inputs("direct", k=4)
  order = _common.zigzag_order(4)
  inv = np.argsort(order)
  d_lse = jax.random.normal(_key("dlse"), (2, 8, 64))
  sinks = jax.random.normal(_key("direct_sinks"), (8,))

  def sp(q, k, v, sinks):
    q, k, v = (_common.reorder_chunks(x, order) for x in (q, k, v))
    f = jax.shard_map(
        lambda q, k, v, s: parallel.ring_attention(
            q, k, v, axis_name="seq", is_causal=True, layout="zigzag",
            sinks=s, return_residuals=True, implementation="xla_chunked"),
        mesh=mesh, in_specs=(P(None, "seq"),) * 3 + (P(),),
        out_specs=(P(None, "seq"), P(None, None, "seq")))
    out, lse = f(q, k, v, sinks)
    return (_common.reorder_chunks(out, inv),
            _common.reorder_chunks(lse, inv, axis=2))

  def ref(q, k, v, sinks):
    return attnjax.dot_product_attention(q, k, v, is_causal=True,
                                         sinks=sinks, return_residuals=True,
                                         implementation="xla")

  def run(fn):
    def g(q, k, v, s):
      res, vjp = jax.vjp(fn, q, k, v, s)
      return res, vjp((inp.d_out, d_lse))
    return jax.jit(g)(inp.q, inp.k, inp.v, sinks)

  (out, lse), grads = run(sp)
  (out_r, lse_r), grads_r = run(ref)
  testing.assert_close(out, out_r, F32, name="out")
  testing.assert_close(lse, lse_r, F32, name="lse")
  testing.assert_close(grads[:3], grads_r[:3], F32, grad=True, name="grads")
  testing.assert_close(grads[3], grads_r[3], F32, grad=True, name="dsinks",
                       scale=float(jnp.max(jnp.abs(grads_r[3]))))


def test_vmap_over_a_leading_axis():
  mesh = _mesh("auto4")
  inp = _inputs("vmap", batch=3, k=2)
  f = lambda q, k, v: parallel.sequence_parallel_attention(
      q, k, v, mesh=mesh, strategy="ring", is_causal=True)
  ref = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla")
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * inp.d_out[:1])
  args = (inp.q[:, None], inp.k[:, None], inp.v[:, None])
  got = jax.jit(jax.vmap(f))(*args)[:, 0]
  testing.assert_close(got, ref(inp.q, inp.k, inp.v), F32)
  g = jax.jit(jax.vmap(jax.grad(loss(f), (0, 1, 2))))(*args)
  g_r = jax.vmap(jax.grad(loss(ref), (0, 1, 2)))(*args)
  testing.assert_close(g, g_r, F32, grad=True)


def test_single_device_axis():
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:1])
  inp = _inputs("one", t=24)
  got = parallel.sequence_parallel_attention(inp.q, inp.k, inp.v, mesh=mesh,
                                             is_causal=True)
  want = attnjax.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                       implementation="xla")
  testing.assert_close(got, want, F32)


# Layouts and schedules --------------------------------------------------------


def test_zigzag_round_trip_and_order():
  mesh = _mesh()
  x = jnp.arange(2 * 64, dtype=F32).reshape(2, 64)
  f = jax.shard_map(lambda x: (parallel.to_zigzag(x, "seq"),
                               parallel.from_zigzag(
                                   parallel.to_zigzag(x, "seq"), "seq")),
                    mesh=mesh, in_specs=P(None, "seq"),
                    out_specs=P(None, "seq"))
  zig, back = jax.jit(f)(x)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
  order = _common.zigzag_order(N_DEV)
  np.testing.assert_array_equal(
      np.asarray(zig), np.asarray(_common.reorder_chunks(x, order)))
  lay = _plan.Layout(N_DEV, 64, zigzag=True)
  np.testing.assert_array_equal(
      np.asarray(zig[0]),
      np.concatenate([lay.positions(d) for d in range(N_DEV)]))


BANDS = [_plan.Band(None, 0), _plan.Band(), _plan.Band(-5, 0),
         _plan.Band(-20, 3), _plan.Band(-3, 9), _plan.Band(2, 7),
         _plan.Band(-9, -4), _plan.Band(None, 12)]


@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("band", BANDS, ids=str)
@pytest.mark.parametrize("t,s,n", [(48, 48, 4), (16, 40, 2), (64, 64, 8)])
def test_schedule_is_exact(zigzag, band, t, s, n):
  """The ring's calls reproduce the dense band mask in global positions:
  every visible pair exactly once, nothing else."""
  qlay, klay = _plan.Layout(n, t, zigzag), _plan.Layout(n, s, zigzag)
  qp = np.arange(t)[:, None]
  kp = np.arange(s)[None, :]
  want = np.ones((t, s), bool)
  if band.lo is not None:
    want &= kp - qp >= band.lo
  if band.hi is not None:
    want &= kp - qp <= band.hi
  got = np.zeros((t, s), np.int32)
  steps = _plan.ring_schedule(qlay, klay, band)
  for st in steps:
    for d in range(n):
      qpos, kpos = qlay.positions(d), klay.positions((d - st.s) % n)
      for c in st.branches[st.table[d]]:
        m = c.mask
        rows = np.arange(c.q1 - c.q0)[:, None]
        cols = np.arange(c.k1 - c.k0)[None, :]
        vis = (np.ones((len(rows), cols.shape[1]), bool) if m is None else
               np.asarray(m(rows, cols)))
        assert vis.any(), "a call with nothing visible was scheduled"
        sub = got[np.ix_(qpos[c.q0:c.q1], kpos[c.k0:c.k1])]
        got[np.ix_(qpos[c.q0:c.q1], kpos[c.k0:c.k1])] = sub + vis
  np.testing.assert_array_equal(got, want.astype(np.int32))
  # Skipped steps are exactly those where no device sees anything.
  needed = {st.s for st in steps}
  for s_ in range(n):
    vis_any = any(
        want[np.ix_(qlay.positions(d), klay.positions((d - s_) % n))].any()
        for d in range(n))
    assert (s_ in needed) == vis_any


def test_zigzag_balances_causal_work():
  lay = lambda z: _plan.Layout(N_DEV, 1024, z)
  causal = _plan.Band(None, 0)
  cont = _plan.device_work(lay(False), lay(False), causal)
  zig = _plan.device_work(lay(True), lay(True), causal)
  assert sum(cont) == sum(zig) == 1024 * 1025 // 2
  assert max(zig) == min(zig)
  assert max(cont) > 1.8 * sum(cont) / N_DEV
  assert _plan.ring_schedule(lay(True), lay(True), causal)[1].branches[0]
  # Small windows stay contiguous (zigzag would not help).
  assert parallel.api.use_zigzag("ring", N_DEV, 1024, 1024, causal)
  assert not parallel.api.use_zigzag("ring", N_DEV, 1024, 1024,
                                     _plan.Band(-16, 0))
  assert not parallel.api.use_zigzag("ring", N_DEV, 1024, 1024, _plan.Band())


def test_window_skips_ring_steps():
  lay = _plan.Layout(N_DEV, 1024)
  steps = _plan.ring_schedule(lay, lay, _plan.Band(-100, 0))
  assert [st.s for st in steps] == [0, 1]
  steps = _plan.ring_schedule(lay, lay, _plan.Band(-100, 100))
  assert [st.s for st in steps] == [0, 1, N_DEV - 1]


def test_auto_rule():
  choose = parallel.choose_strategy
  big = dict(q_len=1 << 17, kv_len=1 << 17)
  assert choose(num_heads=16, num_kv_heads=16, num_devices=2,
                **big) == "ulysses"
  assert choose(num_heads=32, num_kv_heads=4, num_devices=8,
                **big) == "all_gather"
  assert choose(num_heads=12, num_kv_heads=12, num_devices=8,
                **big) == "ring"
  assert choose(num_heads=16, num_kv_heads=16, num_devices=2, multi_host=True,
                **big) == "ring"
  assert choose(num_heads=16, num_kv_heads=16, num_devices=8, q_len=4096,
                kv_len=4096) == "all_gather"
  assert choose(num_heads=16, num_kv_heads=16, num_devices=1,
                **big) == "all_gather"


# Compiled HLO -----------------------------------------------------------------


def _hlo(strategy, grad=True, **kw):
  """Compiled HLO text of the forward and (grad=True) the gradient."""
  mesh = _mesh()
  inp = _inputs("hlo", k=2)
  f = lambda q, k, v: parallel.sequence_parallel_attention(
      q, k, v, mesh=mesh, strategy=strategy, **kw)
  g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), (0, 1, 2))
  fns = (f, g) if grad else (f,)
  return tuple(jax.jit(h).lower(inp.q, inp.k, inp.v).compile().as_text()
               for h in fns)


def _count(op, text):
  """Instructions running collective ``op`` (async ones counted once)."""
  return len(re.findall(rf" {op}(-start)?\(", text))


def test_hlo_ring_uses_collective_permutes_only():
  for text in _hlo("ring", is_causal=True):
    assert _count("collective-permute", text) > 0
    for op in ("all-gather", "all-to-all", "reduce-scatter"):
      assert _count(op, text) == 0, op
  # A window needing one neighbour: far fewer transfers than a full ring.
  fwd_win, = _hlo("ring", grad=False, is_causal=True,
                  local_window_size=(7, 0))
  fwd_full, = _hlo("ring", grad=False, load_balance=False)
  assert 0 < _count("collective-permute", fwd_win) < _count(
      "collective-permute", fwd_full)


def test_hlo_all_gather_and_ulysses_collectives():
  fwd, bwd = _hlo("all_gather", is_causal=True, load_balance=False)
  assert _count("all-gather", fwd) > 0
  assert _count("collective-permute", fwd) == 0
  assert _count("reduce-scatter", bwd) + _count("all-reduce", bwd) > 0
  fwd, = _hlo("ulysses", grad=False, is_causal=True)
  assert _count("all-to-all", fwd) >= 4  # q, k, v in; out back


# Validation -------------------------------------------------------------------


@pytest.mark.parametrize("kw,arg", [
    (dict(strategy="tree"), "strategy"),
    (dict(axis_name="sp"), "axis_name"),
    (dict(load_balance=1), "load_balance"),
    (dict(mesh="mesh"), "mesh"),
    (dict(t=60), "query length"),
    (dict(local_window_size=(-1, 0)), "local_window_size"),
])
def test_value_errors_name_the_argument(kw, arg):
  kw = dict(kw)
  t = kw.pop("t", 64)
  inp = _inputs("val", t=t)
  kw.setdefault("mesh", _mesh())
  with pytest.raises(ValueError, match=re.escape(arg)):
    parallel.sequence_parallel_attention(inp.q, inp.k, inp.v, **kw)


def test_ulysses_heads_not_divisible_raises_not_implemented():
  inp = _inputs("uly", n=6, k=6)
  with pytest.raises(NotImplementedError, match="heads"):
    parallel.sequence_parallel_attention(inp.q, inp.k, inp.v, mesh=_mesh(),
                                         strategy="ulysses")


def test_ring_attention_outside_shard_map_raises():
  inp = _inputs("outside")
  with pytest.raises(ValueError, match="seq"):
    parallel.ring_attention(inp.q, inp.k, inp.v, axis_name="seq")
