"""attnjax.models: LanguageModel, generate, the train step, mesh training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax import testing
from attnjax.models import LanguageModel, generate, train
from attnjax.models import mesh as mesh_lib

F32 = jnp.float32
LINEAR = dict(feature_map="elu_plus_one", gate="scalar", short_conv=3)


def _model(pattern, **kw):
  kw.setdefault("linear_kwargs", LINEAR)
  kw.setdefault("num_heads", 2)
  return LanguageModel(vocab_size=23, d_model=16, pattern=pattern,
                       window_size=3, rngs=nnx.Rngs(0), **kw)


_forward = nnx.jit(lambda model, tokens: model(tokens))
_decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))


@pytest.mark.parametrize("pattern,kw", [
    ("AW", dict(tie_embeddings=True,
                attention_kwargs=dict(sinks=True, output_gate=True,
                                      qk_norm=True))),
    ("LWA", dict(num_kv_heads=1)),
])
def test_decode_equals_forward(pattern, kw):
  model = _model(pattern, **kw)
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 23)
  full = _forward(model, tokens)
  cache = model.init_cache(2, 12)
  logits, cache = _decode(model, tokens[:, :4], cache)
  outs = [logits]
  for t in range(4, 11):
    logits, cache = _decode(model, tokens[:, t:t + 1], cache)
    outs.append(logits)
  testing.assert_close(jnp.concatenate(outs, axis=1), full, F32,
                       scale=float(jnp.abs(full).max()))


def test_generate_is_greedy_decoding():
  model = _model("LA")
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 23)
  out = generate(model, prompt, 6)
  np.testing.assert_array_equal(out[:, :5], prompt)
  # Greedy: each new token is the argmax of the full forward's logits at
  # the previous position (causality makes the prefix's logits the same).
  logits = _forward(model, out)
  np.testing.assert_array_equal(out[:, 5:], jnp.argmax(logits[:, 4:-1], -1))
  sampled = generate(model, prompt, 3, temperature=1.0,
                     rng=jax.random.key(2))
  assert sampled.shape == (2, 8)
  np.testing.assert_array_equal(sampled[:, :5], prompt)
  with pytest.raises(ValueError, match="rng"):
    generate(model, prompt, 3, temperature=1.0)


def test_hybrid_model_loss_falls():
  """A two-layer linear + softmax model learns a repeated random sequence."""
  model = _model("LA")
  tx = optax.adam(1e-2)
  graphdef, state = train.init_train_state(model, tx)
  step = train.make_train_step(graphdef, tx)
  motif = jax.random.randint(jax.random.key(3), (8,), 0, 23)
  tokens = jnp.tile(motif, (4, 3))  # [4, 24]
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  testing.assert_finite(jnp.array(losses), "losses")
  assert losses[-1] < 0.25 * losses[0], losses
  # The trained parameters go back into the module.
  train.update_model(model, state)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_loss_positions_equal_the_dense_weighted_loss():
  """``loss_positions`` gathers logits; loss and gradients are unchanged."""
  model = _model("LA")
  tokens = jax.random.randint(jax.random.key(4), (3, 12), 0, 23)
  at = jnp.array([[1, 5, 7], [0, 2, 11], [9, 4, 3]], jnp.int32)
  weights = jnp.zeros((3, 12)).at[jnp.arange(3)[:, None], at].set(
      jnp.array([1.0, 0.5, 2.0]))
  dense = {"inputs": tokens, "targets": (tokens * 7) % 23,
           "weights": weights}
  sparse = dict(dense, loss_positions=at)
  full = model(tokens)
  testing.assert_close(model(tokens, logits_at=at),
                       jnp.take_along_axis(full, at[..., None], 1), F32)
  grad = lambda b: nnx.grad(lambda m: train.next_token_loss(m, b)[0])(model)
  (l1, m1), (l2, m2) = (train.next_token_loss(model, b)
                        for b in (dense, sparse))
  testing.assert_close(l2, l1, F32)
  testing.assert_close(m2["accuracy"], m1["accuracy"], F32)
  testing.assert_close(jax.tree.leaves(grad(sparse)),
                       jax.tree.leaves(grad(dense)), F32, grad=True)


def test_pattern_and_tied_embeddings():
  with pytest.raises(ValueError, match="pattern"):
    _model("AXL")
  tied = _model("A", tie_embeddings=True)
  untied = _model("A")
  count = lambda m: sum(x.size for x in jax.tree.leaves(
      nnx.state(m, nnx.Param)))
  assert count(untied) - count(tied) == 16 * 23


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "all_gather",
                                      None])
def test_mesh_step_equals_single_device_step(strategy):
  """One SGD step on a 2 (data) x 4 (seq) mesh of fake CPU devices.

  With the attention layers routed through attnjax.parallel by each
  strategy over "seq" (4 heads: Ulysses splits them over the 4 devices;
  the linear layers take LASP-2), and (None) with XLA partitioning
  everything itself.
  """
  assert len(jax.devices()) >= 8
  mesh = mesh_lib.make_mesh(data=2, seq=4)
  tx = optax.sgd(0.5)
  tokens = jax.random.randint(jax.random.key(4), (4, 33), 0, 23)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  graphdef, state = train.init_train_state(_model("LA", num_heads=4), tx)
  s1, m1 = train.make_train_step(graphdef, tx)(state, batch)
  model = _model("LA", num_heads=4)
  if strategy is not None:
    mesh_lib.enable_sequence_parallel(model, mesh, strategy=strategy)
  graphdef, state = train.init_train_state(model, tx)
  step = mesh_lib.make_sharded_train_step(graphdef, tx, mesh)
  s8, m8 = step(mesh_lib.replicate(state, mesh),
                mesh_lib.shard_batch(batch, mesh))
  what = f"strategy={strategy}"
  testing.assert_close(m8["loss"], m1["loss"], F32, name=f"loss {what}")
  testing.assert_close(m8["grad_norm"], m1["grad_norm"], F32, grad=True,
                       name=f"grad norm {what}")
  testing.assert_close(s8.params, s1.params, F32, grad=True,
                       name=f"params {what}")
  assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8


@pytest.mark.gpu
def test_gpu_mesh_step_equals_single_device_step():
  """A data x seq mesh over the real GPUs (2 x 2 on four, 1 x 2 on two).

  The softmax layers run through attnjax.parallel with the GPU kernels as
  the per-device blocks; float32 matmuls at full precision so that the
  comparison sees the partitioning, not TF32 rounding.
  """
  gpus = len(jax.devices())
  if gpus < 2:
    pytest.skip("needs 2 GPUs")
  data = 2 if gpus >= 4 else 1
  mesh = mesh_lib.make_mesh(data=data, seq=2)
  tx = optax.sgd(0.5)
  tokens = jax.random.randint(jax.random.key(5), (4, 257), 0, 23)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  with jax.default_matmul_precision("highest"):
    graphdef, state = train.init_train_state(_model("LA"), tx)
    s1, m1 = train.make_train_step(graphdef, tx)(state, batch)
    model = _model("LA")
    mesh_lib.enable_sequence_parallel(model, mesh)
    graphdef, state = train.init_train_state(model, tx)
    step = mesh_lib.make_sharded_train_step(graphdef, tx, mesh)
    s2, m2 = step(mesh_lib.replicate(state, mesh),
                  mesh_lib.shard_batch(batch, mesh))
  testing.assert_close(m2["loss"], m1["loss"], F32, name="loss")
  testing.assert_close(s2.params, s1.params, F32, grad=True, name="params")
  assert len(jax.tree.leaves(s2.params)[0].sharding.device_set) == 2 * data
