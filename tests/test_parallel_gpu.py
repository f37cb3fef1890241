"""Sequence parallelism on real GPUs (``pytest -m gpu``).

bf16 inputs, the platform's fastest kernels as the block computation,
against the float32 materialised reference on one GPU. Tests needing two
GPUs skip on a one-GPU machine.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax
from attnjax import parallel, testing
from attnjax.parallel import _plan
from attnjax.softmax import api as softmax_api
from attnjax.softmax import pallas_mosaic
from attnjax.softmax.problem import make_problem

pytestmark = pytest.mark.gpu
BF16, F32 = jnp.bfloat16, jnp.float32


def _key(*parts):
  return jax.random.key(zlib.crc32(repr(parts).encode()))


def _gpu_mesh(n=2):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} GPUs")
  return Mesh(np.array(jax.devices()[:n]), ("seq",),
              axis_types=(AxisType.Auto,))


def _ref_vjp(q, k, v, d_out, d_lse=None, **kw):
  f = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, return_residuals=True, implementation="xla", **kw)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  d_lse = jnp.zeros_like(lse) if d_lse is None else d_lse
  return out, lse, vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0)))


@pytest.mark.parametrize("impl", ["pallas_mosaic_gpu", "pallas_triton"])
def test_residual_backward_at_global_residuals(impl):
  """A block of keys' gradients from the whole problem's (out, lse)."""
  hopper = pallas_mosaic._on_hopper()  # noqa: SLF001
  if impl == "pallas_mosaic_gpu" and not hopper:
    pytest.skip("pallas_mosaic_gpu needs an sm_90 GPU")
  inp = testing.attention_inputs(_key(impl), batch=1, q_len=2048,
                                 kv_len=4096, num_heads=8, num_kv_heads=2,
                                 head_dim=128, dtype=BF16)
  up = lambda x: x.astype(F32)
  out, lse, want = jax.jit(lambda *a: _ref_vjp(*a, is_causal=True))(
      up(inp.q), up(inp.k), up(inp.v), up(inp.d_out))
  bwd = softmax_api.load_backward(impl)

  @jax.jit
  def blocks(q, k, v, out, lse, d_out):
    dq, dks, dvs = 0.0, [], []
    for a, b in ((0, 1024), (1024, 4096)):
      mask = _plan.band_mask(_plan.Band(None, 0).shift(a))
      p, _ = make_problem(q, k[:, a:b], v[:, a:b], mask=mask)
      g = bwd(p, out, lse, d_out)
      dq = dq + g[0].astype(F32)
      dks.append(g[1])
      dvs.append(g[2])
    return dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)

  got = blocks(inp.q, inp.k, inp.v, out.astype(BF16), lse, inp.d_out)
  testing.assert_close(got, want, BF16, grad=True)


def _check_sp(mesh, strategy, lb, *, t=8192, n=8, k=2, **kw):
  impl = kw.pop("implementation", None)
  inp = testing.attention_inputs(_key(strategy, lb, t, n, k, sorted(kw)),
                                 batch=1, q_len=t, num_heads=n,
                                 num_kv_heads=k, head_dim=128, dtype=BF16)
  seq = NamedSharding(mesh, P(None, "seq"))
  args = [jax.device_put(x, seq) for x in (inp.q, inp.k, inp.v, inp.d_out)]

  @jax.jit
  def run(q, k_, v, do):
    f = lambda q, k_, v: parallel.sequence_parallel_attention(
        q, k_, v, mesh=mesh, strategy=strategy, load_balance=lb,
        implementation=impl, **kw)
    out, vjp = jax.vjp(f, q, k_, v)
    return out, vjp(do)

  out, grads = run(*args)
  up = lambda x: x.astype(F32)
  out_r, _, grads_r = jax.jit(lambda *a: _ref_vjp(*a, **kw))(
      up(inp.q), up(inp.k), up(inp.v), up(inp.d_out))
  testing.assert_close(out, out_r, BF16, name="out")
  testing.assert_close(grads, grads_r, BF16, grad=True, name="grads")


@pytest.mark.parametrize("strategy,lb", [("ring", True), ("ring", False),
                                         ("ulysses", False),
                                         ("all_gather", True)])
def test_two_gpus_causal(strategy, lb):
  _check_sp(_gpu_mesh(2), strategy, lb, is_causal=True)


@pytest.mark.parametrize("impl", [None, "pallas_triton"])
def test_two_gpus_ring_window_segments_sinks(impl):
  mesh = _gpu_mesh(2)
  seg = testing.random_segment_ids(_key("seg"), 1, 8192, 3)
  _check_sp(mesh, "ring", True, is_causal=True, local_window_size=(3000, 0),
            segment_ids=seg, sinks=jnp.linspace(-1.0, 1.0, 8),
            logits_soft_cap=30.0, implementation=impl)


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "all_gather"])
def test_four_gpus_causal(strategy):
  _check_sp(_gpu_mesh(4), strategy, True, t=16384, is_causal=True)
