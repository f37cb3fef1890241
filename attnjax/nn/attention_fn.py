"""``make_attention_fn``: attnjax as ``flax.nnx.MultiHeadAttention``'s kernel.

``nnx.MultiHeadAttention`` calls its ``attention_fn`` with a fixed set of
keyword arguments (``flax/nnx/nn/attention.py``). The adapter accepts exactly
those, honours what it can (masks, ``is_causal``, ``dtype``), and raises on
what it cannot (attention dropout, sowing the attention weights), instead of
silently dropping them as a signature-filtering adapter would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax.nnx.nn import dtypes as nnx_dtypes

from attnjax import masks as masks_lib
from attnjax.softmax import api

__all__ = ["make_attention_fn"]

# dot_product_attention keywords that make sense as fixed options.
_OPTIONS = ("scale", "is_causal", "local_window_size", "sinks",
            "logits_soft_cap", "implementation", "mask")


def _flatten_batch(x, batch_shape):
  return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])


def _nnx_mask_to_bool(mask, batch_shape):
  """[batch..., N|1, T, S] (any dtype; nonzero = visible) -> bool 4-D."""
  mask = jnp.asarray(mask)
  mask = mask if mask.dtype == jnp.bool_ else mask != 0
  nb = len(batch_shape)
  if mask.ndim < 2:
    raise ValueError(f"mask must broadcast to [batch..., N, T, S], got shape "
                     f"{mask.shape}")
  mask = mask.reshape((1,) * max(0, nb + 3 - mask.ndim) + mask.shape)
  if mask.ndim != nb + 3:
    raise ValueError(f"mask of shape {mask.shape} has more axes than "
                     f"[batch..., N, T, S] with batch {batch_shape}")
  lead = mask.shape[:nb]
  if all(d == 1 for d in lead):
    return mask.reshape((1,) + mask.shape[nb:])
  mask = jnp.broadcast_to(mask, tuple(batch_shape) + mask.shape[nb:])
  return _flatten_batch(mask, batch_shape)


def make_attention_fn(**options) -> Callable[..., jax.Array]:
  """Adapts ``attnjax.dot_product_attention`` to ``nnx.MultiHeadAttention``.

  Args:
    **options: fixed keyword arguments of ``attnjax.dot_product_attention``:
      ``scale``, ``is_causal`` (OR-ed with the call's), ``local_window_size``,
      ``sinks``, ``logits_soft_cap``, ``implementation`` and ``mask`` (an
      ``attnjax.masks.Mask``, AND-ed with the mask nnx passes).

  Returns:
    ``attention_fn(query, key, value, bias=None, mask=None, *, ...)`` taking
    the keyword arguments nnx passes. Shapes follow nnx: ``[batch..., T, N,
    H]`` inputs (any number of batch axes, GQA allowed) and a mask
    broadcastable to ``[batch..., N, T, S]`` whose nonzero entries are
    visible. It raises ``NotImplementedError`` for attention dropout that
    would be active (``dropout_rate > 0`` and not ``deterministic``), for
    ``module`` (``sow_weights=True``: the weights are never materialised) and
    for keyword arguments it does not know (e.g. ``input_positions``: apply
    RoPE before attention). ``precision`` is accepted and not used: the
    attnjax backends accumulate in float32.

  A query row with no visible key returns zeros (nnx's default returns the
  mean of the values there).

  Raises:
    ValueError: an unknown option.

  Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import attnjax.nn
  >>> layer = nnx.MultiHeadAttention(
  ...     num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
  ...     attention_fn=attnjax.nn.make_attention_fn(implementation="xla"))
  >>> layer(jnp.ones((1, 5, 8)), is_causal=True).shape
  (1, 5, 8)
  """
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise ValueError(f"make_attention_fn got unknown options {unknown}; "
                     f"allowed: {list(_OPTIONS)}")
  fixed_mask = options.pop("mask", None)
  if fixed_mask is not None and not isinstance(fixed_mask, masks_lib.Mask):
    raise ValueError("make_attention_fn(mask=...) must be an "
                     f"attnjax.masks.Mask, got {type(fixed_mask).__name__}")
  fixed_causal = options.pop("is_causal", False)

  def attention_fn(query, key, value, bias=None, mask=None, *,
                   broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None,
                   promote_dtype=nnx_dtypes.promote_dtype, is_causal=False,
                   **unsupported):
    del broadcast_dropout, dropout_rng, precision  # see the docstring
    if unsupported:
      raise NotImplementedError(
          f"attnjax attention_fn does not support {sorted(unsupported)} "
          "(for input_positions: apply RoPE to q and k before attention, "
          "e.g. attnjax.nn.MultiHeadAttention(rope=True))")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0 and not deterministic:
      raise NotImplementedError(
          "attnjax kernels do not implement attention dropout: use "
          "dropout_rate=0 or deterministic=True")
    if module is not None:
      raise NotImplementedError(
          "attnjax never materialises the attention weights, so they cannot "
          "be sown (sow_weights=True)")
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    if query.ndim < 3:
      raise ValueError(f"query must be [batch..., T, N, H], got shape "
                       f"{query.shape}")
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
      raise ValueError(f"query, key, value batch axes differ: {query.shape}, "
                       f"{key.shape}, {value.shape}")
    q, k, v = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))
    t, s = q.shape[1], k.shape[1]
    m = None if mask is None else _nnx_mask_to_bool(mask, batch_shape)
    if fixed_mask is not None:
      m = fixed_mask if m is None else m & fixed_mask.as_array(t, s)
    if bias is not None:
      bias = jnp.asarray(bias)
      bias = bias.reshape((1,) * max(0, len(batch_shape) + 3 - bias.ndim)
                          + bias.shape)
      if bias.ndim == len(batch_shape) + 3 and len(batch_shape) != 1:
        bias = jnp.broadcast_to(
            bias, tuple(batch_shape) + bias.shape[len(batch_shape):])
        bias = _flatten_batch(bias, batch_shape)
    out = api.dot_product_attention(
        q, k, v, bias, m, is_causal=bool(is_causal or fixed_causal),
        **options)
    return out.reshape(batch_shape + out.shape[1:])

  return attention_fn
