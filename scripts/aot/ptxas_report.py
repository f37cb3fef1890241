"""Registers and spills of the Pallas Triton kernels, compiled for an H100
on a machine without a GPU (developer tool, not part of CI).

XLA's CUDA plugin compiles without a device from a target description
(``h100_sxm.txtpb`` beside this file); with ``ptxas -v`` its log names each
kernel with its registers, stack frame and spills. The same compile shows
Triton compile-time blowups (the first chunk-parallel GLA gradient kernel
took 155 s here and minutes on the GPU; the current one 2 s).

Set-up once (nothing is installed into the project's venv)::

  python scripts/aot/ptxas_report.py --fetch /tmp/cudaplug

downloads jax-cuda13-plugin / jax-cuda13-pjrt 0.11.2 and nvidia-cuda-nvcc
(for ptxas) with pip and unpacks them into /tmp/cudaplug/site. Then::

  python scripts/aot/ptxas_report.py --plugin /tmp/cudaplug/site \\
      --case delta [--config '{"num_warps_ut": 4}'] [--t 4096] [--b 16]
  python scripts/aot/ptxas_report.py --plugin /tmp/cudaplug/site \\
      --case gla --config '{"chunk": 64}'

``--loads`` also dumps each Triton kernel's IR (``--xla_dump_to``) and
lists, per loop of its final TTGIR (before the lowering to LLVM), the
loads that Triton's pipeliner left synchronous (``tt.load``, with their
tensor types) beside the count it turned into asynchronous copies: a
small per-chunk vector loaded synchronously inside a sequential loop
waits on memory every step (the delta sweeps' weights, run40; see
``DeltaConfig.prefetch_weights``; with it the same loads are listed,
still synchronous, but their values are used only one step later). The
dump makes the compile several times slower (T = 32k delta: 113 s
against 20).

Cases (bf16, N = 16, H = Hv = 128, the benchmark's shapes, forward and
backward): ``delta`` (gated delta rule, ``DeltaConfig``), ``gla``
(per-channel gates, ``ChannelConfig``), ``scalar`` (scalar gates,
``KernelConfig``), ``triton`` (the portable flash attention kernels,
full attention), ``mosaic`` (the Hopper flash attention kernels, B = 1,
``--h`` 64 or 128, ``--causal``; ``--config`` holds ``BwdConfig`` fields,
e.g. ``{"fused_dq": true}``, ``FwdConfig`` fields under ``"fwd"`` and the
forward module's step forms under ``"forms"`` (``{"_P_SMEM": true}``);
Mosaic GPU runs ptxas itself and its ``MOSAIC_GPU_DUMP_PTXAS`` files are
read, warnings included: a wgmma serialisation would show there). Prints
one line per Pallas kernel and the compile time. ``--sass N`` (mosaic)
also assembles each dumped PTX for sm_90a and lists, from ``nvdisasm``,
the opcode mix of each kernel's N innermost loops that hold wgmma or MUFU
instructions (a forward's per-block steps: e.g. 453 instructions a step at
H = 64, of which 66 MUFU and 12 HGMMA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PALLAS_PREFIXES = ("linear_scan", "delta_rule", "flash", "attnjax_flash",
                   "mosaic")


def fetch(dest):
  site = os.path.join(dest, "site")
  os.makedirs(site, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                  "jax-cuda13-plugin==0.11.2", "jax-cuda13-pjrt==0.11.2",
                  "nvidia-cuda-nvcc", "nvidia-cuda-nvdisasm", "-d", dest],
                 check=True)
  import zipfile  # noqa: PLC0415
  for name in os.listdir(dest):
    if name.endswith(".whl"):
      with zipfile.ZipFile(os.path.join(dest, name)) as z:
        z.extractall(site)
  print(f"unpacked into {site}")


def _ptxas_dir(site):
  for root, _, files in os.walk(site):
    if "ptxas" in files:
      return root
  raise SystemExit(f"no ptxas under {site}")


def child(case, config, b, t, h=128, causal=False, dtype="bf16",
          primal=False):
  """Compile the case's forward+backward (``primal``: the forward alone)
  for an H100 (runs with the plugin on sys.path and JAX_PLATFORMS=cpu)."""
  sys.path.insert(0, ROOT)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax._src.mesh import AbstractDevice  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415

  with open(os.path.join(HERE, "h100_sxm.txtpb")) as fh:
    target = fh.read()
  topo = topologies.get_topology_desc(platform="cuda", topology_name="h100",
                                      topology="1x1x1",
                                      target_config=target)
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  n = 16
  bf16 = {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype]  # the operands

  def sd(shape, dt=bf16):
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  x = (b, t, n, h)
  if case == "delta":
    from pallas_kernels.linear_scan import delta  # noqa: PLC0415
    cfg = delta.DeltaConfig(**config)
    args = (sd(x), sd(x), sd(x), sd((b, t, n)), sd((b, t, n), jnp.float32))

    def fwd(q, k, v, beta, g):
      return delta.delta_rule(q, k, v, beta, g, scale=h ** -0.5,
                              config=cfg, interpret=False)[0]
  elif case == "gla":
    from pallas_kernels.linear_scan import channel  # noqa: PLC0415
    cfg = channel.ChannelConfig(**config)
    args = (sd(x), sd(x), sd(x), sd(x, jnp.float32))

    def fwd(q, k, v, g):
      return channel.channel_gated_linear_attention(
          q, k, v, g, scale=h ** -0.5, config=cfg, interpret=False)[0]
  elif case == "scalar":
    # ``"gate": false`` in --config: no gate (the ungated default tiling).
    from pallas_kernels.linear_scan import kernels  # noqa: PLC0415
    config = dict(config)
    gated = config.pop("gate", True)
    cfg = kernels.default_config(bf16, h, h, gated=gated)
    if config:
      import dataclasses  # noqa: PLC0415
      cfg = dataclasses.replace(cfg, **config)
    args = (sd(x), sd(x), sd(x)) + ((sd((b, t, n), jnp.float32),)
                                    if gated else ())

    def fwd(q, k, v, g=None):
      return kernels.chunked_linear_attention(
          q, k, v, g, scale=h ** -0.5, config=cfg, interpret=False)[0]
  elif case == "triton":
    from pallas_kernels.flash import triton as ftriton  # noqa: PLC0415
    args = (sd(x), sd(x), sd(x))

    def fwd(q, k, v):
      return ftriton.flash_attention(q, k, v, mask=None)[0]
  elif case == "mosaic":
    from attnjax.softmax import pallas_mosaic  # noqa: PLC0415
    from attnjax.softmax.problem import make_problem  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415

    from pallas_kernels.flash import mosaic_gpu, mosaic_gpu_bwd  # noqa: PLC0415
    config = dict(config or {})
    if "profile" in config:  # [events, dir]: the dK/dV kernel's profiler
      mosaic_gpu_bwd._PROFILE = tuple(config.pop("profile"))  # pylint: disable=protected-access
      # Its trace dump is a host callback, which cannot be lowered without
      # a GPU backend: dropped here, the kernel compiles as on the GPU.
      jax.debug.callback = lambda *a, **k: None
    # {"forms": {"_P_SMEM": true}}: the forward module's opt-in step forms.
    for name, value in config.pop("forms", {}).items():
      if not hasattr(mosaic_gpu, name):
        raise SystemExit(f"mosaic_gpu has no {name}")
      setattr(mosaic_gpu, name, value)
    # {"soft_cap": 30.0} / {"sinks": true}: those features in the call.
    soft_cap = config.pop("soft_cap", None)
    with_sinks = config.pop("sinks", False)
    fcfg = dataclasses.replace(mosaic_gpu.default_fwd_config(h),
                               **config.pop("fwd", {}))
    bcfg = dataclasses.replace(mosaic_gpu_bwd.default_bwd_config(h), **config)
    x = (b, t, n, h)
    args = (sd(x), sd(x), sd(x))

    def fwd(q, k, v):
      sinks = jnp.zeros((n,), jnp.float32) if with_sinks else None
      p, _ = make_problem(q, k, v, is_causal=causal, sinks=sinks,
                          logits_soft_cap=soft_cap)
      return pallas_mosaic.mosaic_attention(p, fwd_config=fcfg,
                                          bwd_config=bcfg)[0]
  else:
    raise SystemExit(f"unknown case {case}")

  def loss(*a):
    return jnp.sum(fwd(*a).astype(jnp.float32) ** 2)
  grad = jax.grad(loss, argnums=tuple(range(len(args))))
  if primal:  # the undifferentiated call (e.g. the chained linear forward)
    grad = fwd
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
      abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                     num_cores=132, platform="gpu"))
  t0 = time.time()
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",))
  lowered.compile()
  print(f"COMPILE_SECONDS {time.time() - t0:.1f}", flush=True)


def loop_loads(text):
  """[(loop number, [sync load tensor types], async copies)] of one
  kernel's TTGIR text (generic MLIR form): a loop's body runs from its
  ``"scf.for"`` line until the region nesting (``({`` opens a region,
  ``})`` closes one) is back at that line's depth. Loads in a nested
  loop count for the outer one too."""
  out, active, depth = [], [], 0
  for line in text.splitlines():
    if '"scf.for"' in line:
      active.append((len(out), depth))
      out.append([len(out), [], 0])
    for entry, _ in active:
      if '"tt.load"' in line:
        m = re.search(r"-> (tensor<.*>) \"", line) or re.search(
            r"-> (tensor<[^\n]*)$", line)
        out[entry][1].append(m.group(1) if m else "?")
      elif "async_copy_global_to_local" in line:
        out[entry][2] += 1
    depth += line.count("({") - line.count("})")
    while active and depth <= active[-1][1]:
      active.pop()
  return [tuple(e) for e in out]


def report_loads(folder):
  """Prints ``loop_loads`` for every Triton kernel dumped in ``folder``
  (``<module>.<kernel>.triton-to-llvm.txt``), from its IR just before
  SCFToControlFlowPass: the final TTGIR, loops still structured."""
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".triton-to-llvm.txt"):
      continue
    with open(os.path.join(folder, name)) as fh:
      text = fh.read()
    dumps = re.split(r"^// -----// IR Dump ", text, flags=re.M)
    final = next((d for d in dumps if d.startswith(
        "Before SCFToControlFlowPass")), "")
    kernel = name.split(".")[1] if name.count(".") >= 3 else name
    loops = loop_loads(final)
    if not loops:
      print(f"  {kernel}: no loops")
    for i, sync, n_async in loops:
      print(f"  {kernel} loop {i}: {n_async} async copies, "
            f"{len(sync)} synchronous loads {sorted(set(sync))}")


def parse_mosaic(folder):
  """The same table from Mosaic GPU's dumped ptxas logs, one entry per
  kernel in compile order (every kernel's entry is called the same)."""
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".ptxas"):
      base = name[:-len(".ptxas")]
      with open(os.path.join(folder, name)) as fh:
        for v in parse(fh.read()).values():
          out[f"mosaic:{base}"] = v
  return out


