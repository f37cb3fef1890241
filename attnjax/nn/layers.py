"""Small building blocks: RMSNorm, SwiGLU, rotary embeddings, short conv.

Each is a few lines of ``jnp`` computed in float32 where rounding matters
(norm statistics, rotary angles), returning the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["RMSNorm", "ShortConv", "SwiGLU", "apply_rope", "rope_angles"]


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation over the last axis (arXiv:1910.07467).

  ``y = x / sqrt(mean(x**2) + eps) * scale``, statistics in float32.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from attnjax.nn import RMSNorm
  >>> norm = RMSNorm(8, rngs=nnx.Rngs(0))
  >>> norm(jnp.ones((2, 8))).shape
  (2, 8)
  """

  def __init__(self, num_features: int, *, eps: float = 1e-6,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform constructor
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * inv * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _default_hidden(d_model: int) -> int:
  # LLaMA's choice: 2/3 of 4 * d (same parameter count as a 4x GELU MLP),
  # rounded up to a multiple of 8.
  return 8 * math.ceil(8 * d_model / 3 / 8)


class SwiGLU(nnx.Module):
  """Gated MLP ``(silu(x W1) * (x W3)) W2`` (Shazeer, arXiv:2002.05202).

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from attnjax.nn import SwiGLU
  >>> mlp = SwiGLU(16, rngs=nnx.Rngs(0))
  >>> mlp(jnp.ones((2, 3, 16))).shape
  (2, 3, 16)
  """

  def __init__(self, d_model: int, hidden: int | None = None, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    hidden = _default_hidden(d_model) if hidden is None else hidden
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.w_gate = lin(d_model, hidden)
    self.w_up = lin(d_model, hidden)
    self.w_down = lin(hidden, d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


def rope_angles(positions: jax.Array, head_dim: int,
                base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each float32 [..., head_dim // 2], for integer positions."""
  if head_dim % 2:
    raise ValueError(f"rope needs an even head_dim, got {head_dim}")
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                      / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array,
               base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoFormer, arXiv:2104.09864).

  Rotates the pairs ``(x[..., i], x[..., i + H/2])`` by ``position * base **
  (-2i / H)`` (the "rotate half" layout used by LLaMA).

  Args:
    x: [B, T, N, H].
    positions: int [B, T] (or [T]) absolute positions.
    base: the frequency base.

  Returns:
    x rotated, same shape and dtype.

  Example:

  >>> import jax.numpy as jnp
  >>> from attnjax.nn import apply_rope
  >>> x = jnp.ones((1, 4, 2, 8))
  >>> apply_rope(x, jnp.arange(4)).shape
  (1, 4, 2, 8)
  """
  h = x.shape[-1]
  cos, sin = rope_angles(positions, h, base)
  if positions.ndim == 1:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : h // 2], xf[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class ShortConv(nnx.Module):
  """Causal depthwise 1-D convolution over time (the "short convolution").

  Used in front of linear attention by H3, BASED, GLA and DeltaNet: it lets a
  token's key depend on its few predecessors, which recurrent layers without
  a sharp decay cannot otherwise do. ``y_t = sum_i w_i * x_{t - k + 1 + i}``.

  ``state`` (for decoding) holds the last ``kernel_size - 1`` inputs.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from attnjax.nn import ShortConv
  >>> conv = ShortConv(6, kernel_size=3, rngs=nnx.Rngs(0))
  >>> y, state = conv(jnp.ones((2, 5, 6)))
  >>> y.shape, state.shape
  ((2, 5, 6), (2, 2, 6))
  """

  def __init__(self, channels: int, kernel_size: int = 4, *,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kernel_size < 1:
      raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    self.kernel_size = kernel_size
    # Start near the identity (weight 1 on the current token) so the layer
    # initially behaves as if there were no convolution.
    w = 0.02 * jax.random.normal(rngs.params(), (kernel_size, channels),
                                 jnp.float32)
    w = w.at[-1].add(1.0)
    self.weight = nnx.Param(w.astype(param_dtype))

  def init_state(self, batch_size: int, channels: int, dtype) -> jax.Array:
    return jnp.zeros((batch_size, self.kernel_size - 1, channels), dtype)

  def __call__(self, x: jax.Array, state: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """x [B, T, C], state [B, k - 1, C] (zeros = sequence start)."""
    k = self.kernel_size
    if state is None:
      state = self.init_state(x.shape[0], x.shape[-1], x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    w = self.weight[...].astype(x.dtype)
    t = x.shape[1]
    y = sum(w[i] * xp[:, i:i + t] for i in range(k))
    return y, xp[:, xp.shape[1] - (k - 1):]
