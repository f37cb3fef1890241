"""One process of the multi-host sequence-parallel test (see
tests/test_parallel_multihost.py). Run as

    python tests/multihost/sp_worker.py <process_id> <num_processes> <port>

Each process owns 4 CPU devices; jax.distributed.initialize joins them into
one 8-device mesh with gloo collectives across processes. Every process
builds the same random inputs, runs sequence_parallel_attention (forward and
gradients) on global arrays sharded over all 8 devices, gathers the results
and compares them with the single-process reference on the full arrays.
Prints "WORKER OK <id>" on success; any mismatch raises (nonzero exit).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

LOCAL_DEVICES = 4


def main():
  pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=60)
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import attnjax  # noqa: PLC0415
  from attnjax import parallel, testing  # noqa: PLC0415

  assert jax.process_count() == nproc, jax.process_count()
  assert jax.device_count() == nproc * LOCAL_DEVICES, jax.device_count()
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("seq",), axis_types=(AxisType.Explicit,))
  inp = testing.attention_inputs(jax.random.key(0), batch=1, q_len=4 * n,
                                 num_heads=n, num_kv_heads=2, head_dim=8)
  host = {name: np.asarray(getattr(inp, name))
          for name in ("q", "k", "v", "d_out")}
  seq = NamedSharding(mesh, P(None, "seq"))

  def global_array(x):
    return jax.make_array_from_callback(x.shape, seq, lambda idx: x[idx])

  args = [global_array(host[name]) for name in ("q", "k", "v", "d_out")]

  def ref_vjp(q, k, v, d):
    out, vjp = jax.vjp(lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"), q, k, v)
    return out, vjp(d)

  want = jax.jit(ref_vjp)(*(jnp.asarray(host[name])
                             for name in ("q", "k", "v", "d_out")))
  for strategy in ("ring", "ulysses", "all_gather"):
    def f(q, k, v, d, strategy=strategy):
      fn = lambda q, k, v: parallel.sequence_parallel_attention(
          q, k, v, mesh=mesh, strategy=strategy, is_causal=True)
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(d)

    got = jax.jit(f)(*args)
    got = multihost_utils.process_allgather(got, tiled=True)
    testing.assert_close(got[0], want[0], jnp.float32, name=f"{strategy} out")
    testing.assert_close(got[1], want[1], jnp.float32, grad=True,
                         name=f"{strategy} grads")
    print(f"process {pid}: {strategy} matches the reference", flush=True)
  jax.distributed.shutdown()
  print(f"WORKER OK {pid}", flush=True)


if __name__ == "__main__":
  main()