def sass_loops(sass_text, top=3):
  """The instruction mix of a kernel's innermost loops, from nvdisasm's
  listing: each backward branch closes a loop (label .. branch); those
  holding wgmma (HGMMA) or MUFU instructions are kept, the ``top``
  smallest printed (the per-block steps; larger ones nest them).

  Returns ``[(n_instructions, {opcode: count})]``, opcodes without their
  modifiers (``MUFU.EX2`` counts as ``MUFU``)."""
  labels, ops = {}, []
  for line in sass_text.splitlines():
    m = re.match(r"^\s*(\.L_x_\d+):", line)
    if m:
      labels[m.group(1)] = len(ops)
      continue
    m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
    if m:
      body = re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip())
      ops.append(body)
  loops = []
  for i, body in enumerate(ops):
    if body.startswith("BRA"):
      m = re.search(r"(\.L_x_\d+)", body)
      if m and labels.get(m.group(1), i + 1) <= i:
        seg = [o.split()[0].split(".")[0] for o in ops[labels[m.group(1)]:i + 1]]
        counts = {}
        for o in seg:
          counts[o] = counts.get(o, 0) + 1
        if counts.get("HGMMA") or counts.get("MUFU"):
          loops.append((len(seg), dict(sorted(counts.items(),
                                              key=lambda kv: -kv[1]))))
  return sorted(loops, key=lambda x: x[0])[:top]


