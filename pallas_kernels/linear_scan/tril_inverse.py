"""Inverse of unit lower-triangular matrices ``I + L`` (Pallas).

The UT transform of the delta rule needs ``T = (I + L)^{-1}`` for one
``[C, C]`` strictly lower-triangular ``L`` per chunk: thousands of small
independent matrices, where a batched triangular solve in XLA is slow
(about 8.7 ms for the 16k chunks of 64 x 64 at B*T = 64k, N = 16 on an
H100). Here one program inverts one matrix by blocks of 16 rows:

* each diagonal block ``T_ii = (I + L_ii)^{-1}`` by forward substitution,
  row by row (exact in float32: no powers of L are formed, so no
  cancellation when keys are nearly aligned);
* each block below the diagonal by ``T_ij = -T_ii sum_{j <= m < i} L_im
  T_mj``, 16 x 16 matmuls (float32 operands: three TF32 passes compiled).

Backward (custom_vjp): ``dL = -tril(T^T dT T^T, -1)``, one more kernel.
Depends only on jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["unit_lower_inverse", "unit_lower_inverse_reference"]

_F32 = jnp.float32
_B = 16  # rows per block


def _mm(interpret):
  prec = None if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3

  def mm(a, b, dims=((1,), (0,))):
    return lax.dot_general(a, b, (dims, ((), ())), precision=prec,
                           preferred_element_type=_F32)
  return mm


def _diag_inverse(l):
  """(I + l)^{-1} of a [16, 16] strictly lower-triangular block."""
  rows = lax.broadcasted_iota(jnp.int32, (_B, _B), 0)
  cols = lax.broadcasted_iota(jnp.int32, (_B, _B), 1)
  t = (rows == cols).astype(_F32)
  for r in range(1, _B):
    lr = jnp.sum(jnp.where(rows == r, l, 0.0), axis=0)  # L[r, :]
    new = jnp.sum(lr[:, None] * t, axis=0)  # (L[r, :] @ T)
    t = jnp.where(rows == r, t - new[None, :], t)
  return t


def _diag_inverse_doubling(l, mm):
  """(I + l)^{-1} of a [16, 16] strictly lower-triangular block by block
  doubling: with D the inverse of the block diagonal of blocks of size s
  and L_s the lower-left [s, s] quarters of the blocks of size 2s,
  ``D <- D - D L_s D`` gives the inverse for blocks of size 2s (for one
  pair: [[A, 0], [C, B]]^{-1} = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]).
  From D = I - L_1: three levels, six 16 x 16 matmuls instead of fifteen
  dependent row steps. Like the substitution, it forms only entries of
  inverses of diagonal blocks, never powers of l.
  """
  rows = lax.broadcasted_iota(jnp.int32, (_B, _B), 0)
  cols = lax.broadcasted_iota(jnp.int32, (_B, _B), 1)

  def quarter(size):  # lower-left [size, size] of each 2*size block
    bi, bj = rows // size, cols // size
    return jnp.where(jnp.logical_and(bi == bj + 1, bi % 2 == 1), l, 0.0)

  t = (rows == cols).astype(_F32) - quarter(1)
  size = 2
  while size < _B:
    t = t - mm(mm(t, quarter(size)), t)
    size *= 2
  return t


def _inverse_kernel(l_ref, t_ref, *, c: int, interpret: bool):
  mm = _mm(interpret)
  nb = c // _B
  blk = lambda i: pl.ds(i * _B, _B)  # noqa: E731
  t = {}
  for i in range(nb):
    t[i, i] = _diag_inverse(l_ref[blk(i), blk(i)].astype(_F32))
    for j in range(i - 1, -1, -1):
      acc = jnp.zeros((_B, _B), _F32)
      for m in range(j, i):
        acc = acc + mm(l_ref[blk(i), blk(m)].astype(_F32), t[m, j])
      t[i, j] = -mm(t[i, i], acc)
    for j in range(nb):
      t_ref[blk(i), blk(j)] = (t[i, j] if j <= i
                               else jnp.zeros((_B, _B), _F32))


def _inverse_bwd_kernel(t_ref, dt_ref, dl_ref, *, c: int, interpret: bool):
  mm = _mm(interpret)
  t, dt = t_ref[...], dt_ref[...]
  x = mm(t, dt, ((0,), (0,)))  # T^T dT
  x = mm(x, t, ((1,), (1,)))  # (T^T dT) T^T
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  dl_ref[...] = jnp.where(cols < rows, -x, 0.0)


def _call(kernel, args, c, interpret, name):
  m = args[0].shape[0]
  spec = pl.BlockSpec((None, c, c), lambda i: (i, 0, 0))
  return pl.pallas_call(
      functools.partial(kernel, c=c, interpret=interpret),
      grid=(m,),
      in_specs=[spec] * len(args),
      out_specs=spec,
      out_shape=jax.ShapeDtypeStruct((m, c, c), _F32),
      compiler_params=(None if interpret else plgpu.CompilerParams(
          num_warps=4, num_stages=1)),
      interpret=interpret,
      name=name,
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _inverse(l, interpret):
  return _call(_inverse_kernel, [l], l.shape[-1], interpret,
               "unit_lower_inverse")


def _inverse_fwd(l, interpret):
  t = _inverse(l, interpret)
  return t, t


def _inverse_bwd(interpret, t, dt):
  return (_call(_inverse_bwd_kernel, [t, dt.astype(_F32)], t.shape[-1],
                interpret, "unit_lower_inverse_bwd"),)


_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def unit_lower_inverse(l, *, interpret: bool | None = None):
  """``(I + L)^{-1}`` for strictly lower-triangular ``L`` [..., C, C].

  Only the strictly lower triangle of ``l`` is read (the diagonal and
  above are taken as 0). C must be a multiple of 16. Returns float32,
  differentiable (the gradient is strictly lower-triangular).

  >>> import jax.numpy as jnp
  >>> l = jnp.tril(jnp.ones((16, 16)), -1)
  >>> t = unit_lower_inverse(l, interpret=True)
  >>> float(t[1, 0]), float(t[2, 0]), float(t[2, 1])
  (-1.0, 0.0, -1.0)
  """
  c = l.shape[-1]
  if l.ndim < 2 or l.shape[-2] != c:
    raise ValueError(f"l must be [..., C, C], got {l.shape}")
  if c % _B:
    raise NotImplementedError(f"C = {c} is not a multiple of {_B}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  l = jnp.where(cols < rows, l.astype(_F32), 0.0)
  lead = l.shape[:-2]
  t = _inverse(l.reshape((-1, c, c)), bool(interpret))
  return t.reshape(lead + (c, c))


def unit_lower_inverse_reference(l):
  """The same through ``lax.linalg.triangular_solve`` (float32)."""
  c = l.shape[-1]
  l = jnp.tril(l.astype(_F32), -1)
  eye = jnp.broadcast_to(jnp.eye(c, dtype=_F32), l.shape)
  return lax.linalg.triangular_solve(eye + l, eye, left_side=True,
                                     lower=True, unit_diagonal=True)
