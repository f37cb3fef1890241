"""``attnjax.dot_product_attention``: one function, several backends."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Literal

import jax

from attnjax.softmax.problem import Problem, make_problem

__all__ = ["dot_product_attention", "BACKWARD_IMPLEMENTATIONS",
           "IMPLEMENTATIONS", "Implementation", "load_backward",
           "resolve_implementations"]

type Implementation = Literal["xla", "xla_chunked", "cudnn", "pallas",
                              "pallas_triton", "pallas_mosaic_gpu"]

# name -> "module:function"; each function takes (Problem, need_lse=bool) or
# (Problem) and returns (out, lse | None). Imported on first use.
IMPLEMENTATIONS: dict[str, str] = {
    "xla": "attnjax.softmax.xla:xla_attention",
    "xla_chunked": "attnjax.softmax.xla_chunked:xla_chunked_attention",
    "cudnn": "attnjax.softmax.cudnn:cudnn_attention",
    "pallas_triton": "attnjax.softmax.pallas:triton_attention",
    "pallas_mosaic_gpu": "attnjax.softmax.pallas_mosaic:mosaic_gpu_attention",
}
_ALIASES = ("pallas",)

# Backends whose backward pass can run on its own from residuals the caller
# supplies: name -> "module:function", the function being
# ``fn(problem, out, lse, d_out, d_lse=None) -> (dq, dk, dv)`` with lse the
# natural-log normaliser [B, N, T] (-inf for empty rows) and gradients with
# respect to q, k, v only. Sequence parallelism calls it with the *global*
# out/lse of the whole sequence on each visiting key/value block (ring
# attention's backward pass), so no block forward is recomputed. A backend
# raises NotImplementedError for requests it cannot serve, as in the forward.
BACKWARD_IMPLEMENTATIONS: dict[str, str] = {
    "xla_chunked": "attnjax.softmax.xla_chunked:xla_chunked_attention_bwd",
    "pallas_triton": "attnjax.softmax.residual_bwd:pallas_triton_bwd",
    "pallas_mosaic_gpu": "attnjax.softmax.residual_bwd:pallas_mosaic_gpu_bwd",
}

# Below this many logits per head, "xla" beats xla_chunked on CPU.
_SMALL_LOGITS = 1 << 20


def _load(name: str) -> Callable:
  module, fn = IMPLEMENTATIONS[name].split(":")
  try:
    return getattr(importlib.import_module(module), fn)
  except ImportError as e:  # an optional backend whose module is absent
    raise NotImplementedError(f"{name} is not available: {e}") from e


def load_backward(name: str) -> Callable:
  """The residual backward of backend ``name`` (see BACKWARD_IMPLEMENTATIONS).

  Raises:
    NotImplementedError: the backend has none, or its module is absent.
  """
  if name not in BACKWARD_IMPLEMENTATIONS:
    raise NotImplementedError(f"{name} has no residual backward")
  module, fn = BACKWARD_IMPLEMENTATIONS[name].split(":")
  try:
    return getattr(importlib.import_module(module), fn)
  except ImportError as e:
    raise NotImplementedError(f"{name} is not available: {e}") from e


def _is_hopper() -> bool:
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  return dev.platform == "gpu" and str(
      getattr(dev, "compute_capability", "")).startswith("9")


def resolve_implementations(implementation, problem: Problem | None = None
                            ) -> tuple[str, ...]:
  """Expands ``implementation`` into the ordered backend names to try."""
  if implementation is None:
    backend = jax.default_backend()
    if backend == "gpu":
      names = (("pallas_mosaic_gpu",) if _is_hopper() else ()) + (
          "cudnn", "pallas_triton", "xla_chunked")
    else:
      small = False
      if problem is not None:
        _, t, s, _, _, _, _ = problem.shape
        small = t * s <= _SMALL_LOGITS
      names = ("xla", "xla_chunked") if small else ("xla_chunked",)
    return names
  if isinstance(implementation, str):
    implementation = (implementation,)
  if not isinstance(implementation, Sequence) or not implementation:
    raise ValueError("implementation must be None, a name or a non-empty "
                     f"sequence of names, got {implementation!r}")
  names = []
  for name in implementation:
    if name == "pallas":
      if jax.default_backend() == "gpu" and _is_hopper():
        names += ["pallas_mosaic_gpu", "pallas_triton"]
      else:
        names.append("pallas_triton")
    elif name in IMPLEMENTATIONS:
      names.append(name)
    else:
      raise ValueError(
          f"implementation {name!r} is unknown; choose from "
          f"{sorted(list(IMPLEMENTATIONS) + list(_ALIASES))}")
  return tuple(names)


def call_backends(problem: Problem, names: Sequence[str], *, need_lse: bool,
                  explicit: bool):
  """Tries backends in order, falling through on NotImplementedError only."""
  errors = []
  for name in names:
    try:
      out, lse = _load(name)(problem)
      if need_lse and lse is None:
        raise NotImplementedError(f"{name} does not return residuals")
      return out, lse
    except NotImplementedError as e:
      if explicit and len(names) == 1:
        raise
      errors.append(NotImplementedError(f"{name}: {e}"))
  raise ExceptionGroup("no attention implementation supports this request",
                       errors)


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids=None,
    sinks=None,
    logits_soft_cap: float | None = None,
    return_residuals: bool = False,
    implementation: Implementation | Sequence[Implementation] | None = None,
):
  r"""Scaled dot-product attention, ``softmax(scale * q k^T + bias) v``.

  A superset of ``jax.nn.dot_product_attention``: every argument it has keeps
  its meaning (layout letters: B batch, T query length, S key length, N query
  heads, K key/value heads with N % K == 0, H head dim, Hv value head dim).

  Args:
    query: [B, T, N, H] (or unbatched [T, N, H]).
    key: [B, S, K, H].
    value: [B, S, K, Hv].
    bias: optional float, broadcastable to [B, N, T, S] (rank 2-4; leading
      axes are prepended as in ``jax.nn``).
    mask: optional bool array broadcastable to [B, N, T, S] (True = visible),
      or an ``attnjax.masks.Mask`` (kernels skip the tiles it empties).
    scale: logit scale; default ``1 / sqrt(H)``.
    is_causal: key j visible to query i iff j <= i (top-left aligned).
    query_seq_lengths: int [B]; rows at or past the length return zeros.
    key_value_seq_lengths: int [B]; keys at or past the length are masked.
    local_window_size: ``(left, right)`` keeps ``i - left <= j <= i + right``;
      an int w means ``(w, w)``.
    segment_ids: int [B, T] (self-attention) or ``(q_ids [B, T], kv_ids
      [B, S])``; query i sees key j only when their ids are equal.
    sinks: float [N]: one sink logit per query head, adding ``exp(sinks[n])``
      to the softmax denominator with no value attached.
    logits_soft_cap: c > 0: logits -> ``c * tanh(logits / c)`` (after scale
      and bias, before masking).
    return_residuals: also return ``lse``, float32 [B, N, T], the natural-log
      normaliser of each row (``-inf`` for a row with nothing visible).
    implementation: ``None`` picks the fastest backend that supports the
      request on this platform (always succeeds); a name forces that backend
      and raises ``NotImplementedError`` if it cannot serve the request; a
      sequence is tried in order, falling through on ``NotImplementedError``
      only. Names: "xla", "xla_chunked", "cudnn", "pallas" (the best Pallas
      kernel here; interpret mode on CPU), "pallas_triton",
      "pallas_mosaic_gpu".

  Returns:
    ``out`` [B, T, N, Hv] in the input dtype, or ``(out, lse)``.

  Raises:
    ValueError: invalid arguments (the message names the argument).
    NotImplementedError: a named backend cannot serve a valid request.

  A query row with no visible key returns zeros and zero gradients.

  Example:

  >>> import jax, jax.numpy as jnp, attnjax
  >>> q = jax.random.normal(jax.random.key(0), (2, 16, 4, 32))
  >>> kv = jax.random.normal(jax.random.key(1), (2, 16, 2, 32))
  >>> out = attnjax.dot_product_attention(q, kv, kv, is_causal=True)
  >>> out.shape
  (2, 16, 4, 32)
  """
  problem, unbatched = make_problem(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids,
      sinks=sinks, logits_soft_cap=logits_soft_cap)
  if not isinstance(return_residuals, bool):
    raise ValueError(f"return_residuals must be a bool, got "
                     f"{return_residuals!r}")
  names = resolve_implementations(implementation, problem)
  out, lse = call_backends(problem, names, need_lse=return_residuals,
                           explicit=implementation is not None)
  if unbatched:
    out = out[0]
    lse = None if lse is None else lse[0]
  return (out, lse) if return_residuals else out
