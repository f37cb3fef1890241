"""Token-by-token recurrences of the linear-attention family: the oracle.

These are the definitions, written as a ``lax.scan`` over time in float32,
with no chunking and nothing shared with the chunked forms or the kernels.
Inputs are already feature-mapped (``phi(q)``, ``phi(k)``) and every decay is
a natural-log gate per step, so the recurrences read exactly as in the
papers (layout: B batch, T time, N query heads, K key/value heads with
N % K == 0, F feature dim, V value dim; the state is [F, V], key rows by
value columns):

  linear:      S_t = exp(g_t) * S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
  normalised:  z_t = exp(g_t) * z_{t-1} + k_t,  o_t = q_t S_t / (q_t z_t + eps)
  delta rule:  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1}
                     + beta_t k_t^T v_t,       o_t = scale * q_t S_t

``g_t`` is a scalar per head ([B, T, N]) or one value per key channel
([B, T, N, F], GLA); ``resets[b, t]`` zeroes the state before token t is
added (packed sequences).

>>> import jax.numpy as jnp
>>> x = jnp.ones((1, 3, 1, 2))
>>> o, s = linear_attention_reference(x, x, x, scale=1.0)
>>> o[0, :, 0, 0].tolist()
[2.0, 4.0, 6.0]
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["delta_rule_reference", "linear_attention_reference"]

_HI = lax.Precision.HIGHEST


def _heads(x, n):
  """[B, T, K, D] -> [B, T, N, D] by repeating each key/value head."""
  return jnp.repeat(x, n // x.shape[2], axis=2)


def _time_major(x):
  return None if x is None else jnp.moveaxis(x, 1, 0)


def _prepare(q, k, v, log_gate, resets):
  b, t, n, _ = q.shape
  f32 = jnp.float32
  q = q.astype(f32)
  k = _heads(k.astype(f32), n)
  v = _heads(v.astype(f32), n)
  if log_gate is None:
    log_gate = jnp.zeros((b, t, n), f32)
  log_gate = log_gate.astype(f32)
  if resets is None:
    resets = jnp.zeros((b, t), bool)
  return q, k, v, log_gate, resets.astype(bool)


def _decayed(x, log_gate_t):
  """exp(g_t) * x for a [B, N, F, V] state (or a [B, N, F] one).

  Computed as x + expm1(g_t) x. A weak decay is applied at every step, and
  exp(g) rounded to float32 near 1 (one ulp is 6e-8) misstates the decay
  rate g: by 2.2e-8, i.e. 2e-4 of g, for g = -1e-4 even correctly rounded,
  and an H100's float32 exp is biased there (log error 1.4e-8 on average
  for g in -[0.5, 1.5]e-4). The same error at every step compounds over the
  ~1/|g| steps the state remembers into a ~1e-4 relative error of the
  output. expm1(g) keeps g's relative precision.
  """
  m = jnp.expm1(log_gate_t)
  while m.ndim < x.ndim:
    m = m[..., None]
  return x + m * x


def linear_attention_reference(q, k, v, log_gate=None, *, scale: float,
                               initial_state=None, resets=None,
                               normalize: bool = False, eps: float = 1e-6):
  """Gated linear attention by its recurrence.

  Args:
    q: [B, T, N, F] feature-mapped queries.
    k: [B, T, K, F] feature-mapped keys.
    v: [B, T, K, V].
    log_gate: None, [B, T, N] or [B, T, N, F]: log of the per-step decay.
    scale: output scale (cancels when ``normalize``).
    initial_state: [B, N, F, V] ([B, N, F, V + 1] when ``normalize``: the
      last column is the key sum z).
    resets: bool [B, T]; True zeroes the state before token t.
    normalize: divide by the running (decayed) key sum (Katharopoulos et al.).
    eps: added to the normaliser.

  Returns:
    ``(out float32 [B, T, N, V], final_state float32)``, the state shaped
    like ``initial_state``.
  """
  b, t, n, f = q.shape
  vd = v.shape[-1]
  q, k, v, log_gate, resets = _prepare(q, k, v, log_gate, resets)
  s0 = jnp.zeros((b, n, f, vd), jnp.float32)
  z0 = jnp.zeros((b, n, f), jnp.float32)
  if initial_state is not None:
    initial_state = initial_state.astype(jnp.float32)
    if normalize:
      s0, z0 = initial_state[..., :vd], initial_state[..., vd]
    else:
      s0 = initial_state

  def step(carry, x):
    s, z = carry
    q_t, k_t, v_t, g_t, r_t = x
    keep = jnp.where(r_t, 0.0, 1.0)[:, None, None]
    s = keep[..., None] * _decayed(s, g_t) + (
        k_t[..., :, None] * v_t[..., None, :])
    num = jnp.einsum("bnf,bnfv->bnv", q_t, s, precision=_HI)
    if normalize:
      z = keep * _decayed(z, g_t) + k_t
      den = jnp.einsum("bnf,bnf->bn", q_t, z, precision=_HI)
      out = num / (den[..., None] + eps)
    else:
      out = scale * num
    return (s, z), out

  xs = tuple(_time_major(a) for a in (q, k, v, log_gate, resets))
  (s, z), out = lax.scan(step, (s0, z0), xs)
  final = jnp.concatenate([s, z[..., None]], -1) if normalize else s
  return jnp.moveaxis(out, 0, 1), final


def delta_rule_reference(q, k, v, beta, log_gate=None, *, scale: float,
                         initial_state=None, resets=None):
  """(Gated) DeltaNet by its recurrence.

  Args:
    q, k: [B, T, N, F] and [B, T, K, F] (DeltaNet expects L2-normalised k).
    v: [B, T, K, V].
    beta: [B, T, N] write strengths.
    log_gate: None or [B, T, N]: log of the scalar decay (Gated DeltaNet).
    scale: output scale.
    initial_state: [B, N, F, V].
    resets: bool [B, T]; True zeroes the state before token t.

  Returns:
    ``(out float32 [B, T, N, V], final_state float32 [B, N, F, V])``.
  """
  b, t, n, f = q.shape
  vd = v.shape[-1]
  q, k, v, log_gate, resets = _prepare(q, k, v, log_gate, resets)
  beta = beta.astype(jnp.float32)
  s0 = (jnp.zeros((b, n, f, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))

  def step(s, x):
    q_t, k_t, v_t, b_t, g_t, r_t = x
    s = _decayed(jnp.where(r_t[:, None, None, None], 0.0, s), g_t)
    pred = jnp.einsum("bnf,bnfv->bnv", k_t, s, precision=_HI)
    err = b_t[..., None] * (v_t - pred)
    s = s + k_t[..., :, None] * err[..., None, :]
    return s, scale * jnp.einsum("bnf,bnfv->bnv", q_t, s, precision=_HI)

  xs = tuple(_time_major(a) for a in (q, k, v, beta, log_gate, resets))
  s, out = lax.scan(step, s0, xs)
  return jnp.moveaxis(out, 0, 1), s