def report_sass(folder, site, top):
  """ptxas (sm_90a) and nvdisasm on each dumped Mosaic GPU PTX; prints the
  instruction mix of each kernel's innermost wgmma/MUFU loops."""
  tools = {}
  for tool in ("ptxas", "nvdisasm"):
    for root, _, files in os.walk(site):
      if tool in files:
        tools[tool] = os.path.join(root, tool)
        os.chmod(tools[tool], 0o755)
  if "nvdisasm" not in tools:
    print(f"  (no nvdisasm under {site}: --fetch again)")
    return
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".ptx"):
      continue
    ptx = os.path.join(folder, name)
    cubin = ptx[:-4] + ".cubin"
    subprocess.run([tools["ptxas"], "-arch=sm_90a", "-O3", ptx, "-o", cubin],
                   check=True, capture_output=True)
    sass = subprocess.run([tools["nvdisasm"], "-c", cubin], check=True,
                          capture_output=True, text=True).stdout
    for n, counts in sass_loops(sass, top):
      mix = " ".join(f"{k}:{v}" for k, v in list(counts.items())[:14])
      print(f"  mosaic:{name[:-4]} loop of {n} instructions: {mix}")


def mosaic_warnings(folder):
  """{kernel: ptxas warnings} of the dumped Mosaic GPU logs, e.g. wgmma
  serialisation ("Potential Performance Loss: wgmma.mma_async
  instructions are serialized"), which registers and spills do not show."""
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".ptxas"):
      with open(os.path.join(folder, name)) as fh:
        lines = [ln.strip() for ln in fh if "warning" in ln.lower()
                 or "serializ" in ln.lower()]
      if lines:
        out[f"mosaic:{name[:-len('.ptxas')]}"] = sorted(set(lines))
  return out


