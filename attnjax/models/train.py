"""An optax train step for NNX models, written as pure functions.

The model is split once into a static ``graphdef`` and its parameters; the
step is a pure ``(TrainState, batch) -> (TrainState, metrics)`` function, so
it can be jitted with explicit shardings (``attnjax.models.mesh``) or vmapped.

A batch is a dict of arrays:

* ``inputs``: int [B, T] tokens fed to the model;
* ``targets``: int [B, T] the token to predict at each position;
* ``weights`` (optional): float [B, T] loss weights (e.g. 0 on padding, or 1
  only at the answer positions of a recall task);
* ``segment_ids`` / ``positions`` (optional): forwarded to the model;
* ``loss_positions`` (optional): int [B, P], the only positions whose loss
  counts (their weights still apply): the model is asked for their logits
  alone (``LanguageModel(..., logits_at=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["TrainState", "init_train_state", "make_optimizer",
           "make_train_step", "next_token_loss", "update_model"]


class TrainState(NamedTuple):
  """Parameters (an ``nnx.State``), optimiser state and step count."""
  params: Any
  opt_state: Any
  step: jax.Array


def make_optimizer(learning_rate: float = 1e-3, *, total_steps: int = 1000,
                   warmup_steps: int | None = None,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                   b2: float = 0.98) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, global-norm clipping."""
  warmup = (max(1, total_steps // 10) if warmup_steps is None
            else warmup_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup, max(total_steps, warmup + 1),
      end_value=learning_rate * 0.1)
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  parts.append(optax.adamw(schedule, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)


def next_token_loss(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy of ``targets`` (and accuracy)."""
  extra = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
  targets = batch["targets"]
  w = batch.get("weights")
  w = (jnp.ones(targets.shape, jnp.float32) if w is None
       else w.astype(jnp.float32))
  at = batch.get("loss_positions")
  if at is not None:
    extra["logits_at"] = at
    targets = jnp.take_along_axis(targets, at, axis=1)
    w = jnp.take_along_axis(w, at, axis=1)
  logits = model(batch["inputs"], **extra).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.maximum(w.sum(), 1e-9)
  loss = (ce * w).sum() / total
  acc = ((jnp.argmax(logits, -1) == targets) * w).sum() / total
  return loss, {"loss": loss, "accuracy": acc}


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation):
  """Splits ``model``: returns ``(graphdef, TrainState)``.

  Every array of the model must be an ``nnx.Param`` (true of attnjax's).
  """
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, TrainState(params, tx.init(params),
                              jnp.zeros((), jnp.int32))


def update_model(model: nnx.Module, state: TrainState) -> None:
  """Writes ``state.params`` back into ``model`` (in place)."""
  nnx.update(model, state.params)


def make_train_step(graphdef, tx: optax.GradientTransformation, *,
                    loss_fn: Callable = next_token_loss, jit: bool = True
                    ) -> Callable:
  """``step(state, batch) -> (state, metrics)``: one optax update.

  Args:
    graphdef: from ``init_train_state``.
    tx: the optax transformation ``state.opt_state`` was made with.
    loss_fn: ``(model, batch) -> (loss, metrics dict)``.
    jit: wrap in ``jax.jit`` (use False to vmap or shard it yourself; see
      ``attnjax.models.mesh.make_sharded_train_step``).

  Example:

  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> from attnjax.models import LanguageModel, train
  >>> model = LanguageModel(vocab_size=11, d_model=16, num_heads=2,
  ...                       pattern="A", rngs=nnx.Rngs(0))
  >>> tx = optax.adam(1e-2)
  >>> graphdef, state = train.init_train_state(model, tx)
  >>> step = train.make_train_step(graphdef, tx)
  >>> tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 11
  >>> batch = {"inputs": tokens, "targets": tokens}
  >>> state, metrics = step(state, batch)
  >>> int(state.step)
  1
  """

  def loss(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch)

  def step(state: TrainState, batch):
    grads, metrics = jax.grad(loss, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(params, opt_state, state.step + 1), metrics

  return jax.jit(step, donate_argnums=0) if jit else step
