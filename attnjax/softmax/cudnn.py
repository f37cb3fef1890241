"""``implementation="cudnn"``: cuDNN flash attention through ``jax.nn``.

Serves the subset ``jax.nn.dot_product_attention(implementation="cudnn")``
supports; anything else raises ``NotImplementedError`` so dispatch falls back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax.softmax.problem import Problem

__all__ = ["cudnn_attention"]


def _window(mask):
  """Maps a static mask to jax.nn's (is_causal, local_window_size)."""
  if mask is None:
    return False, None
  if mask == masks_lib.Causal():
    return True, None
  if isinstance(mask, masks_lib.And):
    parts = {mask.left, mask.right}
    causal = masks_lib.Causal()
    if causal in parts:
      other = (parts - {causal}).pop() if len(parts) == 2 else causal
      if isinstance(other, masks_lib.LocalWindow) and other.left is not None:
        return True, (other.left, 0)
  raise NotImplementedError(f"cudnn backend cannot express mask {mask!r}")


def cudnn_attention(p: Problem):
  """Returns (out, lse); lse is NotImplemented here (see below)."""
  if jax.default_backend() != "gpu":
    raise NotImplementedError("cudnn needs a GPU")
  b, t, s, n, kh, h, hv = p.shape
  if p.q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"cudnn supports bf16/f16, not {p.q.dtype}")
  if h != hv or h % 8 or h > 256:
    raise NotImplementedError(f"cudnn head dims {h=}, {hv=} unsupported")
  if (p.q_segment_ids is not None or p.sinks is not None
      or p.logits_soft_cap is not None or p.mask_array is not None):
    raise NotImplementedError(
        "cudnn backend: no segment_ids, sinks, soft cap or dense masks (its "
        "fully-masked-row semantics differ)")
  if p.bias is not None and p.bias.dtype != p.q.dtype:
    raise NotImplementedError("cudnn needs bias in the input dtype")
  is_causal, window = _window(p.mask)
  out = jax.nn.dot_product_attention(
      p.q, p.k, p.v, p.bias, None, scale=p.scale, is_causal=is_causal,
      query_seq_lengths=p.q_lengths, key_value_seq_lengths=p.kv_lengths,
      local_window_size=window, implementation="cudnn")
  if p.q_lengths is not None:
    valid = jnp.arange(t)[None, :] < p.q_lengths[:, None]
    out = jnp.where(valid[:, :, None, None], out, 0)
  return out, None
