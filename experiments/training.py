"""A compact training loop shared by the experiments.

Batches are generated on the device inside the jitted step from a PRNG key
(synthetic tasks), and ``steps_per_call`` optimiser steps run in one
``lax.scan`` so Python dispatch does not dominate small models on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.models import train as train_lib
from experiments import common


def train(model: nnx.Module, batch_fn: Callable[[jax.Array], dict], *,
          steps: int, learning_rate: float, key: jax.Array,
          steps_per_call: int = 25, warmup_steps: int | None = None,
          weight_decay: float = 0.1,
          callback: Callable[[int, nnx.Module], dict] | None = None,
          callback_every: int | None = None, desc: str = "train",
          leave: bool = False, disable: bool = False):
  """Trains ``model`` in place on ``batch_fn(key)`` batches.

  Args:
    model: an NNX model whose arrays are all ``nnx.Param``.
    batch_fn: ``key -> batch`` (see ``attnjax.models.train``), traceable.
    steps: optimiser steps (rounded up to a multiple of steps_per_call).
    learning_rate: peak AdamW learning rate (warmup, cosine decay).
    key: PRNG key for the batches.
    steps_per_call: steps fused in one jitted ``lax.scan``.
    callback: ``(step, model) -> dict`` evaluated every ``callback_every``
      steps (and at the end); results are returned in ``history``.
    desc: progress-bar label (``disable`` hides the bar).

  Returns:
    ``(history, losses)``: callback results and the per-step training loss.
  """
  calls = -(-steps // steps_per_call)
  total = calls * steps_per_call
  tx = train_lib.make_optimizer(learning_rate, total_steps=total,
                                warmup_steps=warmup_steps,
                                weight_decay=weight_decay)
  graphdef, state = train_lib.init_train_state(model, tx)
  one_step = train_lib.make_train_step(graphdef, tx, jit=False)

  @jax.jit
  def run(state, key):
    def body(state, k):
      state, metrics = one_step(state, batch_fn(k))
      return state, metrics["loss"]
    return jax.lax.scan(body, state, jax.random.split(key, steps_per_call))

  every = callback_every or total
  history, losses = [], []
  bar = common.progress(total=total, desc=desc, leave=leave, unit="step",
                        disable=disable)
  for c in range(calls):
    state, loss = run(state, jax.random.fold_in(key, c))
    losses.append(np.asarray(loss))
    done = (c + 1) * steps_per_call
    bar.update(steps_per_call)
    bar.set_postfix(loss=f"{float(loss[-1]):.3f}")
    if callback is not None and (done % every < steps_per_call
                                 or c == calls - 1):
      train_lib.update_model(model, state)
      history.append(dict(step=done, **callback(done, model)))
  bar.close()
  train_lib.update_model(model, state)
  return history, np.concatenate(losses)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _metrics(graphdef, batch_fn, params, key):
  _, m = train_lib.next_token_loss(nnx.merge(graphdef, params), batch_fn(key))
  return m


def evaluate(model: nnx.Module, batch_fn: Callable[[jax.Array], dict],
             key: jax.Array, num_batches: int = 4) -> dict[str, float]:
  """Mean loss and weighted accuracy of ``model`` on fresh batches."""
  graphdef, params = nnx.split(model, nnx.Param)
  ms = [_metrics(graphdef, batch_fn, params, k)
        for k in jax.random.split(key, num_batches)]
  return {name: float(jnp.mean(jnp.stack([m[name] for m in ms])))
          for name in ms[0]}
