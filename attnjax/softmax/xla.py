"""``implementation="xla"``: the materialised reference (the oracle).

Forms the full [B, N, T, S] logits with float32 softmax; gradients come from
JAX autodiff. Memory is O(T * S) per head: use it for tests and short
sequences.
"""

from __future__ import annotations

from pallas_kernels.flash import reference

from attnjax.softmax.problem import Problem

__all__ = ["xla_attention"]


def xla_attention(p: Problem):
  """Returns (out [B, T, N, Hv], lse float32 [B, N, T])."""
  return reference.attention_reference(
      p.q, p.k, p.v, p.bias, p.dense_mask(), scale=p.scale,
      q_segment_ids=p.q_segment_ids, kv_segment_ids=p.kv_segment_ids,
      q_lengths=p.q_lengths, kv_lengths=p.kv_lengths, sinks=p.sinks,
      logits_soft_cap=p.logits_soft_cap)
