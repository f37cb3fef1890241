"""Run the Mosaic GPU attention kernels on CPU in Pallas' GPU interpreter.

Pallas (jax 0.11.2) simulates Mosaic GPU kernels on CPU: warpgroups as
threads, shared memory, mbarriers with phase checks, TMA copies. What our
kernels use beyond its dispatcher, this module adds, for tests only:

* ``wgmma_accumulator_store`` (``acc_ref[...] = x``: the rescale of O kept in
  a WGMMA accumulator across a loop);
* ``wgmma`` whose A operand is a register array (``P @ V``), where the
  interpreter expects a shared-memory ref;
* the fused backward's two extras (``BwdConfig(fused_dq=True)``): TMA
  stores that add into global memory (``copy_smem_to_gmem(...,
  reduction_op="add")``, done here as a locked read-add-write) and the
  named barrier that joins its two consumer warpgroups
  (``mosaic_gpu_bwd._pair_barrier``);
* the forward's ping-pong named barriers (``mosaic_gpu._sched_barrier``:
  each consumer's turn handed to the next, 2 or 3 consumers).

Both kinds of named barrier are modelled with the interpreter's own named
barriers (other inline PTX stays ignored). The interpreter runs every
matmul synchronously, so it checks the data flow, the block tables, the
masks, the barrier protocols (deadlocks, unobserved phases) and the
persistent schedule, but not wgmma asynchrony or timing. A deadlock would
hang the interpreter's threads: a watchdog fails the kernel instead after
``DEADLOCK_SECONDS``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_JAX = ("0.11.2",)


def available() -> str | None:
  """None if the interpreter can be patched here, else the reason."""
  if jax.__version__ not in SUPPORTED_JAX:
    return (f"the interpreter shim targets jax {SUPPORTED_JAX}, found "
            f"{jax.__version__}")
  try:
    _patch()
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot patch the Mosaic GPU interpreter: {e!r}"
  return None


def _modules():
  # pylint: disable=g-import-not-at-top
  from jax._src import callback
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc
  from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret as ji
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory as memory
  from jax._src.state import types as state_types
  return callback, gc, ji, memory, state_types


def _acc_store(*, token, mesh_location, thread, acc_allocation_key_as_array,
               val, source_info=None):
  _, gc, _, memory, _ = _modules()
  key = gc.HostAllocationKey.from_array(acc_allocation_key_as_array)
  sm = gc._get_shared_memory()  # pylint: disable=protected-access
  info = memory.GPULoggingInfo(mesh_location, thread, source_info)
  sm.store_buffer_content(key, sm.access(key, ()), np.asarray(val), thread,
                          logging_info=info)
  return token


def _wgmma_register_a(*, token, mesh_location, thread,
                      acc_allocation_key_as_array, acc_transforms, a_value,
                      b_allocation_key_as_array, b_transforms,
                      source_info=None):
  _, gc, _, memory, _ = _modules()
  noop = gc._remove_noop_transforms  # pylint: disable=protected-access
  acc_key = gc.HostAllocationKey.from_array(acc_allocation_key_as_array)
  b_key = gc.HostAllocationKey.from_array(b_allocation_key_as_array)
  b_transforms = jax.tree.map(int, noop(b_transforms))
  acc_transforms = jax.tree.map(int, noop(acc_transforms))
  sm = gc._get_shared_memory()  # pylint: disable=protected-access
  info = memory.GPULoggingInfo(mesh_location, thread, source_info)
  b, _, _ = sm.get_buffer_content(b_key, sm.access(b_key, b_transforms),
                                  thread, logging_info=info)
  rng = sm.access(acc_key, acc_transforms)
  acc, _, _ = sm.get_buffer_content(acc_key, rng, thread, logging_info=info)
  res = acc + np.matmul(np.asarray(a_value), b, dtype=acc.dtype)
  sm.store_buffer_content(acc_key, rng, res, thread, logging_info=info)
  return token


def _interpret_acc_store(self, eqn, token, get_invals):
  callback, gc, _, _, _ = _modules()
  acc, val = get_invals()
  token = callback.io_callback(
      functools.partial(gc.fail_on_exception(_acc_store),
                        source_info=eqn.source_info),
      gc.TOKEN_SHAPE_DTYPE, token=token, mesh_location=self.mesh_location,
      thread=self.thread, acc_allocation_key_as_array=acc, val=val)
  return token, val


def _make_interpret_wgmma(original):
  def interpret_wgmma(self, eqn, token, get_invals):
    callback, gc, ji, _, state_types = _modules()
    if isinstance(eqn.invars[1].aval, state_types.AbstractRef):
      return original(self, eqn, token, get_invals)
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    acc_t, _, b_t = jax.tree.unflatten(
        jax.tree_util.treedef_tuple((
            eqn.params["acc_transforms_tree"] or empty,
            eqn.params["a_transforms_tree"] or empty,
            eqn.params["b_transforms_tree"] or empty)), leaves)
    acc, acc_t = ji.resolve_ref(eqn.invars[0].aval, acc, acc_t)
    b, b_t = ji.resolve_ref(eqn.invars[2].aval, b, b_t)
    return callback.io_callback(
        functools.partial(gc.fail_on_exception(_wgmma_register_a),
                          source_info=eqn.source_info),
        gc.TOKEN_SHAPE_DTYPE, token=token, mesh_location=self.mesh_location,
        thread=self.thread, acc_allocation_key_as_array=acc,
        acc_transforms=acc_t, a_value=a, b_allocation_key_as_array=b,
        b_transforms=b_t), []
  return interpret_wgmma


# The interpreter runs warpgroups and CTAs as threads; reductions into one
# global buffer must not interleave their read-add-write.
_REDUCE_LOCK = threading.Lock()


def _reduce_add_task(gc):
  class ReduceAddTask(gc.AsyncCopySmemToGmemTask):
    """``cp.reduce.async.bulk ... add``: dst += src, in bounds only."""

    def __call__(self, tma_thread_id):
      sm = gc._get_shared_memory()  # pylint: disable=protected-access
      self.pre_read(tma_thread_id, sm)
      val, _, _ = sm.get_buffer_content(
          self.src_allocation_key, self.src_access, self.thread,
          logging_info=self.logging_info)
      self.post_read(tma_thread_id, sm)
      with _REDUCE_LOCK:
        cur, _, _ = sm.get_buffer_content(
            self.dst_allocation_key, self.dst_access, self.thread,
            logging_info=self.logging_info)
        if cur is None or cur.shape != val.shape:
          raise IndexError("reduce-add out of bounds: "
                           f"[{self.dst_access}] of {self.dst_allocation_key}")
        sm.store_buffer_content(self.dst_allocation_key, self.dst_access,
                                np.asarray(cur + val, cur.dtype), self.thread,
                                logging_info=self.logging_info)
      self.post_write(tma_thread_id, sm)
  return ReduceAddTask


def _make_copy_smem_to_gmem(gc, original):
  task_cls = _reduce_add_task(gc)

  def copy_smem_to_gmem(*, reduction_op, **kw):
    if reduction_op is None:
      return original(reduction_op=None, **kw)
    if reduction_op != "add" or kw["predicate"] is not None:
      raise NotImplementedError(f"reduction_op={reduction_op!r}")
    noop = gc._remove_noop_transforms  # pylint: disable=protected-access
    src_key = gc.HostAllocationKey.from_array(kw["src_allocation_key_as_array"])
    dst_key = gc.HostAllocationKey.from_array(kw["dst_allocation_key_as_array"])
    src_t = jax.tree.map(int, noop(kw["src_transforms"]))
    dst_t = jax.tree.map(int, noop(kw["dst_transforms"]))
    sm = gc._get_shared_memory()  # pylint: disable=protected-access
    clock = sm.incr_clock(kw["thread"]) if sm.detect_races else None
    sm.execute_async_task(task_cls(
        mesh_location=kw["mesh_location"], thread=kw["thread"],
        src_allocation_key=src_key, src_access=sm.access(src_key, src_t),
        dst_allocation_key=dst_key, dst_access=sm.access(dst_key, dst_t),
        source_info=kw["source_info"], clock=clock))
    return kw["token"]
  return copy_smem_to_gmem


def _is_pair_barrier(fn):
  return (fn.__module__ == "pallas_kernels.flash.mosaic_gpu_bwd"
          and fn.__qualname__ == "_pair_barrier.<locals>.emit")


def _is_sched_barrier(fn):
  return (fn.__module__ == "pallas_kernels.flash.mosaic_gpu"
          and fn.__qualname__ == "_sched_barrier.<locals>.emit")


def _make_inline_mgpu(gc, original):
  def interpret_inline_mgpu(self, eqn, token, get_invals):
    fn = eqn.params["mgpu_fn"]
    if _is_pair_barrier(fn):
      # ``bar.sync 10, 256``: both consumer warpgroups.
      return gc.call_named_barrier(
          token, self.mesh_location, self.thread, 10, num_threads=256,
          sync=True, source_info=eqn.source_info), []
    if _is_sched_barrier(fn):
      # The forward's ping-pong: ``bar.{sync,arrive} BASE + w, 256`` on
      # this consumer's barrier, or on the next one's with ``other``.
      from pallas_kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top
      env = inspect.getclosurevars(fn).nonlocals
      wg = jnp.asarray(self.thread.warpgroup_id, jnp.int32)
      if env["other"]:
        wg = (wg + 1) % env["num_wgs"]
      return gc.call_named_barrier(
          token, self.mesh_location, self.thread,
          mosaic_gpu._SCHED_BARRIER_BASE + wg,  # pylint: disable=protected-access
          num_threads=256, sync=env["op"] == "sync",
          source_info=eqn.source_info), []
    return original(self, eqn, token, get_invals)
  return interpret_inline_mgpu


def _patch():
  _, gc, ji, _, _ = _modules()
  cls = ji.JaxprInterpreter
  if getattr(cls, "_attnjax_patched", False):
    return
  src = textwrap.dedent(inspect.getsource(cls.interpret))
  anchor = "        case gpu_primitives.wgmma_accumulator_deref_p:\n"
  if anchor not in src:
    raise RuntimeError("unexpected JaxprInterpreter.interpret source")
  src = src.replace(anchor, (
      "        case gpu_primitives.wgmma_accumulator_store_p:\n"
      "          token, out = self._interpret_acc_store(\n"
      "              eqn, token, deferred_invals)\n") + anchor)
  namespace = dict(ji.__dict__)
  exec(compile(src, ji.__file__, "exec"), namespace)  # pylint: disable=exec-used
  cls.interpret = namespace["interpret"]
  cls._interpret_acc_store = _interpret_acc_store  # pylint: disable=protected-access
  cls._interpret_wgmma_ref_p = _make_interpret_wgmma(  # pylint: disable=protected-access
      cls._interpret_wgmma_ref_p)  # pylint: disable=protected-access
  cls._interpret_inline_mgpu_p = _make_inline_mgpu(  # pylint: disable=protected-access
      gc, cls._interpret_inline_mgpu_p)  # pylint: disable=protected-access
  gc.copy_smem_to_gmem = gc.fail_on_exception(
      _make_copy_smem_to_gmem(gc, gc.copy_smem_to_gmem))
  cls._attnjax_patched = True


# A kernel whose barriers never complete would hang the test run: after
# this many seconds the watchdog fails the kernel instead (the cases here
# take 5-15 s on two cores).
DEADLOCK_SECONDS = float(os.environ.get("ATTNJAX_INTERPRET_DEADLOCK_S", 300))


def _abort_all(seconds):
  _, gc, _, _, _ = _modules()
  sm = gc._shared_memory  # pylint: disable=protected-access
  if sm is None:
    return
  sm.set_failed(TimeoutError(
      f"Mosaic GPU kernel still running in the interpreter after {seconds} "
      "s: a barrier that never completes (deadlock)?"), None, top_level=False)
  # Named barriers live outside the allocations set_failed aborts.
  with sm.lock:
    named = list(sm.named_barriers.values())
  for barrier in named:
    barrier.abort()


@contextlib.contextmanager
def interpret_mode(deadlock_seconds=None):
  """Kernels traced inside run in the GPU interpreter (shim applied)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  _patch()
  seconds = deadlock_seconds or DEADLOCK_SECONDS
  params = plgpu.InterpretGPUParams(inline_mgpu="ignore")
  watchdog = threading.Timer(seconds, _abort_all, (seconds,))
  watchdog.daemon = True
  watchdog.start()
  try:
    with plgpu.force_gpu_interpret_mode(params):
      yield
  except BaseException:
    # The interpreter keeps global state that a failed kernel poisons.
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    raise
  finally:
    watchdog.cancel()
