"""Test configuration: 8 fake CPU devices, deterministic GPU ops, markers."""

import importlib.util
import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_gpu_deterministic_ops" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_gpu_deterministic_ops=true"
# Without a CUDA plugin the tests run on CPU, where compile time dominates:
# skip LLVM's optimisation passes (numerics are unchanged; HLO-level buffer
# assignment, which the memory tests read, is unaffected).
_HAS_CUDA = any(importlib.util.find_spec(m) is not None
                for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))
if not _HAS_CUDA and "optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from hypothesis import settings  # noqa: E402

# JAX's deterministic profile for property tests (tests/pallas in jax-ml/jax).
settings.register_profile("attnjax", derandomize=True, deadline=None,
                          max_examples=25, database=None,
                          print_blob=True)
settings.load_profile("attnjax")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
  if on_gpu():
    return
  skip = pytest.mark.skip(
      reason="needs a CUDA GPU: run `pytest -m gpu` on a GPU machine")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
