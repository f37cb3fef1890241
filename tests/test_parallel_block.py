"""The pieces ring attention is built from, on one device.

* ``xla_chunked_attention_bwd`` (the residual backward registered in
  ``attnjax.softmax.api.BACKWARD_IMPLEMENTATIONS``) against autodiff of the
  reference, at its own residuals and at the residuals of a larger problem
  (what the ring feeds it: keys split into blocks, global out and lse).
* ``parallel._block``: the log-sum-exp merge (with empty partials) and the
  block backward by recomputation, which must agree with the residual one.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, testing
from attnjax.parallel import _block, _plan
from attnjax.softmax import api as softmax_api
from attnjax.softmax import xla as xla_backend
from attnjax.softmax import xla_chunked
from attnjax.softmax.problem import make_problem

F32 = jnp.float32


def _key(*parts):
  return jax.random.key(zlib.crc32(repr(parts).encode()))


def _ref_vjp(q, k, v, d_out, d_lse, **kw):
  f = lambda q, k, v: xla_backend.xla_attention(make_problem(q, k, v,
                                                             **kw)[0])
  (out, lse), vjp = jax.vjp(f, q, k, v)
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  return out, lse, vjp((d_out, d_lse))


CASES = {
    "causal_gqa": dict(is_causal=True),
    "window_softcap": dict(local_window_size=(6, 2), logits_soft_cap=3.0),
    "mask_obj": dict(mask=masks.ChunkedCausal(7)),
    "sinks": dict(is_causal=True, sinks=jnp.linspace(-1.0, 1.0, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_residual_backward_matches_autodiff(case):
  kw = dict(CASES[case])
  inp = testing.attention_inputs(_key(case), q_len=29, kv_len=35,
                                 num_kv_heads=2)
  d_lse = jax.random.normal(_key("dlse", case), (2, 4, 29))
  out, lse, want = _ref_vjp(inp.q, inp.k, inp.v, inp.d_out, d_lse, **kw)
  p, _ = make_problem(inp.q, inp.k, inp.v, **kw)
  bwd = softmax_api.load_backward("xla_chunked")
  got = bwd(p, out, lse, inp.d_out, d_lse)
  testing.assert_close(got, want[:3], F32, grad=True)


def test_residual_backward_from_global_residuals():
  """Keys split in three blocks; each block's backward at the *global*
  (out, lse) gives that block's share: dq sums, dk/dv concatenate."""
  inp = testing.attention_inputs(_key("split"), q_len=24, kv_len=36,
                                 num_kv_heads=2)
  seg_q = testing.random_segment_ids(_key("sq"), 2, 24, 2)
  seg_k = testing.random_segment_ids(_key("sk"), 2, 36, 2)
  d_lse = jax.random.normal(_key("dl"), (2, 4, 24))
  kw = dict(segment_ids=(seg_q, seg_k), local_window_size=(30, 10))
  out, lse, (dq, dk, dv) = jax.jit(lambda *a: _ref_vjp(*a, **kw))(
      inp.q, inp.k, inp.v, inp.d_out, d_lse)

  @jax.jit
  def blocks(q, k, v, out, lse, d_out, d_lse):
    got_dq, got_dk, got_dv = 0.0, [], []
    for a, b in ((0, 10), (10, 22), (22, 36)):
      # Block keys [a, b) (column c is key a + c): the window
      # q - 30 <= a + c <= q + 10 is the band c - q in [-30 - a, 10 - a].
      mask = _plan.band_mask(_plan.Band(-30 - a, 10 - a))
      p, _ = make_problem(q, k[:, a:b], v[:, a:b], mask=mask,
                          segment_ids=(seg_q, seg_k[:, a:b]))
      g = xla_chunked.xla_chunked_attention_bwd(p, out, lse, d_out, d_lse,
                                                block_q=8, block_kv=4)
      got_dq = got_dq + g[0]
      got_dk.append(g[1])
      got_dv.append(g[2])
    return got_dq, got_dk, got_dv

  got_dq, got_dk, got_dv = blocks(inp.q, inp.k, inp.v, out, lse, inp.d_out,
                                  d_lse)
  testing.assert_close(got_dq, dq, F32, grad=True, name="dq")
  testing.assert_close(jnp.concatenate(got_dk, 1), dk, F32, grad=True,
                       name="dk")
  testing.assert_close(jnp.concatenate(got_dv, 1), dv, F32, grad=True,
                       name="dv")


