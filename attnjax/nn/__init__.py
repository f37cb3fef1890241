"""Flax NNX modules built on attnjax (API section 6).

- ``make_attention_fn``: attnjax as ``flax.nnx.MultiHeadAttention``'s
  ``attention_fn``.
- ``MultiHeadAttention``: causal self-attention (GQA, RoPE, QK-norm, sinks,
  sliding window, output gate) with ``init_cache`` / ``decode``.
- ``LinearAttention``: the linear-attention family with a recurrent cache.
- ``TransformerBlock``: pre-norm RMSNorm, mixer, SwiGLU MLP.
"""

from attnjax.nn.attention import KVCache as KVCache
from attnjax.nn.attention import MultiHeadAttention as MultiHeadAttention
from attnjax.nn.attention import SequenceParallel as SequenceParallel
from attnjax.nn.attention_fn import make_attention_fn as make_attention_fn
from attnjax.nn.block import TransformerBlock as TransformerBlock
from attnjax.nn.layers import RMSNorm as RMSNorm
from attnjax.nn.layers import ShortConv as ShortConv
from attnjax.nn.layers import SwiGLU as SwiGLU
from attnjax.nn.layers import apply_rope as apply_rope
from attnjax.nn.layers import rope_angles as rope_angles
from attnjax.nn.linear import LinearAttention as LinearAttention
from attnjax.nn.linear import LinearCache as LinearCache
from attnjax.nn.linear import retnet_log_decay as retnet_log_decay

__all__ = [
    "KVCache",
    "LinearAttention",
    "LinearCache",
    "MultiHeadAttention",
    "RMSNorm",
    "SequenceParallel",
    "ShortConv",
    "SwiGLU",
    "TransformerBlock",
    "apply_rope",
    "make_attention_fn",
    "retnet_log_decay",
    "rope_angles",
]
