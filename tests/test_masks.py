"""attnjax.masks: dense forms, composition, hashing and tile classification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnjax import masks


def dense(m, t, s):
  return np.asarray(m.as_array(t, s))


def test_causal_matches_tril():
  np.testing.assert_array_equal(dense(masks.Causal(), 5, 7),
                                np.tril(np.ones((5, 7), bool)))
  np.testing.assert_array_equal(dense(masks.Causal(offset=2), 4, 6),
                                np.tril(np.ones((4, 6), bool), k=2))


def test_local_window_matches_jax_nn_definition():
  # jax.nn: token c at index 6 with window (3, 2) attends to indices 3..8.
  m = dense(masks.LocalWindow(3, 2), 10, 10)
  assert m[6].nonzero()[0].tolist() == [3, 4, 5, 6, 7, 8]


def test_chunked_causal():
  m = dense(masks.ChunkedCausal(3), 7, 7)
  i, j = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
  np.testing.assert_array_equal(m, (j <= i) & (i // 3 == j // 3))


def test_prefix_and_streaming_pattern():
  m = dense((masks.LocalWindow(2, 0) | masks.Prefix(1)) & masks.Causal(), 6, 6)
  assert m[5].nonzero()[0].tolist() == [0, 3, 4, 5]
  assert m[0].nonzero()[0].tolist() == [0]


def test_block_sparse_per_head():
  lay = np.zeros((2, 2, 3), bool)
  lay[0, 0, 0] = lay[0, 1, 2] = lay[1, :, 1] = True
  m = masks.BlockSparse(lay, (2, 4))
  d = dense(m, 4, 12)
  assert d.shape == (2, 4, 12)
  assert d[0, :2, :4].all() and not d[0, :2, 4:].any()
  assert d[1, :, 4:8].all() and not d[1, :, :4].any()
  assert m.num_heads == 2


def test_from_function():
  fn = lambda q, k: (q - k) % 3 == 0
  np.testing.assert_array_equal(
      dense(masks.FromFunction(fn), 5, 5),
      np.fromfunction(lambda q, k: (q - k) % 3 == 0, (5, 5)))


def test_masks_are_hashable_static_args():
  a = masks.Causal() & masks.LocalWindow(4, 0)
  b = masks.Causal() & masks.LocalWindow(4, 0)
  assert a == b and hash(a) == hash(b)
  lay = np.eye(3, dtype=bool)
  assert masks.BlockSparse(lay, (4, 4)) == masks.BlockSparse(lay.copy(),
                                                             (4, 4))
  assert len({masks.BlockSparse(lay, (4, 4)),
              masks.BlockSparse(lay.copy(), (4, 4))}) == 1

  traces = []

  @jax.jit
  def f(x, m):
    traces.append(1)
    return jnp.where(m.as_array(4, 4), x, 0.0)

  f = jax.jit(f.__wrapped__, static_argnums=1)
  f(jnp.ones((4, 4)), a)
  f(jnp.ones((4, 4)), b)
  assert len(traces) == 1


def test_bool_raises():
  with pytest.raises(TypeError, match="&"):
    bool(masks.Causal())
  with pytest.raises(TypeError):
    _ = masks.Causal() and masks.Prefix(2)


@pytest.mark.parametrize("bad", [
    lambda: masks.LocalWindow(-1, 0),
    lambda: masks.ChunkedCausal(0),
    lambda: masks.Prefix(-2),
    lambda: masks.BlockSparse(np.ones((2, 2, 2, 2)), (1, 1)),
    lambda: masks.BlockSparse(np.ones((2, 2)), (0, 1)),
    lambda: masks.Causal(1.5),
])
def test_invalid_arguments(bad):
  with pytest.raises(ValueError):
    bad()


def test_block_sparse_layout_too_small():
  m = masks.BlockSparse(np.ones((1, 2, 2), bool), (4, 4))
  with pytest.raises(ValueError, match="does not cover"):
    m.block_kinds(16, 8, 4, 4)


def test_misaligned_block_sparse_refuses_kernel_predicate():
  m = masks.BlockSparse(np.ones((1, 4, 4), bool), (6, 6))
  m.block_kinds(24, 24, 4, 4)  # conservative kinds are fine
  with pytest.raises(NotImplementedError):
    m.block_kinds(24, 24, 4, 4, need_aux=True)


def _check_classification(m, t, s, bq, bk):
  """Every tile's kind is consistent with the dense mask; kernel_predicate is
  exact inside PARTIAL tiles."""
  d = dense(m, t, s)
  if d.ndim == 2:
    d = d[None]
  kinds, aux = m.block_kinds(t, s, bq, bk, need_aux=True)
  assert kinds.shape[1:] == (-(-t // bq), -(-s // bk))
  for h in range(d.shape[0]):
    hk = min(h, kinds.shape[0] - 1)
    for i in range(kinds.shape[1]):
      for j in range(kinds.shape[2]):
        tile = d[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        kind = kinds[hk, i, j]
        if kind == masks.EMPTY:
          assert not tile.any(), (h, i, j)
        elif kind == masks.FULL:
          assert tile.all(), (h, i, j)
        else:
          qi = np.arange(i * bq, min((i + 1) * bq, t))[:, None]
          kj = np.arange(j * bk, min((j + 1) * bk, s))[None, :]
          a = None if aux is None else aux[hk, i, j]
          got = np.broadcast_to(np.asarray(m.kernel_predicate(
              jnp.asarray(qi), jnp.asarray(kj), a)), tile.shape)
          np.testing.assert_array_equal(got, tile, err_msg=str((h, i, j)))


LEAVES = [
    masks.Causal(), masks.Causal(offset=5), masks.Causal(offset=-3),
    masks.LocalWindow(4, 0), masks.LocalWindow(3, 6),
    masks.LocalWindow(None, 2), masks.ChunkedCausal(6), masks.Prefix(3),
    masks.FromFunction(lambda q, k: (q + k) % 4 != 1), masks.Full(),
]


@st.composite
def mask_trees(draw, depth=2):
  if depth == 0 or draw(st.booleans()):
    if draw(st.integers(0, 4)) == 0:
      lay = np.asarray(draw(st.lists(st.booleans(), min_size=2 * 3 * 3,
                                     max_size=2 * 3 * 3))).reshape(2, 3, 3)
      return masks.BlockSparse(lay, (8, 8))
    return draw(st.sampled_from(LEAVES))
  left = draw(mask_trees(depth=depth - 1))
  right = draw(mask_trees(depth=depth - 1))
  return left & right if draw(st.booleans()) else left | right


@given(m=mask_trees(), t=st.integers(1, 24), s=st.integers(1, 24),
       bq=st.sampled_from([1, 2, 4, 8]), bk=st.sampled_from([1, 4, 8]))
def test_classification_property(m, t, s, bq, bk):
  _check_classification(m, t, s, bq, bk)


def numpy_visibility(m, t, s):
  """The documented definition of each mask, written again in NumPy
  (independent of ``Mask.__call__``, which ``as_array`` and the
  reference evaluate): bool [T, S], or [N, T, S] with a BlockSparse."""
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  if isinstance(m, masks.And):
    return numpy_visibility(m.left, t, s) & numpy_visibility(m.right, t, s)
  if isinstance(m, masks.Or):
    return numpy_visibility(m.left, t, s) | numpy_visibility(m.right, t, s)
  if isinstance(m, masks.Full):
    return np.ones((t, s), bool)
  if isinstance(m, masks.Causal):
    return j - i <= m.offset
  if isinstance(m, masks.LocalWindow):
    lo = np.ones((t, s), bool) if m.left is None else j >= i - m.left
    hi = np.ones((t, s), bool) if m.right is None else j <= i + m.right
    return lo & hi
  if isinstance(m, masks.ChunkedCausal):
    return (j <= i) & (i // m.chunk == j // m.chunk)
  if isinstance(m, masks.Prefix):
    return np.broadcast_to(j < m.n, (t, s))
  if isinstance(m, masks.BlockSparse):
    bq, bk = m.block_shape
    return np.asarray(m.layout)[:, i // bq, j // bk]
  if isinstance(m, masks.FromFunction):
    return np.broadcast_to(np.vectorize(
        lambda a, b: bool(m.fn(a, b)))(i, j), (t, s))
  raise TypeError(type(m))


@pytest.mark.parametrize("m", LEAVES + [masks.BlockSparse(
    np.random.default_rng(0).random((2, 3, 4)) < 0.5, (8, 6))],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("t,s", [(1, 1), (7, 19), (19, 7), (24, 24)])
def test_each_mask_matches_numpy_definition(m, t, s):
  want = numpy_visibility(m, t, s)
  got = dense(m, t, s)
  np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


@given(m=mask_trees(), t=st.integers(1, 24), s=st.integers(1, 24))
def test_masks_match_numpy_definitions(m, t, s):
  # Every leaf and every And/Or tree of them against the NumPy definitions
  # (negative Causal offsets, one-sided windows, prefixes, block layouts).
  want = numpy_visibility(m, t, s)
  got = dense(m, t, s)
  np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_causal_tiles_are_sparse():
  kinds, _ = masks.Causal().block_kinds(1024, 1024, 128, 128)
  counts = np.bincount(kinds.ravel(), minlength=3)
  # 8 diagonal tiles are partial, 28 below are full, 28 above are skipped.
  assert counts.tolist() == [28, 8, 28]


def test_block_fn_for_long_from_function():
  m = masks.FromFunction(lambda q, k: k <= q)
  with pytest.raises(NotImplementedError):
    m.block_kinds(1 << 14, 1 << 14, 128, 128)
  m = masks.FromFunction(
      lambda q, k: k <= q,
      block_fn=lambda q0, q1, k0, k1: np.where(
          k0 > q1, masks.EMPTY, np.where(k1 <= q0, masks.FULL,
                                         masks.PARTIAL)))
  kinds, _ = m.block_kinds(1 << 14, 1 << 14, 128, 128)
  ref, _ = masks.Causal().block_kinds(1 << 14, 1 << 14, 128, 128)
  np.testing.assert_array_equal(kinds, ref)
