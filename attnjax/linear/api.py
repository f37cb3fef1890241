"""``attnjax.linear_attention`` and friends: validation and dispatch.

Implementations (``implementation=``):

* ``"xla"``: the ``lax.scan`` recurrence (``pallas_kernels.linear_scan.
  reference``), token by token; the definition and the test oracle.
* ``"xla_chunked"``: the chunked parallel form in jnp (``chunked.py``,
  ``delta.py``); autodiff backward. Every variant.
* ``"pallas"``: the chunked-scan Pallas kernels (Triton on GPUs, interpret
  mode elsewhere), forward and backward. Scalar or fixed decays, no decay,
  normalisation, resets, GQA (``kernels.py``); per-key-channel gates (GLA)
  with resets and GQA (``channel.py``); the (gated) delta rule
  (``delta.py``, H and Hv <= 256; larger heads raise
  ``NotImplementedError``, so ``implementation=None`` falls back to
  ``"xla_chunked"``).

``implementation=None`` tries ``"pallas"`` then ``"xla_chunked"`` on GPUs and
``"xla_chunked"`` elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FEATURE_MAPS",
    "IMPLEMENTATIONS",
    "LinearProblem",
    "delta_rule_attention",
    "delta_rule_step",
    "linear_attention",
    "linear_attention_step",
    "prepare_delta",
    "prepare_linear",
]

NORMALIZE_EPS = 1e-6
IMPLEMENTATIONS = ("xla", "xla_chunked", "pallas")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
           jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------
# Feature maps (computed in float32, returned in the input dtype).


def _elu_plus_one(x):
  return jax.nn.elu(x) + 1.0


def _relu(x):
  return jax.nn.relu(x)


def _taylor2(x):
  """BASED's 2nd-order Taylor map: phi(q).phi(k) = 1 + s + s^2 / 2 with
  s = q.k / sqrt(d), i.e. the Taylor expansion of exp(q.k / sqrt(d)).
  Feature dim 1 + d + d^2."""
  d = x.shape[-1]
  x2 = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x / d ** 0.25,
                          x2 / math.sqrt(2.0 * d)], axis=-1)


FEATURE_MAPS: dict[str, Callable] = {
    "elu_plus_one": _elu_plus_one,
    "relu": _relu,
    "taylor2": _taylor2,
}


def _apply_feature_map(feature_map, q, k):
  if feature_map is None:
    return q, k
  if isinstance(feature_map, str):
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"feature_map {feature_map!r} is unknown; choose None, "
                       f"a callable or one of {sorted(FEATURE_MAPS)}")
    fn = FEATURE_MAPS[feature_map]
  elif callable(feature_map):
    fn = feature_map
  else:
    raise ValueError("feature_map must be None, a name or a callable, got "
                     f"{type(feature_map).__name__}")
  qf = fn(q.astype(jnp.float32))
  kf = fn(k.astype(jnp.float32))
  if (qf.shape[:-1] != q.shape[:-1] or kf.shape[:-1] != k.shape[:-1]
      or qf.shape[-1] != kf.shape[-1]):
    raise ValueError("feature_map must map [..., H] to [..., F] with the same "
                     f"F for query and key; got {qf.shape} and {kf.shape}")
  return qf.astype(q.dtype), kf.astype(k.dtype)


# ----------------------------------------------------------------------------
# The canonical problem every implementation receives.


@dataclasses.dataclass(frozen=True)
class LinearProblem:
  """Validated, canonical arguments.

  Attributes:
    q: [B, T, N, F] feature-mapped queries (input dtype).
    k: [B, T, K, F] feature-mapped keys.
    v: [B, T, K, V].
    log_gate: None, float32 [B, T, N] or [B, T, N, F]: the per-step log decay
      (fixed decay and gate summed).
    resets: None or bool [B, T]: state zeroed before token t.
    beta: None (linear attention) or [B, T, N] (delta rule).
    initial_state: None or float32 [B, N, F, V (+1 when normalize)].
    scale: output scale.
    normalize: divide by the running key sum.
    chunk_size: None or int.
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  log_gate: jax.Array | None
  resets: jax.Array | None
  beta: jax.Array | None
  initial_state: jax.Array | None
  scale: float
  normalize: bool
  chunk_size: int | None

  @property
  def is_delta(self) -> bool:
    return self.beta is not None


