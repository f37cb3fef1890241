"""Data x sequence parallel training on a ``jax.sharding.Mesh``.

The batch's B axis is split over the ``"data"`` mesh axis and its T axis over
``"seq"``; parameters and optimiser state are replicated. Everything that
acts token by token (embeddings, projections, MLPs, norms, the loss) is
partitioned by XLA from those shardings. The mixers are not token-local:
after ``enable_sequence_parallel`` softmax layers call
``attnjax.parallel.sequence_parallel_attention`` (ring / Ulysses over the
``"seq"`` axis) and linear layers ``sequence_parallel_linear_attention``
(when present); without it XLA gathers what they need.

Example (8 devices; on CPU set ``jax.config.update("jax_num_cpu_devices",
8)`` before using JAX):

>>> import optax, jax
>>> from flax import nnx
>>> from attnjax.models import LanguageModel, mesh as mesh_lib, train
>>> mesh = mesh_lib.make_mesh(data=1, seq=1)
>>> model = LanguageModel(vocab_size=11, d_model=16, num_heads=2,
...                       pattern="A", rngs=nnx.Rngs(0))
>>> tx = optax.sgd(0.1)
>>> graphdef, state = train.init_train_state(model, tx)
>>> step = mesh_lib.make_sharded_train_step(graphdef, tx, mesh)
>>> state = mesh_lib.replicate(state, mesh)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.models import train as train_lib
from attnjax.nn.attention import MultiHeadAttention, SequenceParallel
from attnjax.nn.linear import LinearAttention

__all__ = ["batch_sharding", "enable_sequence_parallel",
           "make_sharded_train_step", "make_mesh", "replicate",
           "shard_batch"]


def make_mesh(data: int, seq: int, *, devices=None,
              axis_names: tuple[str, str] = ("data", "seq")
              ) -> jax.sharding.Mesh:
  """A (data, seq) mesh over the first ``data * seq`` devices.

  Axes are ``AxisType.Auto`` (XLA propagates shardings through the model),
  not the ``Explicit`` default of ``jax.make_mesh``.
  """
  devices = jax.devices() if devices is None else list(devices)
  if data < 1 or seq < 1 or data * seq > len(devices):
    raise ValueError(f"data * seq = {data} * {seq} must be between 1 and the "
                     f"{len(devices)} devices available")
  grid = np.asarray(devices[: data * seq]).reshape(data, seq)
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(grid, axis_names, axis_types=(auto, auto))


def enable_sequence_parallel(model: nnx.Module, mesh, *,
                             axis_name: str = "seq",
                             strategy: str = "auto") -> nnx.Module:
  """Routes every attention layer of ``model`` through ``attnjax.parallel``.

  Call it before ``train.init_train_state`` (the setting is part of the
  graphdef). Sigmoid-normalised attention layers keep their materialised
  path (XLA partitions it).

  Raises:
    NotImplementedError: ``attnjax.parallel`` is not available.
  """
  try:
    from attnjax import parallel  # noqa: PLC0415
    parallel.sequence_parallel_attention  # noqa: B018
  except (ImportError, AttributeError) as e:
    raise NotImplementedError(
        "attnjax.parallel.sequence_parallel_attention is not available; "
        "train without enable_sequence_parallel (XLA then gathers keys and "
        f"values itself): {e}") from e
  sp = SequenceParallel(mesh=mesh, axis_name=axis_name, strategy=strategy)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (MultiHeadAttention, LinearAttention)):
      module.sequence_parallel = sp
  return model


def batch_sharding(mesh, *, data_axis: str = "data",
                   seq_axis: str | None = "seq") -> NamedSharding:
  """Sharding of a [B, T] batch array: B over data, T over seq."""
  return NamedSharding(mesh, P(data_axis, seq_axis))


def shard_batch(batch: dict, mesh, *, data_axis: str = "data",
                seq_axis: str | None = "seq") -> dict:
  """``jax.device_put`` each [B, T] array of ``batch`` with B and T split."""
  s = batch_sharding(mesh, data_axis=data_axis, seq_axis=seq_axis)
  return {k: jax.device_put(v, s) for k, v in batch.items()}


def replicate(tree, mesh):
  """``jax.device_put`` every leaf of ``tree`` replicated over ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def make_sharded_train_step(graphdef, tx: optax.GradientTransformation,
                            mesh, *,
                            loss_fn: Callable = train_lib.next_token_loss,
                            data_axis: str = "data",
                            seq_axis: str | None = "seq") -> Callable:
  """``train.make_train_step`` jitted with mesh shardings.

  The state is replicated in and out; each batch array is [B, T] with B
  split over ``data_axis`` and T over ``seq_axis`` (so B and T must divide
  by the axis sizes). Metrics come back replicated.
  """
  step = train_lib.make_train_step(graphdef, tx, loss_fn=loss_fn, jit=False)
  rep = NamedSharding(mesh, P())
  data = batch_sharding(mesh, data_axis=data_axis, seq_axis=seq_axis)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnums=0)
