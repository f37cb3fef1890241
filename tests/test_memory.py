"""Peak memory of xla_chunked grows linearly in T (compile-time analysis).

Rabe & Staats report that chunking cuts self-attention's memory overhead at
T = 16384 by 59x for inference and 32x for differentiation; docs/memory.md
records our ratios (python -m attnjax.bench --suite memory regenerates them).
"""

import jax
import jax.numpy as jnp
import pytest

import attnjax


def temp_bytes(impl, t, grad):
  s = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
  f = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl).sum()
  if grad:
    f = jax.grad(f, (0, 1, 2))
  return jax.jit(f).lower(s, s, s).compile().memory_analysis(
  ).temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
def test_chunked_memory_is_linear_and_reference_quadratic(grad):
  small, large = 4096, 16384  # 4x longer
  chunked = [temp_bytes("xla_chunked", t, grad) for t in (small, large)]
  dense = [temp_bytes("xla", t, grad) for t in (small, large)]
  # Linear: 4x the length costs at most ~4x the scratch memory.
  assert chunked[1] <= 4.4 * chunked[0], chunked
  # The materialised reference is quadratic: ~16x.
  assert dense[1] >= 12 * dense[0], dense
  # And at T = 16384 the chunked form needs a small fraction of it.
  assert dense[1] >= 50 * chunked[1], (dense, chunked)