def _check_array(x, name, ndim):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_qkv(query, key, value, *, step: bool = False):
  rank = 3 if step else 4
  lead = "B, N" if step else "B, T, N"
  for x, name in ((query, "query"), (key, "key"), (value, "value")):
    _check_array(x, name, rank)
  if jnp.dtype(query.dtype) not in _FLOATS:
    raise ValueError(f"query dtype {query.dtype} is not supported "
                     "(float32, bfloat16, float16)")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError("query, key and value must share a dtype, got "
                     f"{query.dtype}, {key.dtype}, {value.dtype}")
  nlead = rank - 2
  if key.shape[:nlead] != query.shape[:nlead]:
    raise ValueError(f"key leading dims {key.shape[:nlead]} do not match "
                     f"query's {query.shape[:nlead]} ([{lead}, H] layout)")
  if value.shape[:-1] != key.shape[:-1]:
    raise ValueError(f"value shape {value.shape} does not match key "
                     f"{key.shape} except in the last axis")
  if key.shape[-1] != query.shape[-1]:
    raise ValueError(f"key head dim {key.shape[-1]} != query head dim "
                     f"{query.shape[-1]}")
  n, kh = query.shape[-2], key.shape[-2]
  if kh == 0 or n % kh:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value "
                     f"heads ({kh})")


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_log_decay(log_decay, n):
  if log_decay is None:
    return None
  log_decay = jnp.asarray(log_decay)
  if not jnp.issubdtype(log_decay.dtype, jnp.floating):
    raise ValueError(f"log_decay must be floating point, got "
                     f"{log_decay.dtype}")
  if log_decay.shape != (n,):
    raise ValueError(f"log_decay must have shape [N] = ({n},), got "
                     f"{log_decay.shape}")
  if _is_concrete(log_decay):
    vals = np.asarray(log_decay, np.float32)
    if np.any(np.isnan(vals)) or np.any(vals > 0):
      raise ValueError("log_decay must be <= 0 (a decay factor "
                       f"exp(log_decay) <= 1), got {vals.tolist()}")
  return log_decay.astype(jnp.float32)


def _check_gate(gate, shape_scalar, feature_dim, *, allow_channel=True):
  if gate is None:
    return None
  _check_array(gate, "gate", gate.ndim if hasattr(gate, "ndim") else 0)
  ok = [tuple(shape_scalar)]
  if allow_channel:
    ok.append(tuple(shape_scalar) + (feature_dim,))
  if tuple(gate.shape) not in ok:
    want = " or ".join(str(list(s)) for s in ok)
    raise ValueError(f"gate must have shape {want} (log-space, [B, T, N] "
                     "scalar" + (" or [B, T, N, F] per key channel, F the "
                                 "feature dim" if allow_channel else "")
                     + f"), got {list(gate.shape)}")
  # Concrete gates (constants under jit too) are checked on their device,
  # one boolean coming back; traced ones cannot be.
  if _is_concrete(gate):
    with jax.ensure_compile_time_eval():
      bad = bool(jnp.any(~(gate <= 0)))
    if bad:
      raise ValueError("gate must be <= 0 (a log-space decay, exp(gate) <= "
                       "1) and not NaN; it has positive or NaN entries")
  return gate.astype(jnp.float32)


def _resets(segment_ids, b, t):
  if segment_ids is None:
    return None
  if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != (b, t):
    shape = getattr(segment_ids, "shape", type(segment_ids).__name__)
    raise ValueError(f"segment_ids must have shape [B, T] = [{b}, {t}], got "
                     f"{shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integer, got {segment_ids.dtype}")
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  # Fixed packing known at trace time: not folded (see prepare_linear).
  return jax.lax.optimization_barrier(
      jnp.concatenate([jnp.zeros((b, 1), bool), change], axis=1))


