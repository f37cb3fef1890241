"""Prints the scheduled order of collectives, conditionals and kernels in the
compiled fwd+bwd of ring attention (2 devices, causal, T=131072 unless given)
to check that each ring transfer overlaps a kernel:

    PYTHONPATH=$PWD python3 scripts/gpu/parallel_hlo.py [T] [strategy]

A transfer is hidden when its ``collective-permute-start`` and ``-done`` have
a kernel (custom-call / conditional running kernels) scheduled between them.
"""
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import parallel

T = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
STRATEGY = sys.argv[2] if len(sys.argv) > 2 else "ring"
mesh = Mesh(np.array(jax.devices()[:2]), ("seq",),
            axis_types=(AxisType.Auto,))
x = jax.ShapeDtypeStruct((1, T, 16, 128), jnp.bfloat16,
                         sharding=NamedSharding(mesh, P(None, "seq")))
INTERESTING = re.compile(
    r"(collective-permute(-start|-done)?|all-to-all(-start|-done)?|"
    r"all-gather(-start|-done)?|reduce-scatter(-start|-done)?|"
    r"async-start|async-done|conditional|custom-call)\(")

for lb in (True, False):
  def g(q, k, v, do, lb=lb):
    f = lambda q, k, v: parallel.sequence_parallel_attention(
        q, k, v, mesh=mesh, strategy=STRATEGY, load_balance=lb,
        is_causal=True)
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(do)
  text = jax.jit(g).lower(x, x, x, x).compile().as_text()
  print(f"=== {STRATEGY} lb={lb} T={T}: scheduled ENTRY ops of interest")
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  for line in entry.splitlines():
    m = INTERESTING.search(line)
    if not m:
      continue
    name = line.strip().split(" = ")[0]
    tgt = re.search(r'custom_call_target="([^"]+)"', line)
    br = re.search(r"branch_computations=\{([^}]*)\}", line)
    extra = tgt.group(1) if tgt else (br.group(1)[:80] if br else "")
    print(f"  {m.group(1):28s} {name[:60]:60s} {extra}")
