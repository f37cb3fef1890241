"""The chunked parallel form of gated linear attention in jnp ("xla_chunked").

The sequence is cut into chunks of C tokens (Lightning Attention-2, GLA).
Inside a chunk the output is a masked matmul, ``(q k^T * D) v`` with
``D[i, j] = exp(G_i - G_j)`` for ``j <= i``; across chunks it is carried by
the state: each chunk's own contribution ``sum_j exp(G_C - G_j) k_j^T v_j``
is computed in parallel, a prefix scan over chunks gives the
state entering every chunk, and ``exp(G_i) q_i S_start`` adds it in.

Numerics: ``G`` is the cumulative log-gate *within the chunk*, so every
exponent above is a sum of at most C log-gates and is <= 0 for decays: nothing
overflows, and a decay that underflows is one that is truly negligible.
Per-key-channel gates (GLA) cannot factor ``exp(G_i - G_j)`` out of the
matmul over channels safely, so the chunk is split once more into sub-chunks
(GLA's secondary chunking): blocks below the diagonal use reference points
between the two sub-chunks (all factors <= 1), and the diagonal blocks are
computed elementwise.

Autodiff gives the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["linear_attention_chunked", "local_state", "segment_masks"]

_HI = lax.Precision.HIGHEST
_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mm(spec, *operands, dtype):
  """einsum with operands rounded to ``dtype`` and a float32 result.

  bf16/f16 operands run natively with float32 accumulation where the backend
  has such a matmul; the CPU backend has none, so there the rounded operands
  are upcast (the products are exact in float32 either way). float32 runs at
  full precision (no TF32).
  """
  low = jnp.dtype(dtype) in _LOW
  if low and jax.default_backend() != "cpu":
    ops = [x.astype(dtype) for x in operands]
    return jnp.einsum(spec, *ops, preferred_element_type=jnp.float32)
  ops = [(x.astype(dtype) if low else x).astype(jnp.float32)
         for x in operands]
  return jnp.einsum(spec, *ops, precision=_HI,
                    preferred_element_type=jnp.float32)


def pad_time(x, length):
  """Zero-pads axis 1 of x to ``length``."""
  if x is None or x.shape[1] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, length - x.shape[1])
  return jnp.pad(x, widths)


class SegmentMasks:
  """Where state resets fall inside each chunk.

  Attributes (C the chunk length; all bool):
    same: [B, nc, C, C]: tokens i and j lie in the same reset-free stretch.
    upto: [B, nc, C]: no reset in [chunk start, i] (token i sees the state
      that entered the chunk).
    after: [B, nc, C]: no reset in (j, chunk end] (token j survives into
      the state that leaves the chunk).
    whole: [B, nc]: no reset in the chunk.
  """

  def __init__(self, resets, chunk):
    b, t = resets.shape
    rc = jnp.cumsum(resets.reshape(b, t // chunk, chunk).astype(jnp.int32),
                    axis=-1)
    self.same = rc[..., :, None] == rc[..., None, :]
    self.upto = rc == 0
    self.after = rc == rc[..., -1:]
    self.whole = rc[..., -1] == 0


def segment_masks(resets, chunk):
  return None if resets is None else SegmentMasks(resets, chunk)


def _expand(x, ndim):
  while x.ndim < ndim:
    x = x[..., None]
  return x


def _intra_per_channel(q, k, gc, seg, sub, dtype):
  """exp-weighted q k^T inside chunks for per-channel gates.

  q [B, nc, C, K, G, F], k [B, nc, C, K, F], gc (chunk-local cumulative log
  gates) [B, nc, C, K, G, F]. Returns A [B, nc, K, G, C, C] (unmasked above
  the diagonal is zero; segments not yet applied).
  """
  b, nc, c, kh, g, f = q.shape
  ns = c // sub
  qb = q.reshape(b, nc, ns, sub, kh, g, f).astype(jnp.float32)
  kb = k.reshape(b, nc, ns, sub, kh, f).astype(jnp.float32)
  gb = gc.reshape(b, nc, ns, sub, kh, g, f)
  # Diagonal sub-blocks, elementwise: sum_f q_if k_jf exp(G_if - G_jf).
  tri = jnp.tril(jnp.ones((sub, sub), bool))[:, :, None, None, None]
  diff = gb[:, :, :, :, None] - gb[:, :, :, None, :]  # [b,nc,ns,i,j,K,G,F]
  e = jnp.exp(jnp.where(tri, diff, -jnp.inf))
  a_diag = jnp.sum(qb[:, :, :, :, None] * kb[:, :, :, None, :, :, None, :]
                   * e, axis=-1)  # [b, nc, ns, i, j, K, G]
  # Off-diagonal sub-blocks I > J through reference points: q_I relative to
  # the end of block I-1, k_J relative to the end of block J, and the decay
  # between the two; every exponent is <= 0.
  g_end = gb[:, :, :, -1]  # [b, nc, ns, K, G, F]
  g_ref = jnp.zeros_like(g_end[:, :, :1])
  if ns > 1:
    g_ref = jnp.concatenate([g_ref, g_end[:, :, :-1]], axis=2)
  qh = qb * jnp.exp(gb - g_ref[:, :, :, None])
  kh_ = kb[..., None, :] * jnp.exp(g_end[:, :, :, None] - gb)
  below = (jnp.arange(ns)[:, None] > jnp.arange(ns)[None, :])
  mid = jnp.exp(jnp.where(below[:, :, None, None, None],
                          g_ref[:, :, :, None] - g_end[:, :, None, :],
                          -jnp.inf))  # [b, nc, I, J, K, G, F]
  a_off = mm("bcIikgf,bcIJkgf,bcJjkgf->bckgIiJj", qh, mid, kh_, dtype=dtype)
  eye = jnp.eye(ns, dtype=jnp.float32)
  a_diag = jnp.einsum("bcIijkg,IJ->bckgIiJj", a_diag, eye, precision=_HI)
  return (a_off + a_diag).reshape(b, nc, kh, g, c, c)


def _prefix_affine(a, b):
  """Inclusive prefix of the affine maps ``x -> a_c x + b_c`` along axis 1.

  Hillis-Steele doubling (log2(nc) steps of shifted products), written with
  slices and concatenation only: ``lax.associative_scan``'s strided slices
  make XLA:CPU crash when its gradient is compiled inside ``shard_map``.
  """
  off, n = 1, b.shape[1]
  while off < n:
    pa = jnp.concatenate([jnp.ones_like(a[:, :off]), a[:, :-off]], axis=1)
    pb = jnp.concatenate([jnp.zeros_like(b[:, :off]), b[:, :-off]], axis=1)
    a, b = a * pa, a * pb + b
    off *= 2
  return b


def linear_attention_chunked(q, k, v, log_gate=None, resets=None, *,
                             scale: float, initial_state=None,
                             chunk_size: int = 64, sub_chunk: int = 16):
  """Chunked gated linear attention (see the module docstring).

  Args:
    q: [B, T, N, F] feature-mapped queries (float32 or bfloat16).
    k: [B, T, K, F].
    v: [B, T, K, V].
    log_gate: None, [B, T, N] or [B, T, N, F] float32 log decays (<= 0).
    resets: None or bool [B, T]: the state is zeroed before token t.
    scale: output scale.
    initial_state: None or float32 [B, N, F, V].
    chunk_size: C.
    sub_chunk: sub-chunk length for per-channel gates.

  Returns:
    ``(out float32 [B, T, N, V], final_state float32 [B, N, F, V])``.
  """
  b, t, n, f = q.shape
  kh, vd = k.shape[2], v.shape[-1]
  g = n // kh
  dtype = q.dtype
  c = int(chunk_size)
  nc = -(-t // c)
  tp = nc * c
  per_channel = log_gate is not None and log_gate.ndim == 4
  q, k, v, log_gate, resets = (pad_time(x, tp) for x in
                               (q, k, v, log_gate, resets))
  q = q.reshape(b, nc, c, kh, g, f)
  k = k.reshape(b, nc, c, kh, f)
  v = v.reshape(b, nc, c, kh, vd)
  seg = segment_masks(resets, c)
  gc = None
  if log_gate is not None:
    shape = (b, nc, c, kh, g) + ((f,) if per_channel else ())
    gc = jnp.cumsum(log_gate.astype(jnp.float32).reshape(shape), axis=2)

  # Intra-chunk: masked (and decayed) q k^T, then times v.
  causal = jnp.tril(jnp.ones((c, c), bool))
  mask = causal if seg is None else causal & seg.same[:, :, None, None]
  if per_channel:
    sub = sub_chunk if c % sub_chunk == 0 else c
    a = jnp.where(mask, _intra_per_channel(q, k, gc, seg, sub, dtype), 0.0)
  else:
    a = mm("bcikgf,bcjkf->bckgij", q, k, dtype=dtype)
    if gc is None:
      a = jnp.where(mask, a, 0.0)
    else:
      gt = jnp.moveaxis(gc, 2, -1)  # [b, nc, K, G, C]
      a = a * jnp.exp(jnp.where(mask, gt[..., :, None] - gt[..., None, :],
                                -jnp.inf))
  out = mm("bckgij,bcjkv->bcikgv", a * scale, v, dtype=dtype)

  # Each chunk's own state contribution and its total decay.
  full_heads = gc is not None or initial_state is not None
  wk = None if gc is None else jnp.exp(gc[:, :, -1:] - gc)
  if seg is not None:
    after = _expand(seg.after, 5 if wk is None else wk.ndim)
    wk = after if wk is None else wk * after
  if wk is None:
    ks = k[:, :, :, :, None, :]
  else:
    ks = k[:, :, :, :, None, :] * (wk if per_channel else wk[..., None])
  ds = mm("bcjkgf,bcjkv->bckgfv", ks, v, dtype=dtype)
  if full_heads and ds.shape[3] == 1:
    ds = jnp.broadcast_to(ds, (b, nc, kh, g, f, vd))
  decay = None
  if gc is not None:
    decay = jnp.exp(gc[:, :, -1])  # [b, nc, K, G(, F)]
    decay = decay[..., None] if per_channel else decay[..., None, None]
  if seg is not None:
    whole = seg.whole.astype(jnp.float32)[:, :, None, None, None, None]
    decay = whole if decay is None else decay * whole

  # Prefix over chunks: the state leaving every chunk.
  s0 = None
  if initial_state is not None:
    s0 = initial_state.astype(jnp.float32).reshape(b, kh, g, f, vd)
  if decay is None:
    s_end = jnp.cumsum(ds, axis=1)
    if s0 is not None:
      s_end = s_end + s0[:, None]
  else:
    if s0 is not None:
      ds = ds.at[:, 0].add(decay[:, 0] * s0)
    decay = jnp.broadcast_to(decay, ds.shape[:4] + decay.shape[4:])
    s_end = _prefix_affine(decay, ds)
  first = (jnp.zeros_like(s_end[:, :1]) if s0 is None else s0[:, None])
  # (No zero-size slices: XLA:CPU crashes on them inside eager shard_map.)
  s_start = (first if nc == 1 else
             jnp.concatenate([first, s_end[:, :-1]], axis=1))

  # Inter-chunk: queries read the state that entered their chunk.
  wq = None if gc is None else jnp.exp(gc)
  if seg is not None:
    upto = _expand(seg.upto, 5 if wq is None else wq.ndim)
    wq = upto if wq is None else wq * upto
  qs = q if wq is None else q * (wq if per_channel else wq[..., None])
  if s_start.shape[3] == 1:
    out = out + scale * mm("bcikgf,bckfv->bcikgv", qs, s_start[:, :, :, 0],
                           dtype=dtype)
  else:
    out = out + scale * mm("bcikgf,bckgfv->bcikgv", qs, s_start, dtype=dtype)
  out = out.reshape(b, tp, n, vd)[:, :t]
  final = jnp.broadcast_to(s_end[:, -1], (b, kh, g, f, vd)).reshape(
      b, n, f, vd)
  return out, final


def local_state(k, v, log_gate=None, resets=None, *, num_heads: int):
  """The state a whole sequence leaves from zero, and its total log decay.

  One matmul: ``S = sum_j w_j k_j^T v_j`` with ``w_j`` the decay from j to
  the end (an exclusive reverse cumulative sum of log gates, never a
  difference of large sums), zero before the last reset.

  Args:
    k: [B, T, K, F]; v: [B, T, K, V].
    log_gate: None, [B, T, N] or [B, T, N, F].
    resets: None or bool [B, T].
    num_heads: N.

  Returns:
    ``(state float32 [B, N, F, V], log_decay float32 [B, N, F])``: the
    state is ``exp(log_decay)[..., None] * S_in + state`` after the sequence
    (``log_decay`` is ``-inf`` where a reset wiped ``S_in``).
  """
  b, t, kh, f = k.shape
  vd = v.shape[-1]
  g = num_heads // kh
  w = None
  total = jnp.zeros((b, kh, g, f), jnp.float32)
  if log_gate is not None:
    lg = log_gate.astype(jnp.float32).reshape(b, t, kh, g, -1)
    shifted = jnp.concatenate([lg[:, 1:], jnp.zeros_like(lg[:, :1])], axis=1)
    w_log = jnp.flip(jnp.cumsum(jnp.flip(shifted, 1), axis=1), 1)
    w = jnp.exp(w_log)  # [B, T, K, G, F|1]
    total = total + jnp.sum(lg, axis=1)
  if resets is not None:
    # Tokens before the last reset do not survive.
    after = jnp.flip(jnp.cumsum(jnp.flip(resets[:, 1:].astype(jnp.int32), 1),
                                axis=1), 1)
    after = jnp.concatenate([after, jnp.zeros((b, 1), jnp.int32)], axis=1)
    keep = (after == 0).astype(jnp.float32)[:, :, None, None, None]
    w = keep if w is None else w * keep
    total = jnp.where(jnp.any(resets, axis=1)[:, None, None, None], -jnp.inf,
                      total)
  ks = k[:, :, :, None, :] if w is None else k[:, :, :, None, :] * w
  s = mm("btkgf,btkv->bkgfv", ks, v, dtype=k.dtype)
  s = jnp.broadcast_to(s, (b, kh, g, f, vd)).reshape(b, num_heads, f, vd)
  return s, total.reshape(b, num_heads, f)