def _check_state(state, shape, name="initial_state"):
  if state is None:
    return None
  if not hasattr(state, "shape") or tuple(state.shape) != tuple(shape):
    got = getattr(state, "shape", type(state).__name__)
    raise ValueError(f"{name} must have shape {list(shape)} ([B, N, F, V], "
                     f"plus a key-sum column when normalize=True), got "
                     f"{got}")
  if not jnp.issubdtype(state.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {state.dtype}")
  return state.astype(jnp.float32)


def _check_scale(scale, default):
  if scale is None:
    return float(default)
  try:
    return float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"scale must be a Python float, got {scale!r}") from e


def _check_chunk(chunk_size):
  if chunk_size is None:
    return None
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int,
                                                                  np.integer))
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  return int(chunk_size)


def prepare_linear(query, key, value, *, feature_map=None, log_decay=None,
                   gate=None, normalize=False, scale=None, initial_state=None,
                   segment_ids=None, chunk_size=None) -> LinearProblem:
  """Validates ``linear_attention`` arguments into a ``LinearProblem``."""
  _check_qkv(query, key, value)
  b, t, n, h = query.shape
  q, k = _apply_feature_map(feature_map, query, key)
  f = q.shape[-1]
  vd = value.shape[-1]
  ld = _check_log_decay(log_decay, n)
  g = _check_gate(gate, (b, t, n), f)
  if ld is not None:
    ld_b = ld[None, None, :] if g is None or g.ndim == 3 else (
        ld[None, None, :, None])
    g = jnp.broadcast_to(ld_b, (b, t, n)) if g is None else g + ld_b
    # A decay known at trace time (a Python or numpy value, or a constant
    # such as ``retnet_log_decay``) would make every per-token weight
    # derived from it a compile-time constant, and XLA's constant folding
    # evaluates those [B, T, N]-sized cumsums on the host: over a minute at
    # T = 512k. The barrier (free at run time) keeps them on the device.
    g = jax.lax.optimization_barrier(g)
  default_scale = 1.0 if feature_map == "taylor2" else 1.0 / math.sqrt(h)
  state_v = vd + 1 if normalize else vd
  return LinearProblem(
      q=q, k=k, v=value, log_gate=g, resets=_resets(segment_ids, b, t),
      beta=None,
      initial_state=_check_state(initial_state, (b, n, f, state_v)),
      scale=_check_scale(scale, default_scale), normalize=bool(normalize),
      chunk_size=_check_chunk(chunk_size))


def prepare_delta(query, key, value, beta, *, gate=None, scale=None,
                  initial_state=None, segment_ids=None,
                  chunk_size=None) -> LinearProblem:
  """Validates ``delta_rule_attention`` arguments into a ``LinearProblem``."""
  _check_qkv(query, key, value)
  b, t, n, h = query.shape
  _check_array(beta, "beta", 3)
  if tuple(beta.shape) != (b, t, n):
    raise ValueError(f"beta must have shape [B, T, N] = [{b}, {t}, {n}], got "
                     f"{list(beta.shape)}")
  g = _check_gate(gate, (b, t, n), h, allow_channel=False)
  return LinearProblem(
      q=query, k=key, v=value, log_gate=g,
      resets=_resets(segment_ids, b, t), beta=beta.astype(jnp.float32),
      initial_state=_check_state(initial_state, (b, n, h, value.shape[-1])),
      scale=_check_scale(scale, 1.0 / math.sqrt(h)), normalize=False,
      chunk_size=_check_chunk(chunk_size))


# ----------------------------------------------------------------------------
# Implementations: fn(problem) -> (out float32 or input dtype [B, T, N, V],
# final_state float32). Normalisation is handled here for all but "xla": the
# value gets a column of ones (the key sum rides along as one more value
# column) and the output is divided by it.


