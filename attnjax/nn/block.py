"""``attnjax.nn.TransformerBlock``: pre-norm mixer + SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import RMSNorm, SwiGLU
from attnjax.nn.linear import LinearAttention

__all__ = ["KINDS", "TransformerBlock"]

# Pattern letters of attnjax.models.LanguageModel.
KINDS = {"A": "softmax attention", "L": "linear attention",
         "W": "sliding-window attention"}


class TransformerBlock(nnx.Module):
  """``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (pre-norm, RMSNorm).

  Args:
    kind: "A" (softmax attention), "L" (linear attention) or "W"
      (sliding-window softmax attention).
    d_model: width D.
    num_heads: heads of the mixer.
    mlp_hidden: SwiGLU hidden width (default about 8/3 D); 0 drops the MLP.
    window_size: keys before the query a "W" layer sees.
    attention_kwargs: extra ``MultiHeadAttention`` arguments ("A", "W").
    linear_kwargs: extra ``LinearAttention`` arguments ("L").
    dtype, param_dtype: computation and parameter dtypes.
    rngs: ``nnx.Rngs``.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import attnjax.nn
  >>> block = attnjax.nn.TransformerBlock(
  ...     "A", d_model=32, num_heads=4, attention_kwargs={"rope": True},
  ...     rngs=nnx.Rngs(0))
  >>> block(jnp.ones((2, 7, 32))).shape
  (2, 7, 32)
  """

  def __init__(self, kind: str, *, d_model: int, num_heads: int,
               mlp_hidden: int | None = None, window_size: int = 64,
               attention_kwargs: Mapping[str, Any] | None = None,
               linear_kwargs: Mapping[str, Any] | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    self.kind = kind
    common = dict(in_features=d_model, num_heads=num_heads, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
    if kind == "L":
      self.mixer = LinearAttention(**common, **dict(linear_kwargs or {}))
    else:
      kw = dict(attention_kwargs or {})
      if kind == "W":
        kw["local_window_size"] = window_size
      self.mixer = MultiHeadAttention(**common, **kw)
    self.norm1 = RMSNorm(d_model, param_dtype=param_dtype)
    if mlp_hidden == 0:
      self.norm2 = nnx.data(None)
      self.mlp = nnx.data(None)
    else:
      self.norm2 = RMSNorm(d_model, param_dtype=param_dtype)
      self.mlp = SwiGLU(d_model, mlp_hidden, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

  def _mlp(self, x):
    return x if self.mlp is None else x + self.mlp(self.norm2(x))

  def __call__(self, x: jax.Array, *, positions=None,
               segment_ids=None) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    x = x + self.mixer(self.norm1(x), positions=positions,
                       segment_ids=segment_ids).astype(x.dtype)
    return self._mlp(x)

  def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
    """The mixer's cache (KVCache or LinearCache)."""
    return self.mixer.init_cache(batch_size, max_length, dtype)

  def decode(self, x: jax.Array, cache):
    """x [B, Tn, D] from ``cache``: returns (y [B, Tn, D], new cache)."""
    y, cache = self.mixer.decode(self.norm1(x), cache)
    return self._mlp(x + y.astype(x.dtype)), cache

  def attention_weights(self, x: jax.Array) -> jax.Array | None:
    """The mixer's attention weights [B, N, T, T] (None for "L" layers)."""
    if self.kind == "L":
      return None
    return self.mixer.attention_weights(self.norm1(x))
