"""Multi-query associative recall (MQAR, Zoology arXiv:2312.04927), in JAX.

A sequence starts with ``P`` key-value pairs ``k1 v1 k2 v2 ... kP vP``
(distinct keys from the lower half of the vocabulary, values from the upper
half). The rest of the sequence is filler (token 0) in which every key is
asked once, at a random even offset, followed by its value:
``... 0 0 k3 v3 0 0 k1 v1 ...``. The model must predict the value after each
queried key; loss and accuracy count only those positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FILLER = 0


def mqar_batch(key: jax.Array, *, batch_size: int, seq_len: int,
               num_pairs: int, vocab_size: int) -> dict[str, jax.Array]:
  """One MQAR batch: inputs, targets (next token) and weights, [B, T] each.

  Also ``loss_positions`` int [B, P]: the queried keys' positions (the only
  ones with nonzero weight), so the loss needs logits there alone.

  Args:
    key: PRNG key.
    batch_size: B.
    seq_len: T; must be at least 4 * num_pairs (context plus query slots).
    num_pairs: P key-value pairs (each queried once).
    vocab_size: V; keys come from [1, V/2), values from [V/2, V).
  """
  half = vocab_size // 2
  slots = (seq_len - 2 * num_pairs) // 2
  if slots < num_pairs or half - 1 < num_pairs:
    raise ValueError(f"seq_len={seq_len} / vocab_size={vocab_size} too small "
                     f"for num_pairs={num_pairs}")
  k_keys, k_vals, k_slots = jax.random.split(key, 3)
  pick = lambda k, n: jax.vmap(
      lambda kk: jax.random.permutation(kk, n)[:num_pairs])(
          jax.random.split(k, batch_size))
  keys = pick(k_keys, half - 1) + 1                      # [B, P] distinct
  values = jax.random.randint(k_vals, (batch_size, num_pairs), half,
                              vocab_size)
  where = pick(k_slots, slots)                           # [B, P] query slot
  context = jnp.stack([keys, values], -1).reshape(batch_size, 2 * num_pairs)
  q_len = seq_len - 2 * num_pairs
  rows = jnp.arange(batch_size)[:, None]
  region = jnp.full((batch_size, q_len), FILLER, jnp.int32)
  region = region.at[rows, 2 * where].set(keys)
  region = region.at[rows, 2 * where + 1].set(values)
  tokens = jnp.concatenate([context, region], axis=1).astype(jnp.int32)
  weights = jnp.zeros((batch_size, q_len), jnp.float32)
  weights = weights.at[rows, 2 * where].set(1.0)
  weights = jnp.concatenate(
      [jnp.zeros((batch_size, 2 * num_pairs), jnp.float32), weights], axis=1)
  # Next-token targets; the last position has none (its weight is 0).
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  return {"inputs": tokens, "targets": targets, "weights": weights,
          "loss_positions": (2 * num_pairs + 2 * where).astype(jnp.int32)}