def _augment(p: LinearProblem):
  if not p.normalize:
    return p.v, p.scale
  ones = jnp.ones(p.v.shape[:-1] + (1,), p.v.dtype)
  return jnp.concatenate([p.v, ones], axis=-1), 1.0


def _normalise_out(p: LinearProblem, out):
  if not p.normalize:
    return out
  vd = p.v.shape[-1]
  out = out.astype(jnp.float32)
  return out[..., :vd] / (out[..., vd:] + NORMALIZE_EPS)


def _impl_xla(p: LinearProblem):
  from pallas_kernels.linear_scan import reference
  if p.is_delta:
    return reference.delta_rule_reference(
        p.q, p.k, p.v, p.beta, p.log_gate, scale=p.scale,
        initial_state=p.initial_state, resets=p.resets)
  return reference.linear_attention_reference(
      p.q, p.k, p.v, p.log_gate, scale=p.scale, initial_state=p.initial_state,
      resets=p.resets, normalize=p.normalize, eps=NORMALIZE_EPS)


def _impl_xla_chunked(p: LinearProblem):
  if p.is_delta:
    from attnjax.linear.delta import delta_rule_chunked
    return delta_rule_chunked(
        p.q, p.k, p.v, p.beta, p.log_gate, p.resets, scale=p.scale,
        initial_state=p.initial_state, chunk_size=p.chunk_size or 64)
  from attnjax.linear.chunked import linear_attention_chunked
  v, scale = _augment(p)
  out, state = linear_attention_chunked(
      p.q, p.k, v, p.log_gate, p.resets, scale=scale,
      initial_state=p.initial_state, chunk_size=p.chunk_size or 64)
  return _normalise_out(p, out), state


def _impl_pallas(p: LinearProblem):
  if p.is_delta:
    from attnjax.linear.delta import delta_rule_pallas
    return delta_rule_pallas(
        p.q, p.k, p.v, p.beta, p.log_gate, p.resets, scale=p.scale,
        initial_state=p.initial_state, chunk_size=p.chunk_size or 64)
  v, scale = _augment(p)
  if p.log_gate is not None and p.log_gate.ndim == 4:
    from pallas_kernels.linear_scan import channel
    cfg = None  # the kernels' default, adapted to the dtype and the GPU
    if p.chunk_size is not None:
      cfg = channel.ChannelConfig(chunk=p.chunk_size)
      if jnp.dtype(p.q.dtype) == jnp.dtype(jnp.float32):
        cfg = dataclasses.replace(cfg, block_f=16, block_v=32)
    out, state = channel.channel_gated_linear_attention(
        p.q, p.k, v, p.log_gate, p.resets, scale=scale,
        initial_state=p.initial_state, config=cfg)
    return _normalise_out(p, out), state
  from pallas_kernels.linear_scan import kernels
  cfg = kernels.default_config(p.q.dtype, p.q.shape[-1], v.shape[-1],
                               gated=p.log_gate is not None)
  if p.chunk_size is not None:
    cfg = dataclasses.replace(cfg, chunk=p.chunk_size)
    if p.chunk_size > 64:  # [C, C] tiles: 4 warps would spill registers
      cfg = dataclasses.replace(cfg, num_warps=8)
  out, state = kernels.chunked_linear_attention(
      p.q, p.k, v, p.log_gate, p.resets, scale=scale,
      initial_state=p.initial_state, config=cfg)
  return _normalise_out(p, out), state


_IMPLS = {"xla": _impl_xla, "xla_chunked": _impl_xla_chunked,
          "pallas": _impl_pallas}


def resolve(implementation) -> tuple[str, ...]:
  """The ordered implementation names to try for ``implementation``."""
  if implementation is None:
    if jax.default_backend() == "gpu":
      return ("pallas", "xla_chunked")
    return ("xla_chunked",)
  names = ((implementation,) if isinstance(implementation, str)
           else implementation)
  if not isinstance(names, Sequence) or not names:
    raise ValueError("implementation must be None, a name or a non-empty "
                     f"sequence of names, got {implementation!r}")
  for name in names:
    if name not in _IMPLS:
      raise ValueError(f"implementation {name!r} is unknown; choose from "
                       f"{list(IMPLEMENTATIONS)}")
  return tuple(names)


