"""GLA sweep unrolling on the GPU: which (layout, unroll) match the scan.

  PYTHONPATH=$PWD python3 scripts/gpu/channel_unroll_check.py

Runs the API-level H = 128 bf16 test (GQA 8:2, T = 1000, gates + fixed
decay + initial state) with the auto layout's unroll replaced by 1, 2, 4,
and the direct kernel test at the same shapes for the separate and fused
layouts at several unrolls; prints pass / the first mismatch of each.
"""

import dataclasses
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "tests"))

import jax.numpy as jnp  # noqa: E402

import test_linear_channel as tlc  # noqa: E402
from pallas_kernels.linear_scan import channel  # noqa: E402

BF16 = jnp.bfloat16


def report(label, fn):
  try:
    fn()
    print(f"{label}: ok", flush=True)
  except Exception as e:  # noqa: BLE001
    msg = str(e).splitlines()[0][:300]
    print(f"{label}: FAIL {type(e).__name__}: {msg}", flush=True)
    if not isinstance(e, AssertionError):
      traceback.print_exc(limit=3)


def main():
  auto = channel._auto_layout
  for u in (1, 2, 4):
    def patched(cfg, programs, sms, u=u):
      return dataclasses.replace(auto(cfg, programs, sms), sweep_unroll=u)
    channel._auto_layout = patched
    report(f"api h128 bf16 auto layout, unroll {u}",
           lambda: tlc.test_gpu_channel_matches_scan_h128(BF16))
  channel._auto_layout = auto
  for sep in (True, False):
    for u in ((1, 2, 4) if sep else (2, 4)):
      cfg = channel.ChannelConfig(chunk=32, block_f=32, block_v=64,
                                  separate_output=sep,
                                  block_f_state=64 if sep else None,
                                  sweep_unroll=u)
      report(f"direct {'separate fs64' if sep else 'fused'} unroll {u}",
             lambda cfg=cfg: tlc._direct_matches_scan(
                 f"unroll-check", cfg, b=2, t=1000, n=8, kh=2, f=128,
                 vd=128, dtype=BF16, interpret=False))


if __name__ == "__main__":
  main()