@pytest.mark.parametrize("q_scale", [1.0, 30.0])
def test_merge_of_partials_equals_whole_and_handles_empty(q_scale):
  """Three key blocks merged == the whole; q_scale 30 makes lse ~ 110
  (exp(lse) overflows float32: the merge must work relative to the max)."""
  inp = testing.attention_inputs(_key("merge"), q_len=16, kv_len=30)
  inp = dataclasses.replace(inp, q=inp.q * q_scale)
  qs = jnp.zeros((2, 16), jnp.int32).at[0, :4].set(5)  # rows 0-3 empty
  ks = jnp.zeros((2, 30), jnp.int32).at[:, 20:].set(5)  # ...except here

  @jax.jit
  def run(q, k, v):
    full = xla_backend.xla_attention(make_problem(
        q, k, v, segment_ids=(qs, ks))[0])
    o = jnp.zeros((2, 16, 4, 32), F32)
    lse = jnp.full((2, 4, 16), -jnp.inf)
    for a, b in ((0, 12), (12, 20), (20, 30)):
      ob, lb = xla_backend.xla_attention(make_problem(
          q, k[:, a:b], v[:, a:b], segment_ids=(qs, ks[:, a:b]))[0])
      o, lse = _block.merge(o, lse, ob, lb)
    return full, o, lse

  full, o, lse = run(inp.q, inp.k, inp.v)
  if q_scale > 1:
    assert float(jnp.max(lse)) > 89.0  # exp(lse) overflows float32
  testing.assert_finite(o, "merged out")
  testing.assert_close(o, full[0], F32, name="out")
  testing.assert_close(lse, full[1], F32, name="lse")
  # A partial with every row empty changes nothing (and gives no NaN).
  o2, lse2 = _block.merge(o, lse, jnp.zeros_like(o),
                          jnp.full_like(lse, -jnp.inf))
  np.testing.assert_array_equal(np.asarray(o2), np.asarray(o))
  np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))
  # Two empty partials stay empty: zeros, lse -inf.
  e, le = _block.merge(jnp.zeros_like(o), jnp.full_like(lse, -jnp.inf),
                       jnp.zeros_like(o), jnp.full_like(lse, -jnp.inf))
  np.testing.assert_array_equal(np.asarray(e), 0.0)
  assert np.isneginf(np.asarray(le)).all()


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
def test_block_backward_paths_agree(impl):
  """Recompute path ("xla": no residual backward) == residual path, both
  at global residuals of a problem twice as long."""
  inp = testing.attention_inputs(_key("paths"), q_len=20, kv_len=40,
                                 num_kv_heads=2)
  d_lse = jax.random.normal(_key("pl"), (2, 4, 20))
  out, lse, (dq, dk, dv) = jax.jit(
      lambda *a: _ref_vjp(*a, logits_soft_cap=2.0))(
          inp.q, inp.k, inp.v, inp.d_out, d_lse)

  @jax.jit
  def blocks(q, k, v, out, lse, d_out, d_lse):
    got = [0.0, [], []]
    for a, b in ((0, 20), (20, 40)):
      g = _block.block_backward(
          q, k[:, a:b], v[:, a:b], None, None, out, lse, d_out, d_lse,
          mask=None, scale=1 / np.sqrt(32), soft_cap=2.0,
          implementation=impl)
      got[0] = got[0] + g[0]
      got[1].append(g[1])
      got[2].append(g[2])
    return got

  got = blocks(inp.q, inp.k, inp.v, out, lse, inp.d_out, d_lse)
  testing.assert_close(got[0], dq, F32, grad=True, name="dq")
  testing.assert_close(jnp.concatenate(got[1], 1), dk, F32, grad=True)
  testing.assert_close(jnp.concatenate(got[2], 1), dv, F32, grad=True)


@pytest.mark.parametrize("case", ["causal_gqa", "window_softcap"])
def test_triton_residual_backward_interpret(case):
  """pallas_triton's residual backward (interpret mode) at the residuals of
  a problem whose keys extend past this block (ring attention's use)."""
  from attnjax.softmax import pallas as pallas_backend  # noqa: PLC0415
  kw = dict(CASES[case])
  inp = testing.attention_inputs(_key("tri", case), q_len=24, kv_len=40,
                                 num_kv_heads=2, head_dim=16)
  d_lse = jax.random.normal(_key("tri_dl", case), (2, 4, 24))
  out, lse, want = jax.jit(lambda *a: _ref_vjp(*a, **kw))(
      inp.q, inp.k, inp.v, inp.d_out, d_lse)
  bs = pallas_backend.BlockSizes(
      block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16,
      block_q_dkv=16, block_kv_dkv=16)
  bwd = softmax_api.load_backward("pallas_triton")
  got = [0.0, [], []]
  for a, b in ((0, 16), (16, 40)):
    # Keys [a, b): the global mask shifted by a (band in block coordinates).
    band = _plan.band_from_flags(kw.get("is_causal", False),
                                 kw.get("local_window_size")).shift(a)
    p, _ = make_problem(inp.q, inp.k[:, a:b], inp.v[:, a:b],
                        mask=_plan.band_mask(band),
                        logits_soft_cap=kw.get("logits_soft_cap"))
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(pallas_backend, "default_block_sizes", lambda p: bs)
      g = bwd(p, out, lse, inp.d_out, d_lse)
    got[0] = got[0] + g[0]
    got[1].append(g[1])
    got[2].append(g[2])
  testing.assert_close(got[0], want[0], F32, grad=True, name="dq")
  testing.assert_close(jnp.concatenate(got[1], 1), want[1], F32, grad=True,
                       name="dk")
  testing.assert_close(jnp.concatenate(got[2], 1), want[2], F32, grad=True,
                       name="dv")