def run(p: LinearProblem, implementation):
  """Tries implementations in order, falling through on NotImplementedError."""
  names = resolve(implementation)
  b, t, n, f = p.q.shape
  if t == 0:  # nothing to attend: empty output, the state passes through
    cols = p.v.shape[-1] + (1 if p.normalize else 0)
    state = (jnp.zeros((b, n, f, cols), jnp.float32)
             if p.initial_state is None else p.initial_state)
    return jnp.zeros((b, 0, n, p.v.shape[-1]), jnp.float32), state
  errors = []
  for name in names:
    try:
      return _IMPLS[name](p)
    except NotImplementedError as e:
      if implementation is not None and len(names) == 1:
        raise
      errors.append(NotImplementedError(f"{name}: {e}"))
  raise ExceptionGroup("no linear-attention implementation supports this "
                       "request", errors)


def _finish(p: LinearProblem, out, state, return_final_state):
  out = out.astype(p.v.dtype)
  return (out, state) if return_final_state else out


# ----------------------------------------------------------------------------
# Public functions.


def linear_attention(query, key, value, *, feature_map=None, log_decay=None,
                     gate=None, normalize: bool = False,
                     scale: float | None = None, initial_state=None,
                     return_final_state: bool = False, segment_ids=None,
                     chunk_size: int | None = None, implementation=None):
  r"""Causal (gated) linear attention.

  The definition is the recurrence, over time t for each head:

    S_t = exp(g_t) * S_{t-1} + phi(k_t)^T v_t,    o_t = scale * phi(q_t) S_t

  with ``S`` an [F, Hv] state (F the feature dim after ``feature_map``) and
  ``g_t = log_decay[n] + gate[b, t, n]`` (0 when both are None). With
  ``normalize``, ``o_t = phi(q_t) S_t / (phi(q_t) z_t + 1e-6)`` with
  ``z_t = exp(g_t) z_{t-1} + phi(k_t)`` (Katharopoulos et al. 2020; ``scale``
  cancels).

  Args:
    query: [B, T, N, H].
    key: [B, T, K, H] with N % K == 0 (GQA / MQA).
    value: [B, T, K, Hv] (Hv may differ from H).
    feature_map: None (identity), "elu_plus_one", "relu", "taylor2" (BASED:
      ``[1, x / d^{1/4}, x (x) x / sqrt(2 d)]``, F = 1 + H + H^2) or a
      callable mapping [..., H] to [..., F].
    log_decay: float [N], <= 0: a fixed per-head decay ``exp(log_decay)``
      (RetNet, Lightning Attention-2, TransNormerLLM).
    gate: log-space data-dependent decay, [B, T, N] (Mamba-2, simple GLA) or
      [B, T, N, F] per key channel (GLA). Must be <= 0 (a decay): a
      concrete gate with positive or NaN entries raises ValueError; a
      traced one (under jit) cannot be checked, and positive values can
      overflow.
    normalize: divide by the running key sum (use a positive feature map).
    scale: default ``1 / sqrt(H)`` (1 for "taylor2", which has its own).
    initial_state: float32 [B, N, F, Hv] ([B, N, F, Hv + 1] with
      ``normalize``: the last column is z).
    return_final_state: also return the final state (same shape).
    segment_ids: int [B, T]: packed sequences; the state resets to zero
      where the id changes (``initial_state`` belongs to the first segment).
    chunk_size: tokens per chunk for the chunked implementations.
    implementation: None (fastest available), "xla", "xla_chunked",
      "pallas", or a sequence tried in order.

  Returns:
    ``out`` [B, T, N, Hv] in the input dtype, or ``(out, final_state)``.

  Raises:
    ValueError: invalid arguments (the message names the argument).
    NotImplementedError: a named implementation cannot serve the request.

  >>> import jax, jax.numpy as jnp, attnjax
  >>> q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 4))
  ...            for i in range(3))
  >>> out = attnjax.linear_attention(q, k, v, log_decay=jnp.log(
  ...     jnp.array([0.9, 0.99])))
  >>> out.shape
  (1, 8, 2, 4)
  """
  p = prepare_linear(query, key, value, feature_map=feature_map,
                     log_decay=log_decay, gate=gate, normalize=normalize,
                     scale=scale, initial_state=initial_state,
                     segment_ids=segment_ids, chunk_size=chunk_size)
  out, state = run(p, implementation)
  return _finish(p, out, state, return_final_state)


