"""The shared softmax-attention suite: every backend subclasses it.

A backend test is a few lines::

    class TestXlaChunked(SoftmaxSuite):
      @staticmethod
      def impl(problem):
        return xla_chunked.xla_chunked_attention(problem, block_q=8,
                                                 block_kv=16)

Each case compares the forward output, the log-sum-exp and the VJP (under a
random cotangent for both outputs) with autodiff of the materialised reference
(``pallas_kernels.flash.reference``), on fresh random inputs.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, testing
from attnjax.softmax import xla as xla_backend
from attnjax.softmax.problem import make_problem

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _key(*parts):
  return jax.random.key(zlib.crc32(repr(parts).encode()))


def _problem_fn(static_kw, impl):
  """f(q, k, v, bias, sinks, arrays) -> (out, lse) through make_problem."""
  def f(q, k, v, bias, sinks, arrays):
    p, _ = make_problem(q, k, v, bias, arrays.get("mask", static_kw.get(
        "mask")), sinks=sinks, segment_ids=arrays.get("segment_ids"),
                        query_seq_lengths=arrays.get("q_lengths"),
                        key_value_seq_lengths=arrays.get("kv_lengths"),
                        **{k_: v_ for k_, v_ in static_kw.items()
                           if k_ != "mask"})
    return impl(p)
  return f


def check_against_reference(impl, inp, *, dtype, bias=None, sinks=None,
                            arrays=None, grads=True, scale=None, **static_kw):
  """Forward, lse and VJP of impl vs autodiff of the reference."""
  arrays = arrays or {}
  ref_f = _problem_fn(static_kw, xla_backend.xla_attention)
  f = _problem_fn(static_kw, impl)
  up = lambda x: None if x is None else x.astype(F32)
  # The reference runs in float32 on the same (rounded) inputs.
  ref_args = (up(inp.q), up(inp.k), up(inp.v), up(bias), up(sinks))
  args = (inp.q, inp.k, inp.v, bias, sinks)
  d_lse = jax.random.normal(_key("dlse", inp.q.shape), inp.q.shape[:1] + (
      inp.q.shape[2], inp.q.shape[1]))

  @jax.jit
  def run(args, ref_args, arrays, d_out, d_lse):
    (out_r, lse_r), vjp_r = jax.vjp(lambda *a: ref_f(*a, arrays), *ref_args)
    (out, lse), vjp = jax.vjp(lambda *a: f(*a, arrays), *args)
    d_lse = jnp.where(jnp.isfinite(lse_r), d_lse, 0.0)
    g_r = vjp_r((d_out.astype(F32), d_lse)) if grads else None
    g = vjp((d_out, d_lse)) if grads else None
    return out, lse, out_r, lse_r, g, g_r

  out, lse, out_r, lse_r, g, g_r = run(args, ref_args, arrays, inp.d_out,
                                       d_lse)
  assert out.dtype == inp.q.dtype, out.dtype
  assert lse.dtype == F32 and lse.shape == lse_r.shape
  testing.assert_close(out, out_r, dtype, name="out", scale=scale)
  testing.assert_close(lse, lse_r, dtype, name="lse", scale=scale)
  testing.assert_finite(out, "out")
  if not grads:
    return out, lse
  names = ["dq", "dk", "dv", "dbias", "dsinks"]
  for name, a, e in zip(names, g, g_r):
    if e is None:
      continue
    testing.assert_finite(a, name)
    scale = float(jnp.max(jnp.abs(e))) if name in ("dbias", "dsinks") else None
    testing.assert_close(a, e, dtype, grad=True, name=name, scale=scale)
  return out, lse


class SoftmaxSuite:
  """Subclasses define ``impl(problem) -> (out, lse)`` and capabilities."""

  dtypes = (F32, BF16, F16)
  supports_bias = True
  supports_mask_array = True
  head_dims = (16, 32, 80)

  @staticmethod
  def impl(problem):
    raise NotImplementedError

  def check(self, inp, **kw):
    return check_against_reference(type(self).impl, inp, **kw)

  # Shapes ------------------------------------------------------------------

  @pytest.mark.parametrize("n,kh", [(4, 4), (4, 2), (6, 1)])
  @pytest.mark.parametrize("t,s", [(37, 37), (19, 45), (64, 23)])
  def test_shapes_gqa(self, n, kh, t, s):
    inp = testing.attention_inputs(_key("shapes", n, kh, t, s), q_len=t,
                                   kv_len=s, num_heads=n, num_kv_heads=kh,
                                   head_dim=16)
    self.check(inp, dtype=F32)

  def test_value_head_dim(self):
    inp = testing.attention_inputs(_key("hv"), head_dim=32,
                                   value_head_dim=16, num_kv_heads=2)
    self.check(inp, dtype=F32, is_causal=True)

  def test_head_dims(self):
    for h in self.head_dims:
      inp = testing.attention_inputs(_key("hd", h), q_len=21, head_dim=h,
                                     batch=1, num_heads=2)
      self.check(inp, dtype=F32, is_causal=True)

  # Masks ---------------------------------------------------------------------

  @pytest.mark.parametrize("kw", [
      dict(is_causal=True),
      dict(local_window_size=(5, 3)),
      dict(local_window_size=4),
      dict(is_causal=True, local_window_size=(7, 0)),
      dict(mask=masks.Causal(offset=8)),
      dict(mask=masks.ChunkedCausal(10)),
      dict(mask=(masks.LocalWindow(6, 0) | masks.Prefix(3)) & masks.Causal()),
      dict(mask=masks.FromFunction(jnp.greater_equal) & masks.LocalWindow(9, 9)),
  ], ids=lambda kw: ",".join(kw))
  def test_static_masks(self, kw):
    inp = testing.attention_inputs(_key("static", str(kw)), q_len=45,
                                   kv_len=53, num_kv_heads=2)
    self.check(inp, dtype=F32, **kw)

  def test_block_sparse_per_head(self):
    rng = np.random.default_rng(0)
    layout = rng.random((4, 4, 4)) < 0.5
    layout[:, :, 0] = True  # every row keeps one block
    mask = masks.BlockSparse(layout, (16, 16)) & masks.Causal()
    inp = testing.attention_inputs(_key("bs"), q_len=64, kv_len=64,
                                   num_kv_heads=2)
    self.check(inp, dtype=F32, mask=mask)

  def test_dense_mask_array(self):
    if not self.supports_mask_array:
      pytest.skip("backend has no dense mask input")
    inp = testing.attention_inputs(_key("dense"), q_len=29, kv_len=31)
    m = jax.random.bernoulli(_key("dm"), 0.6, (2, 1, 29, 31))
    self.check(inp, dtype=F32, arrays={"mask": m}, is_causal=True)

  @pytest.mark.parametrize("shape", [(2, 4, 29, 31), (1, 4, 1, 31),
                                     (29, 31)])
  def test_bias(self, shape):
    if not self.supports_bias:
      pytest.skip("backend has no bias input")
    inp = testing.attention_inputs(_key("bias", shape), q_len=29, kv_len=31)
    bias = jax.random.normal(_key("b", shape), shape)
    self.check(inp, dtype=F32, bias=bias)

  def test_segment_ids_self(self):
    inp = testing.attention_inputs(_key("seg"), q_len=47)
    seg = testing.random_segment_ids(_key("ids"), 2, 47, 4)
    self.check(inp, dtype=F32, arrays={"segment_ids": seg}, is_causal=True)

  def test_segment_ids_cross(self):
    inp = testing.attention_inputs(_key("segx"), q_len=23, kv_len=41)
    qs = testing.random_segment_ids(_key("qi"), 2, 23, 3)
    ks = testing.random_segment_ids(_key("ki"), 2, 41, 3)
    self.check(inp, dtype=F32, arrays={"segment_ids": (qs, ks)})

  def test_seq_lengths(self):
    inp = testing.attention_inputs(_key("len"), q_len=33, kv_len=40)
    arrays = {"q_lengths": jnp.array([33, 20], jnp.int32),
              "kv_lengths": jnp.array([17, 40], jnp.int32)}
    out, _ = self.check(inp, dtype=F32, arrays=arrays)
    np.testing.assert_array_equal(np.asarray(out[1, 20:]), 0.0)

  def test_sinks(self):
    inp = testing.attention_inputs(_key("sinks"), num_kv_heads=2)
    sinks = jax.random.normal(_key("s"), (4,)) * 2
    self.check(inp, dtype=F32, sinks=sinks, is_causal=True)

  def test_soft_cap(self):
    inp = testing.attention_inputs(_key("cap"))
    self.check(inp, dtype=F32, logits_soft_cap=2.5, local_window_size=(9, 2))

  def test_everything_at_once(self):
    inp = testing.attention_inputs(_key("all"), q_len=51, kv_len=51,
                                   num_heads=6, num_kv_heads=3)
    seg = testing.random_segment_ids(_key("alls"), 2, 51, 3)
    sinks = jax.random.normal(_key("allk"), (6,))
    self.check(inp, dtype=F32, sinks=sinks, logits_soft_cap=5.0,
               arrays={"segment_ids": seg,
                       "kv_lengths": jnp.array([51, 40], jnp.int32)},
               is_causal=True, local_window_size=(20, 0))

  # Edge semantics -----------------------------------------------------------

  def test_fully_masked_rows_are_zero(self):
    # Rows 0-9 of batch 0 see nothing (their segment id appears in no key).
    inp = testing.attention_inputs(_key("empty"), q_len=24, kv_len=24)
    qs = jnp.zeros((2, 24), jnp.int32).at[0, :10].set(7)
    ks = jnp.zeros((2, 24), jnp.int32)
    p, _ = make_problem(inp.q, inp.k, inp.v, segment_ids=(qs, ks))
    out, lse = type(self).impl(p)
    np.testing.assert_array_equal(np.asarray(out[0, :10], np.float32), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[0, :, :10])))

    def loss(q, k, v):
      p, _ = make_problem(q, k, v, segment_ids=(qs, ks))
      o, _ = type(self).impl(p)
      return jnp.sum(o.astype(F32) * inp.d_out.astype(F32))

    dq, dk, dv = jax.grad(loss, (0, 1, 2))(inp.q, inp.k, inp.v)
    testing.assert_finite((dq, dk, dv), "grads")
    np.testing.assert_array_equal(np.asarray(dq[0, :10], np.float32), 0.0)
    self.check(inp, dtype=F32, arrays={"segment_ids": (qs, ks)})

  def test_fully_masked_with_sinks(self):
    inp = testing.attention_inputs(_key("emptys"), q_len=16, kv_len=16)
    qs = jnp.zeros((2, 16), jnp.int32).at[1, 3:8].set(5)
    sinks = jnp.linspace(-1.0, 1.0, 4)
    self.check(inp, dtype=F32, sinks=sinks,
               arrays={"segment_ids": (qs, jnp.zeros((2, 16), jnp.int32))})

  def test_large_logits(self):
    inp = testing.attention_inputs(_key("large"), q_len=31, head_dim=16)
    big = testing.AttentionInputs(inp.q * 100.0, inp.k * 100.0, inp.v,
                                  inp.d_out)
    # Logits reach ~1e4: the softmax must stay finite, and match the reference
    # to float32 rounding of logits that large (tolerance scaled by 1e3).
    out, lse = self.check(big, dtype=F32, is_causal=True, grads=False,
                          scale=1e3)
    assert float(jnp.max(jnp.abs(lse))) > 1e3

  @pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
  def test_low_precision(self, dtype):
    if dtype not in self.dtypes:
      pytest.skip(f"backend does not support {dtype}")
    inp = testing.attention_inputs(_key("lp", str(dtype)), q_len=40,
                                   num_kv_heads=2, dtype=dtype)
    self.check(inp, dtype=dtype, is_causal=True)

  # Transformations ----------------------------------------------------------

  def test_jit_and_determinism(self):
    inp = testing.attention_inputs(_key("jit"))
    impl = type(self).impl

    @functools.partial(jax.jit, static_argnames="causal")
    def f(q, k, v, causal):
      return impl(make_problem(q, k, v, is_causal=causal)[0])

    a = f(inp.q, inp.k, inp.v, True)
    b = f(inp.q, inp.k, inp.v, True)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    ref = xla_backend.xla_attention(make_problem(inp.q, inp.k, inp.v,
                                                 is_causal=True)[0])
    testing.assert_close(a[0], ref[0], F32)

  def test_vmap(self):
    inp = testing.attention_inputs(_key("vmap"), batch=3, q_len=20)
    impl = type(self).impl
    f = lambda q, k, v: impl(make_problem(q, k, v, is_causal=True)[0])[0]
    got = jax.vmap(f)(inp.q[:, None], inp.k[:, None], inp.v[:, None])[:, 0]
    want = f(inp.q, inp.k, inp.v)
    testing.assert_close(got, want, F32)
    gv = jax.vmap(jax.grad(lambda q, k, v: f(q, k, v).sum()))(
        inp.q[:, None], inp.k[:, None], inp.v[:, None])[:, 0]
    g = jax.grad(lambda q, k, v: f(q, k, v).sum())(inp.q, inp.k, inp.v)
    testing.assert_close(gv, g, F32, grad=True)
