"""Test helpers shared by every attnjax test: tolerances and input factories.

One tolerance table keyed by dtype; tests never write bare tolerance numbers.
Comparisons upcast to float32 and check ``|a - e| <= atol + rtol * |e|``
elementwise, with NaN never passing. Gradients use ``grad=True`` (twice the
forward tolerance, since they pass through one more matmul and the
probabilities' rounding).

Example:

>>> import jax.numpy as jnp
>>> from attnjax import testing
>>> testing.assert_close(jnp.ones(3), jnp.ones(3) + 1e-7, jnp.float32)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ATOL",
    "AttentionInputs",
    "assert_close",
    "assert_finite",
    "attention_inputs",
    "tolerance",
]

# Absolute tolerance for O(1) values computed in each input dtype, against a
# float32 reference evaluated on the same (upcast) inputs.
ATOL = {
    np.dtype(jnp.float32): 1e-5,
    np.dtype(jnp.bfloat16): 2e-2,
    np.dtype(jnp.float16): 2e-3,
}


def tolerance(dtype, *, grad: bool = False) -> tuple[float, float]:
  """(atol, rtol) for results computed in ``dtype``."""
  atol = ATOL[np.dtype(dtype)] * (2.0 if grad else 1.0)
  return atol, atol / 10


def assert_finite(x, name: str = "value") -> None:
  """Fails if any leaf of x holds NaN or inf."""
  for i, leaf in enumerate(jax.tree.leaves(x)):
    arr = np.asarray(jnp.asarray(leaf, jnp.float32))
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.isfinite(arr).sum())
      raise AssertionError(f"{name} (leaf {i}) has {bad} non-finite entries")


def assert_close(actual, expected, dtype, *, grad: bool = False,
                 name: str = "value", scale: float | None = None) -> None:
  """Elementwise closeness of two pytrees under the dtype's tolerance.

  Args:
    actual, expected: pytrees of arrays (expected is the reference).
    dtype: the dtype the computation under test ran in.
    grad: compare gradients (twice the forward tolerance).
    name: what is compared, for the message.
    scale: magnitude the tolerance applies to (default: 1, i.e. values are
      O(1)); pass e.g. the reference's max for quantities that are larger.
  """
  atol, rtol = tolerance(dtype, grad=grad)
  a_leaves, e_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
  if len(a_leaves) != len(e_leaves):
    raise AssertionError(f"{name}: {len(a_leaves)} leaves vs "
                         f"{len(e_leaves)}")
  for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    e = np.asarray(jnp.asarray(e, jnp.float32))
    if a.shape != e.shape:
      raise AssertionError(f"{name} (leaf {i}): shape {a.shape} vs {e.shape}")
    if np.isnan(a).any():
      raise AssertionError(f"{name} (leaf {i}): NaN in result")
    s = 1.0 if scale is None else max(float(scale), 1.0)
    both_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    with np.errstate(invalid="ignore"):
      err = np.where(both_inf, 0.0, np.abs(a - e))
      bound = atol * s + rtol * np.where(both_inf, 0.0, np.abs(e))
    bad = ~(err <= bound)
    if bad.any():
      idx = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)),
                             a.shape)
      raise AssertionError(
          f"{name} (leaf {i}): {int(bad.sum())}/{a.size} entries differ; "
          f"worst at {idx}: {a[idx]} vs {e[idx]} (atol={atol * s:g}, "
          f"rtol={rtol:g}); max abs err {float(err.max()):g}")


@dataclasses.dataclass
class AttentionInputs:
  """Random softmax-attention inputs (arrays in ``dtype``)."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  d_out: jax.Array  # a random output cotangent, for VJP checks


def attention_inputs(key, *, batch=2, q_len=37, kv_len=None, num_heads=4,
                     num_kv_heads=None, head_dim=32, value_head_dim=None,
                     dtype=jnp.float32, unbatched=False) -> AttentionInputs:
  """Fresh N(0, 1) q, k, v (and a cotangent) for the given shape.

  Defaults are deliberately odd-sized (T=37) so no length is a multiple of a
  block.
  """
  kv_len = q_len if kv_len is None else kv_len
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  value_head_dim = head_dim if value_head_dim is None else value_head_dim
  kq, kk, kv, kd = jax.random.split(key, 4)
  lead = () if unbatched else (batch,)
  q = jax.random.normal(kq, lead + (q_len, num_heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, lead + (kv_len, num_kv_heads, head_dim),
                        jnp.float32)
  v = jax.random.normal(kv, lead + (kv_len, num_kv_heads, value_head_dim),
                        jnp.float32)
  d = jax.random.normal(kd, lead + (q_len, num_heads, value_head_dim),
                        jnp.float32)
  return AttentionInputs(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                         d.astype(dtype))


def random_segment_ids(key, batch: int, length: int, num_segments: int = 3):
  """Sorted segment ids [B, T] (packed documents), int32."""
  cuts = jax.random.randint(key, (batch, length), 0, length) < (
      num_segments - 1)
  return jnp.cumsum(cuts.astype(jnp.int32), axis=1)