def delta_rule_attention(query, key, value, beta, *, gate=None,
                         scale: float | None = None, initial_state=None,
                         return_final_state: bool = False, segment_ids=None,
                         chunk_size: int | None = None, implementation=None):
  r"""The delta rule (DeltaNet) and, with ``gate``, Gated DeltaNet.

  The definition, with an [H, Hv] state per head (key rows):

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
    o_t = scale * q_t S_t,

  i.e. the state is decayed, then corrected towards ``v_t`` at key ``k_t``
  with strength ``beta_t``. Chunked implementations use the WY / UT form.
  The keys are used as given; DeltaNet L2-normalises them (and uses beta in
  (0, 1)) so the update is a contraction.

  Args:
    query: [B, T, N, H].
    key: [B, T, K, H] (N % K == 0).
    value: [B, T, K, Hv].
    beta: [B, T, N] write strengths.
    gate: None or log-space scalar decay [B, T, N] (<= 0).
    scale: default ``1 / sqrt(H)``.
    initial_state: float32 [B, N, H, Hv].
    return_final_state: also return the final state.
    segment_ids: int [B, T]: the state resets where the id changes.
    chunk_size: tokens per chunk (xla_chunked and pallas).
    implementation: None, "xla", "xla_chunked" or "pallas" (the UT
      transform and the chunk sweeps as Pallas kernels; H, Hv <= 256).

  Returns:
    ``out`` [B, T, N, Hv] in the input dtype, or ``(out, final_state)``.

  >>> import jax, jax.numpy as jnp, attnjax
  >>> q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 4))
  ...            for i in range(3))
  >>> k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  >>> out = attnjax.delta_rule_attention(q, k, v, jnp.full((1, 8, 2), 0.5))
  >>> out.shape
  (1, 8, 2, 4)
  """
  p = prepare_delta(query, key, value, beta, gate=gate, scale=scale,
                    initial_state=initial_state, segment_ids=segment_ids,
                    chunk_size=chunk_size)
  out, state = run(p, implementation)
  return _finish(p, out, state, return_final_state)