def parse(log):
  """{kernel: (registers, stack bytes, spill stores, spill loads)}."""
  out, name = {}, None
  for line in log.splitlines():
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
      name = m.group(1)
      continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                  r"(\d+) bytes spill loads", line)
    if m and name:
      out.setdefault(name, [0, 0, 0, 0])[1:] = [int(g) for g in m.groups()]
      continue
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
      out.setdefault(name, [0, 0, 0, 0])[0] = int(m.group(1))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--fetch", metavar="DIR")
  ap.add_argument("--plugin", metavar="SITE_DIR")
  ap.add_argument("--case", default="delta")
  ap.add_argument("--config", default="{}", help="JSON config overrides")
  ap.add_argument("--b", type=int, default=None,
                  help="batch (default 16; mosaic: 1)")
  ap.add_argument("--t", type=int, default=4096)
  ap.add_argument("--h", type=int, default=128, help="mosaic head dim")
  ap.add_argument("--dtype", default="bf16", choices=("bf16", "f32"),
                  help="operand dtype (delta, gla, scalar)")
  ap.add_argument("--causal", action="store_true", help="mosaic: causal")
  ap.add_argument("--primal", action="store_true",
                  help="compile the undifferentiated call only (e.g. "
                  "the scalar case's chained forward, chained_tile)")
  ap.add_argument("--sass", type=int, default=0, metavar="N",
                  help="mosaic: the instruction mix (ptxas + nvdisasm) of "
                  "each kernel's N innermost wgmma/MUFU loops")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--timeout", type=int, default=600)
  ap.add_argument("--loads", action="store_true",
                  help="also list the loads each kernel's loops leave "
                  "synchronous (from the Triton IR dump)")
  a = ap.parse_args()
  if a.fetch:
    fetch(a.fetch)
    return
  if a.child:
    child(a.case, json.loads(a.config), a.b, a.t, a.h, a.causal, a.dtype,
          a.primal)
    return
  if not a.plugin:
    raise SystemExit("--plugin SITE_DIR (see --fetch) is required")
  env = dict(os.environ)
  env.update(
      PATH=_ptxas_dir(a.plugin) + os.pathsep + env.get("PATH", ""),
      PYTHONPATH=a.plugin, JAX_PLATFORMS="cpu",
      JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", TF_CPP_MIN_LOG_LEVEL="0",
      TF_CPP_VMODULE="subprocess_compilation=3",
      XLA_FLAGS=("--xla_gpu_ptx_compiler_extra_flags=-v "
                 "--xla_gpu_enable_libnvptxcompiler=false"))
  import tempfile  # noqa: PLC0415
  ir_dump = tempfile.mkdtemp(prefix="triton-ir-")
  if a.loads:
    env["XLA_FLAGS"] += f" --xla_dump_to={ir_dump} --xla_dump_emitter_re=.*"
  dump = tempfile.mkdtemp(prefix="mosaic-ptxas-")
  env.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=dump)
  if a.sass:
    env["MOSAIC_GPU_DUMP_PTX"] = "1"
  if a.b is None:
    a.b = 1 if a.case == "mosaic" else 16
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--case",
         a.case, "--config", a.config, "--b", str(a.b), "--t", str(a.t),
         "--h", str(a.h), "--dtype", a.dtype] + (
             ["--causal"] if a.causal else []) + (
                 ["--primal"] if a.primal else [])
  try:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       timeout=a.timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"{a.case} {a.config}: compile > {a.timeout} s (killed)")
    return
  log = r.stdout + r.stderr
  secs = re.search(r"COMPILE_SECONDS ([\d.]+)", log)
  if r.returncode or not secs:
    print(log[-3000:])
    raise SystemExit(f"compile failed (rc {r.returncode})")
  print(f"{a.case} {a.config}: compile {secs.group(1)} s (B={a.b}, "
        f"T={a.t}, {a.dtype})")
  table = parse(log)
  table.update(parse_mosaic(dump))
  for name, (regs, stack, st, ld) in sorted(table.items()):
    if name.startswith(PALLAS_PREFIXES):
      flag = "  SPILLS" if st or ld else ""
      print(f"  {name:36s} {regs:4d} regs  stack {stack:5d}  spill "
            f"st/ld {st:5d}/{ld:5d}{flag}")
  for name, lines in sorted(mosaic_warnings(dump).items()):
    for line in lines:
      print(f"  {name}: {line}")
  if a.sass:
    report_sass(dump, a.plugin, a.sass)
  if a.loads:
    report_loads(ir_dump)


if __name__ == "__main__":
  main()
