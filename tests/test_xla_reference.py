"""The oracle itself: ``implementation="xla"`` (pallas_kernels/flash/
reference.py through make_problem's masks) against a float64 NumPy
attention that shares no code with it, forward (out, lse) and backward
(the analytic softmax-attention gradients written out by hand, not
autodiff), on every feature: bias, dense masks, is_causal, local windows,
segment ids, query/key lengths, sinks, logits soft cap, GQA, rows with
nothing visible. (``tests/test_api.py`` compares the forward with
``jax.nn``.) Every kernel's suite compares against this oracle, so it is
checked here rather than against itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import testing

F32 = jnp.float32


def numpy_attention(q, k, v, d_out, *, scale, bias=None, vis=None,
                    q_seg=None, kv_seg=None, q_len=None, kv_len=None,
                    sinks=None, cap=None):
  """float64 forward and hand-written backward.

  vis: bool [T, S] (or None) shared by every batch and head. Returns
  ``(out, lse, grads)`` with grads a dict of dq, dk, dv, dbias (summed to
  bias's shape) and dsinks.
  """
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  b, t, n, _ = q.shape
  _, s, kh, hv = v.shape
  g = n // kh
  out = np.zeros((b, t, n, hv))
  lse = np.full((b, n, t), -np.inf)
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  dbias_full = np.zeros((b, n, t, s))
  dsinks = np.zeros(n)
  bias_full = (None if bias is None else
               np.broadcast_to(np.asarray(bias, np.float64), (b, n, t, s)))
  for bi in range(b):
    rows = np.arange(t) < (t if q_len is None else q_len[bi])
    keys = np.arange(s) < (s if kv_len is None else kv_len[bi])
    visible = rows[:, None] & keys[None, :]
    if vis is not None:
      visible = visible & vis
    if q_seg is not None:
      visible = visible & (np.asarray(q_seg)[bi][:, None]
                           == np.asarray(kv_seg)[bi][None, :])
    for ni in range(n):
      kv = ni // g
      qm, km, vm = q[bi, :, ni], k[bi, :, kv], v[bi, :, kv]
      raw = scale * qm @ km.T
      if bias_full is not None:
        raw = raw + bias_full[bi, ni]
      logits = cap * np.tanh(raw / cap) if cap is not None else raw
      masked = np.where(visible, logits, -np.inf)
      m = masked.max(axis=1)
      if sinks is not None:
        m = np.maximum(m, sinks[ni])
      m = np.where(np.isfinite(m), m, 0.0)
      e = np.where(visible, np.exp(masked - m[:, None]), 0.0)
      denom = e.sum(axis=1)
      p_sink = np.zeros(t)
      if sinks is not None:
        sink_e = np.exp(sinks[ni] - m)
        denom = denom + sink_e
      safe = np.where(denom > 0, denom, 1.0)
      if sinks is not None:
        p_sink = np.where(rows, sink_e / safe, 0.0)
      p = e / safe[:, None]
      o = np.where(rows[:, None], p @ vm, 0.0)
      out[bi, :, ni] = o
      lse[bi, ni] = np.where(rows & (denom > 0), np.log(safe) + m, -np.inf)
      # Backward of sum(out * d_out): rows past q_len carry no gradient.
      do = np.where(rows[:, None], d_out[bi, :, ni], 0.0)
      dp = do @ vm.T
      delta = (do * o).sum(axis=1)
      ds = p * (dp - delta[:, None])
      dbias_full[bi, ni] = ds
      if cap is not None:
        ds = ds * (1.0 - np.tanh(raw / cap) ** 2)
        dbias_full[bi, ni] = ds
      dq[bi, :, ni] += scale * ds @ km
      dk[bi, :, kv] += scale * ds.T @ qm
      dv[bi, :, kv] += p.T @ do
      dsinks[ni] -= (p_sink * delta).sum()
  grads = dict(dq=dq, dk=dk, dv=dv, dsinks=dsinks)
  if bias is not None:
    shape = np.shape(bias)
    axes = tuple(i for i, (a, full) in enumerate(zip(shape, (b, n, t, s)))
                 if a == 1 and full != 1)
    grads["dbias"] = dbias_full.sum(axis=axes, keepdims=True).reshape(shape)
  return out, lse, grads


def _attnjax_with_grads(inp, d_out, kw, bias=None, sinks=None):
  """out, lse and autodiff of sum(out * d_out) through the public API."""
  def loss(q, k, v, bias, sinks):
    out, lse = attnjax.dot_product_attention(
        q, k, v, bias, sinks=sinks, implementation="xla",
        return_residuals=True, **kw)
    return jnp.sum(out * d_out), (out, lse)

  argnums = (0, 1, 2) + ((3,) if bias is not None else ()) + (
      (4,) if sinks is not None else ())
  grads, (out, lse) = jax.grad(loss, argnums=argnums, has_aux=True)(
      inp.q, inp.k, inp.v, bias, sinks)
  names = ["dq", "dk", "dv"] + (["dbias"] if bias is not None else []) + (
      ["dsinks"] if sinks is not None else [])
  return out, lse, dict(zip(names, grads))


def _compare(got, want):
  out, lse, grads = got
  out_w, lse_w, grads_w = want
  testing.assert_close(out, out_w, F32, name="out")
  lse, lse_w = np.asarray(lse), np.asarray(lse_w)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_w))
  finite = np.isfinite(lse_w)
  testing.assert_close(lse[finite], lse_w[finite], F32, name="lse")
  for name, a in grads.items():
    testing.assert_finite(a, name)
    e = grads_w[name]
    scale = float(np.max(np.abs(e))) if name in ("dbias", "dsinks") else None
    testing.assert_close(a, e, F32, grad=True, name=name, scale=scale)


T, S = 23, 31
CASES = {
    "plain": dict(),
    "bias_and_dense_mask": dict(bias=True, dense=True),
    "causal_gqa": dict(causal=True, kvh=2),
    "window": dict(window=(4, 2)),
    "segments_and_lengths": dict(segments=True, lengths=True),
    "sinks_soft_cap_mqa": dict(sinks=True, cap=2.5, kvh=1),
    "everything": dict(bias=True, dense=True, window=(6, 0), segments=True,
                       lengths=True, sinks=True, cap=3.0, kvh=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_numpy(case):
  c = CASES[case]
  s = T if (c.get("causal") or c.get("window")) else S
  inp = testing.attention_inputs(jax.random.key(len(case)), batch=2,
                                 q_len=T, kv_len=s, num_heads=4,
                                 num_kv_heads=c.get("kvh", 4), head_dim=16,
                                 dtype=F32)
  ks = jax.random.split(jax.random.key(100 + len(case)), 5)
  d_out = jax.random.normal(ks[0], inp.q.shape[:3] + (inp.v.shape[-1],))
  kw, ref_kw = {}, dict(scale=1.0 / np.sqrt(16))
  vis = np.ones((T, s), bool)
  bias = sinks = None
  if c.get("bias"):
    bias = jax.random.normal(ks[1], (1, 4, T, s)) * 2
    ref_kw["bias"] = np.asarray(bias)
  if c.get("dense"):
    dense = np.array(jax.random.bernoulli(ks[2], 0.8, (T, s)))
    dense[3] = False  # a row with nothing visible
    kw["mask"] = jnp.asarray(dense)[None, None]
    vis &= dense
  if c.get("causal"):
    kw["is_causal"] = True
    vis &= np.tril(np.ones((T, s), bool))
  if c.get("window"):
    left, right = c["window"]
    kw["local_window_size"] = (left, right)
    i, j = np.arange(T)[:, None], np.arange(s)[None, :]
    vis &= (j >= i - left) & (j <= i + right)
  if c.get("segments"):
    q_seg = np.asarray(testing.random_segment_ids(ks[3], 2, T, 3))
    kv_seg = q_seg if s == T else np.concatenate(
        [q_seg, np.full((2, s - T), 7, np.int32)], 1)
    kw["segment_ids"] = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    ref_kw.update(q_seg=q_seg, kv_seg=kv_seg)
  if c.get("lengths"):
    q_len, kv_len = np.array([T, 15]), np.array([s - 2, 9])
    kw["query_seq_lengths"] = jnp.asarray(q_len, jnp.int32)
    kw["key_value_seq_lengths"] = jnp.asarray(kv_len, jnp.int32)
    ref_kw.update(q_len=q_len, kv_len=kv_len)
  if c.get("sinks"):
    sinks = jax.random.normal(ks[4], (4,))
    ref_kw["sinks"] = np.asarray(sinks, np.float64)
  if c.get("cap"):
    kw["logits_soft_cap"] = c["cap"]
    ref_kw["cap"] = c["cap"]
  got = _attnjax_with_grads(inp, d_out, kw, bias, sinks)
  want = numpy_attention(inp.q, inp.k, inp.v, d_out, vis=vis, **ref_kw)
  _compare(got, want)
  if c.get("dense") and not c.get("sinks"):
    # The row with nothing visible: zeros, lse = -inf, zero gradient.
    np.testing.assert_array_equal(np.asarray(got[0][:, 3]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1][:, :, 3])))
    np.testing.assert_array_equal(np.asarray(got[2]["dq"][:, 3]), 0.0)


def test_numpy_oracle_gradients_match_finite_differences():
  # The hand-written backward above, checked once by central differences
  # in float64 (sinks, soft cap, bias, GQA at once).
  rng = np.random.default_rng(0)
  b, t, s, n, kh, h = 1, 5, 6, 2, 1, 3
  q, k, v = (rng.normal(size=sh) for sh in ((b, t, n, h), (b, s, kh, h),
                                            (b, s, kh, h)))
  d_out = rng.normal(size=(b, t, n, h))
  bias = rng.normal(size=(1, n, t, s))
  sinks = rng.normal(size=n)
  kw = dict(scale=0.7, cap=1.5, vis=np.tril(np.ones((t, s), bool), 1),
            q_len=np.array([4]))

  def loss(q, k, v, bias, sinks):
    out, _, _ = numpy_attention(q, k, v, d_out, bias=bias, sinks=sinks, **kw)
    return float((out * d_out).sum())

  _, _, grads = numpy_attention(q, k, v, d_out, bias=bias, sinks=sinks, **kw)
  args = dict(q=q, k=k, v=v, bias=bias, sinks=sinks)
  for name, x in args.items():
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      hi, lo = x.copy(), x.copy()
      hi[idx] += 1e-6
      lo[idx] -= 1e-6
      fd[idx] = (loss(**{**args, name: hi}) - loss(**{**args, name: lo})) / 2e-6
    np.testing.assert_allclose(grads["d" + name], fd, rtol=1e-5, atol=1e-7,
                               err_msg=name)