def linear_attention_step(query, key, value, state, *, feature_map=None,
                          log_decay=None, gate=None, normalize: bool = False,
                          scale: float | None = None):
  r"""One decoding step of ``linear_attention``: ``(out, new_state)``.

  ``new_state = exp(g) * state + phi(k)^T v`` and ``out = scale * phi(q)
  new_state`` (or the normalised form), exactly the recurrence of
  ``linear_attention`` for one token: feeding a sequence token by token
  reproduces the full call.

  Args:
    query: [B, N, H]; key: [B, K, H]; value: [B, K, Hv].
    state: float32 [B, N, F, Hv] ([B, N, F, Hv + 1] with ``normalize``).
    feature_map, log_decay, normalize, scale: as ``linear_attention``.
    gate: log-space [B, N] or [B, N, F].

  Returns:
    ``(out [B, N, Hv] in the input dtype, new_state float32)``.

  >>> import jax.numpy as jnp, attnjax
  >>> x = jnp.ones((1, 2, 4))
  >>> s = jnp.zeros((1, 2, 4, 4))
  >>> out, s = attnjax.linear_attention_step(x, x, x, s, scale=1.0)
  >>> out[0, 0].tolist()
  [4.0, 4.0, 4.0, 4.0]
  """
  _check_qkv(query, key, value, step=True)
  b, n, h = query.shape
  q, k = _apply_feature_map(feature_map, query, key)
  f = q.shape[-1]
  vd = value.shape[-1]
  ld = _check_log_decay(log_decay, n)
  g = _check_gate(gate, (b, n), f)
  state = _check_state(state, (b, n, f, vd + 1 if normalize else vd),
                       name="state")
  scale = _check_scale(scale, 1.0 if feature_map == "taylor2"
                       else 1.0 / math.sqrt(h))
  rep = n // key.shape[1]
  q = q.astype(jnp.float32)
  k = jnp.repeat(k.astype(jnp.float32), rep, axis=1)
  v = jnp.repeat(value.astype(jnp.float32), rep, axis=1)
  if normalize:
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  logd = jnp.zeros((b, n), jnp.float32)
  if ld is not None:
    logd = logd + ld[None]
  if g is not None and g.ndim == 2:
    decay = jnp.exp(logd + g)[..., None, None]
  else:
    decay = jnp.exp(logd)[..., None, None]
    if g is not None:
      decay = decay * jnp.exp(g)[..., None]
  new = decay * state + k[..., :, None] * v[..., None, :]
  out = jnp.einsum("bnf,bnfv->bnv", q, new,
                   precision=jax.lax.Precision.HIGHEST)
  if normalize:
    out = out[..., :vd] / (out[..., vd:] + NORMALIZE_EPS)
  else:
    out = scale * out
  return out.astype(query.dtype), new


def delta_rule_step(query, key, value, beta, state, *, gate=None,
                    scale: float | None = None):
  r"""One decoding step of ``delta_rule_attention``: ``(out, new_state)``.

  ``new_state = exp(g) (I - beta k^T k) state + beta k^T v`` and
  ``out = scale * q new_state``.

  Args:
    query: [B, N, H]; key: [B, K, H]; value: [B, K, Hv].
    beta: [B, N].
    state: float32 [B, N, H, Hv].
    gate: None or log-space [B, N].
    scale: default ``1 / sqrt(H)``.

  Returns:
    ``(out [B, N, Hv] in the input dtype, new_state float32)``.

  >>> import jax.numpy as jnp, attnjax
  >>> x = jnp.ones((1, 1, 2)) / jnp.sqrt(2.0)
  >>> s = jnp.zeros((1, 1, 2, 2))
  >>> out, s = attnjax.linear.delta_rule_step(x, x, x, jnp.ones((1, 1)), s)
  >>> round(float(s[0, 0, 0, 0]), 3)
  0.5
  """
  _check_qkv(query, key, value, step=True)
  b, n, h = query.shape
  _check_array(beta, "beta", 2)
  if tuple(beta.shape) != (b, n):
    raise ValueError(f"beta must have shape [B, N] = [{b}, {n}], got "
                     f"{list(beta.shape)}")
  g = _check_gate(gate, (b, n), h, allow_channel=False)
  state = _check_state(state, (b, n, h, value.shape[-1]), name="state")
  scale = _check_scale(scale, 1.0 / math.sqrt(h))
  rep = n // key.shape[1]
  hi = jax.lax.Precision.HIGHEST
  q = query.astype(jnp.float32)
  k = jnp.repeat(key.astype(jnp.float32), rep, axis=1)
  v = jnp.repeat(value.astype(jnp.float32), rep, axis=1)
  s = state if g is None else jnp.exp(g)[..., None, None] * state
  pred = jnp.einsum("bnf,bnfv->bnv", k, s, precision=hi)
  err = beta.astype(jnp.float32)[..., None] * (v - pred)
  new = s + k[..., :, None] * err[..., None, :]
  out = scale * jnp.einsum("bnf,bnfv->bnv", q, new, precision=hi)
  return out.astype(query.dtype), new
