"""CPU checks that sequence parallelism lowers for GPUs, and doc examples.

The ring (forward and its custom backward pass) with the Hopper kernels as
the block computation is exported for an abstract mesh of two H100s: this
catches shard_map, collective and Pallas Mosaic GPU lowering errors before a
GPU run. The residual backward adapters lower on their own too.
"""

from __future__ import annotations

import doctest
import importlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice
from jax.sharding import AxisType

from attnjax import parallel
from attnjax.parallel import _plan
from attnjax.softmax import pallas_mosaic, residual_bwd
from attnjax.softmax.problem import make_problem

_H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                       platform="gpu")
_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name) for name in (
    "mosaic_gpu_v2", "mosaic_gpu", "__gpu$xla.gpu.triton")]


def _export(mesh, f, *args):
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(f), platforms=["cuda"],
                             disabled_checks=_CHECKS)(*args).mlir_module()


def test_ring_with_mosaic_blocks_lowers_for_two_h100(monkeypatch):
  # The backend checks for a local sm_90 device; the export targets one.
  monkeypatch.setattr(pallas_mosaic, "_on_hopper", lambda: True)
  mesh = jax.sharding.AbstractMesh((2,), ("seq",),
                                   axis_types=(AxisType.Auto,),
                                   abstract_device=_H100)

  def f(q, k, v, do):
    fn = lambda q, k, v: parallel.sequence_parallel_attention(
        q, k, v, mesh=mesh, strategy="ring", is_causal=True,
        implementation="pallas_mosaic_gpu")
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(do)

  x = jax.ShapeDtypeStruct((1, 2048, 4, 128), jnp.bfloat16)
  text = _export(mesh, f, x, x, x, x)
  assert "collective_permute" in text
  assert "all_gather" not in text
  # Forward: step 0 (one kernel) and step 1 (a two-way switch); backward:
  # the same calls with dK/dV + dQ kernels each, no forward recomputed.
  assert text.count("stablehlo.case") == 2


def test_mosaic_residual_backward_lowers():
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)

  def f(q, k, v, out, lse, do, dl):
    p, _ = make_problem(q, k, v, mask=_plan.band_mask(_plan.Band(None, 200)))
    return residual_bwd.mosaic_bwd_any_device(p, out, lse, do, dl)

  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  text = _export(mesh, f, sds((1, 700, 4, 128), bf), sds((1, 300, 2, 128), bf),
                 sds((1, 300, 2, 128), bf), sds((1, 700, 4, 128), bf),
                 sds((1, 4, 700), jnp.float32), sds((1, 700, 4, 128), bf),
                 sds((1, 4, 700), jnp.float32))
  # dK/dV and dQ kernels: exactly two Mosaic calls (the substring
  # "mosaic_gpu" also names attributes and the v2 target).
  assert len(re.findall(r"custom_call @mosaic_gpu\w*\(", text)) == 2, text


@pytest.mark.parametrize("module", [
    "attnjax.parallel.api", "attnjax.parallel.ring",
    "attnjax.parallel.ulysses", "attnjax.parallel.all_gather",
    "attnjax.parallel.lasp2"])
def test_docstring_examples(module):
  mod = importlib.import_module(module)
  result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result
