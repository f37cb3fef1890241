"""A synthetic English-like corpus (no downloads): a small random grammar.

Sentences come from a hand-written probabilistic grammar over about 150
words (determiners, adjectives, nouns, names, verbs, adverbs, prepositions,
conjunctions), with Zipf-distributed word choice inside each category, so the
stream has the skewed unigram statistics, short-range syntax and frequent
delimiters ("." and ",") of natural text. Tokens are whole words.
"""

from __future__ import annotations

import numpy as np

DET = "the a this that every some my your".split()
ADJ = ("old young small large red quiet bright dark cold warm happy tired "
       "strange simple heavy gentle").split()
NOUN = ("dog cat bird man woman child king river tree house city road ship "
        "book letter garden door window horse friend teacher doctor farmer "
        "stone forest field village bridge song").split()
NAME = "alice bob carol dave eve frank grace".split()
VERB_T = ("saw found took left built opened closed followed helped "
          "watched carried painted wrote").split()
VERB_I = "slept ran waited laughed sang walked arrived stayed".split()
ADV = "quickly slowly quietly often never again today there".split()
PREP = "near under over behind beside into across".split()
CONJ = "and but because while".split()
PUNCT = [".", ","]

WORDS = sorted(set(DET + ADJ + NOUN + NAME + VERB_T + VERB_I + ADV + PREP
                   + CONJ + PUNCT))
VOCAB = {w: i for i, w in enumerate(WORDS)}


def _zipf_cdf(n):
  p = 1.0 / np.arange(1, n + 1)
  return np.cumsum(p / p.sum())


_CDF = {n: _zipf_cdf(n) for n in {len(c) for c in (
    DET, ADJ, NOUN, NAME, VERB_T, VERB_I, ADV, PREP, CONJ)}}


def _zipf(rng, items):
  """A word of ``items``, the i-th with probability proportional to 1/i."""
  i = int(np.searchsorted(_CDF[len(items)], rng.random(), side="right"))
  return items[min(i, len(items) - 1)]


def _noun_phrase(rng, out):
  if rng.random() < 0.2:
    out.append(_zipf(rng, NAME))
    return
  out.append(_zipf(rng, DET))
  while rng.random() < 0.35:
    out.append(_zipf(rng, ADJ))
  out.append(_zipf(rng, NOUN))
  if rng.random() < 0.15:
    out.append(_zipf(rng, PREP))
    _noun_phrase(rng, out)


def _clause(rng, out):
  _noun_phrase(rng, out)
  r = rng.random()
  if r < 0.55:
    out.append(_zipf(rng, VERB_T))
    _noun_phrase(rng, out)
  elif r < 0.8:
    out.append(_zipf(rng, VERB_I))
    if rng.random() < 0.5:
      out.append(_zipf(rng, ADV))
  else:
    out.append(_zipf(rng, VERB_I))
    out.append(_zipf(rng, PREP))
    _noun_phrase(rng, out)


def sentence(rng) -> list[str]:
  out: list[str] = []
  _clause(rng, out)
  while rng.random() < 0.3:
    out.append(",")
    out.append(_zipf(rng, CONJ))
    _clause(rng, out)
  out.append(".")
  return out


def token_stream(num_tokens: int, seed: int = 0) -> np.ndarray:
  """int32 [num_tokens]: word ids of consecutive random sentences."""
  rng = np.random.default_rng(seed)
  ids: list[int] = []
  while len(ids) < num_tokens:
    ids.extend(VOCAB[w] for w in sentence(rng))
  return np.asarray(ids[:num_tokens], np.int32)


def decode(ids) -> str:
  return " ".join(WORDS[int(i)] for i in ids)


# ----------------------------------------------------------------------------
# Bigram-backcopy (Guo et al., "Active-Dormant Attention Heads",
# arXiv:2410.13835): after a BOS token, tokens follow a fixed random bigram
# chain, except that after a "trigger" token the next token repeats the one
# before the trigger. Heads are needed only at triggers; elsewhere they must
# do nothing, which is where sinks come from.

BOS = 0
NUM_TRIGGERS = 8


def bigram_matrix(vocab_size: int, seed: int = 0,
                  concentration: float = 0.1) -> np.ndarray:
  """float32 [V, V] row-stochastic transitions over tokens 1..V-1."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(vocab_size - 1, concentration),
                    size=vocab_size).astype(np.float32)
  return np.concatenate([np.zeros((vocab_size, 1), np.float32), p], 1)


def bb_batch(key, *, transitions, batch_size: int, seq_len: int):
  """A next-token batch of bigram-backcopy sequences starting with BOS."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  logp = jnp.log(jnp.asarray(transitions) + 1e-30)
  v = logp.shape[0]
  k0, k1 = jax.random.split(key)
  first = jax.random.randint(k0, (batch_size,), 1 + NUM_TRIGGERS, v)

  def step(carry, k):
    prev, cur = carry
    sampled = jax.random.categorical(k, logp[cur])
    is_trigger = (cur >= 1) & (cur <= NUM_TRIGGERS)
    nxt = jnp.where(is_trigger, prev, sampled)
    return (cur, nxt), nxt

  bos = jnp.full((batch_size,), BOS, jnp.int32)
  _, rest = jax.lax.scan(step, (bos, first.astype(jnp.int32)),
                         jax.random.split(k1, seq_len - 1))
  seq = jnp.concatenate([bos[:, None], first[:, None].astype(jnp.int32),
                         rest.T.astype(jnp.int32)], axis=1)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}
