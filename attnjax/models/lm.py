"""``attnjax.models.LanguageModel``: a decoder-only LM over a layer pattern.

One letter a layer: "A" softmax attention, "L" linear attention, "W"
sliding-window attention, so "LLLA" is a 3:1 linear:softmax hybrid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.block import KINDS, TransformerBlock
from attnjax.nn.layers import RMSNorm

__all__ = ["LanguageModel", "generate"]


class LanguageModel(nnx.Module):
  """Token embedding, a stack of ``TransformerBlock`` s, RMSNorm, logits.

  Args:
    vocab_size: V.
    d_model: width D.
    num_heads: heads per mixer.
    pattern: one letter per layer from "A", "L", "W" (e.g. "LLLA").
    rngs: ``nnx.Rngs``.
    num_kv_heads: key/value heads of attention layers (GQA).
    mlp_hidden: SwiGLU hidden width (default about 8/3 D; 0: no MLP).
    window_size: keys before the query a "W" layer sees.
    rope: rotary embeddings in attention layers (linear layers use none).
    tie_embeddings: output logits use the embedding matrix (scaled by
      ``1 / sqrt(D)``) instead of a separate head.
    attention_kwargs: extra ``attnjax.nn.MultiHeadAttention`` arguments
      (``qk_norm``, ``sinks``, ``output_gate``, ``normalization``,
      ``implementation``, ...).
    linear_kwargs: extra ``attnjax.nn.LinearAttention`` arguments
      (``feature_map``, ``gate``, ``decay``, ``short_conv``, ...).
    dtype, param_dtype: computation and parameter dtypes (logits are
      float32).

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from attnjax.models import LanguageModel
  >>> model = LanguageModel(vocab_size=50, d_model=32, num_heads=2,
  ...                       pattern="AW", window_size=4, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 9), jnp.int32)).shape
  (2, 9, 50)
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_heads: int,
               pattern: str, rngs: nnx.Rngs,
               num_kv_heads: int | None = None,
               mlp_hidden: int | None = None, window_size: int = 64,
               rope: bool = True, tie_embeddings: bool = False,
               attention_kwargs: Mapping[str, Any] | None = None,
               linear_kwargs: Mapping[str, Any] | None = None,
               dtype=None, param_dtype=jnp.float32):
    if not pattern or any(c not in KINDS for c in pattern):
      raise ValueError(f"pattern must be a non-empty string of {sorted(KINDS)}"
                       f" letters, got {pattern!r}")
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.pattern = pattern
    self.tie_embeddings = tie_embeddings
    self.dtype = dtype
    self.embed = nnx.Embed(
        vocab_size, d_model, param_dtype=param_dtype,
        embedding_init=jax.nn.initializers.normal(1.0), rngs=rngs)
    attn = dict(attention_kwargs or {})
    attn.setdefault("rope", rope)
    if num_kv_heads is not None:
      attn.setdefault("num_kv_heads", num_kv_heads)
    self.blocks = nnx.List([
        TransformerBlock(kind, d_model=d_model, num_heads=num_heads,
                         mlp_hidden=mlp_hidden, window_size=window_size,
                         attention_kwargs=attn, linear_kwargs=linear_kwargs,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for kind in pattern])
    self.norm = RMSNorm(d_model, param_dtype=param_dtype)
    self.lm_head = (nnx.data(None) if tie_embeddings else nnx.Linear(
        d_model, vocab_size, use_bias=False, param_dtype=param_dtype,
        rngs=rngs))

  def _embed(self, tokens):
    x = self.embed(tokens)
    return x if self.dtype is None else x.astype(self.dtype)

  def _logits(self, x):
    x = self.norm(x).astype(jnp.float32)
    if self.lm_head is None:
      table = self.embed.embedding[...].astype(jnp.float32)
      return x @ table.T / math.sqrt(self.d_model)
    w = self.lm_head.kernel[...].astype(jnp.float32)
    return x @ w

  def __call__(self, tokens: jax.Array, *, positions=None,
               segment_ids=None, logits_at=None) -> jax.Array:
    """int tokens [B, T] -> float32 logits [B, T, V].

    ``logits_at`` int [B, P]: return only those positions' logits
    [B, P, V] (sparse supervision, e.g. the answer slots of a recall task:
    the output layer then costs P / T of the dense one).
    """
    x = self._embed(tokens)
    for block in self.blocks:
      x = block(x, positions=positions, segment_ids=segment_ids)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
    """One cache per layer (a tuple)."""
    return tuple(b.init_cache(batch_size, max_length, dtype)
                 for b in self.blocks)

  def decode(self, tokens: jax.Array, cache):
    """tokens [B, Tn] appended to ``cache``: (logits [B, Tn, V], cache)."""
    x = self._embed(tokens)
    new = []
    for block, c in zip(self.blocks, cache, strict=True):
      x, c = block.decode(x, c)
      new.append(c)
    return self._logits(x), tuple(new)

  def attention_weights(self, tokens: jax.Array) -> list[jax.Array | None]:
    """Per layer: attention weights float32 [B, N, T, T] (None for "L")."""
    x = self._embed(tokens)
    out = []
    for block in self.blocks:
      out.append(block.attention_weights(x))
      x = block(x)
    return out


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 6))
def _generate(graphdef, state, prompt, max_new_tokens, temperature, rng,
              cache_dtype):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape
  cache = model.init_cache(b, p + max_new_tokens, cache_dtype)

  def pick(logits, key):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(prompt.dtype)
    return jax.random.categorical(key, logits / temperature
                                  ).astype(prompt.dtype)

  keys = jax.random.split(rng, max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  first = pick(logits[:, -1], keys[0])

  def step(carry, key):
    tok, cache = carry
    logits, cache = model.decode(tok[:, None], cache)
    return (pick(logits[:, 0], key), cache), tok

  (last, _), toks = jax.lax.scan(step, (first, cache), keys[1:])
  return jnp.concatenate([prompt, toks.T, last[:, None]], axis=1)


def generate(model: LanguageModel, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None,
             cache_dtype=jnp.float32) -> jax.Array:
  """Autoregressive sampling with the layers' caches (one jit'd program).

  The prompt is prefilled in one ``decode`` call; each new token is one more
  ``decode`` call inside a ``lax.scan``.

  Args:
    model: a ``LanguageModel``.
    prompt: int [B, P].
    max_new_tokens: how many tokens to append (>= 1).
    temperature: 0 for greedy decoding, else softmax sampling temperature.
    rng: PRNG key for sampling (required when temperature > 0).
    cache_dtype: dtype of the KV caches.

  Returns:
    int [B, P + max_new_tokens]: the prompt followed by the new tokens.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from attnjax.models import LanguageModel, generate
  >>> model = LanguageModel(vocab_size=20, d_model=16, num_heads=2,
  ...                       pattern="AA", rngs=nnx.Rngs(0))
  >>> generate(model, jnp.zeros((1, 3), jnp.int32), 4).shape
  (1, 7)
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("rng is required when temperature > 0")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt), max_new_tokens,
                   float(temperature), rng, cache_dtype)
