"""A pytest plugin that runs a test suite with the Mosaic GPU kernels'
opt-in step forms switched on (GPU; before such a form becomes a default).

  ATTNJAX_KERNEL_FORMS=_P_SMEM=1 PYTHONPATH=$PWD:scripts/gpu \\
      python3 -m pytest -p force_forms -m gpu tests/test_pallas_mosaic_gpu.py

``ATTNJAX_KERNEL_FORMS`` holds comma-separated ``NAME=0|1`` pairs, each a
module-level flag of ``pallas_kernels.flash.mosaic_gpu`` or
``mosaic_gpu_bwd`` (read when a kernel is traced), or ``NAME=<int>`` for a
module-level integer (a dispatch threshold such as
``WG3_MIN_LEN_MASKED=8192``); a name neither module has is an error, so a
typo cannot pass the suite with the defaults.
"""

from __future__ import annotations

import os


def _apply(spec):
  from pallas_kernels.flash import mosaic_gpu, mosaic_gpu_bwd  # noqa: PLC0415
  applied = {}
  for item in filter(None, (x.strip() for x in spec.split(","))):
    name, _, value = item.partition("=")
    mod = next((m for m in (mosaic_gpu, mosaic_gpu_bwd)
                if hasattr(m, name)), None)
    if mod is None:
      raise ValueError(f"ATTNJAX_KERNEL_FORMS: no kernel flag {name!r}")
    current = getattr(mod, name)
    if isinstance(current, bool) or not isinstance(current, int):
      if value not in ("0", "1"):
        raise ValueError(f"ATTNJAX_KERNEL_FORMS: {item!r} is not NAME=0|1")
      new = value == "1"
    else:
      if not value.isdigit():
        raise ValueError(f"ATTNJAX_KERNEL_FORMS: {item!r} is not NAME=<int>")
      new = int(value)
    setattr(mod, name, new)
    applied[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = new
  return applied


def pytest_configure(config):
  applied = _apply(os.environ.get("ATTNJAX_KERNEL_FORMS", ""))
  config._kernel_forms = applied  # pylint: disable=protected-access


def pytest_report_header(config):
  forms = getattr(config, "_kernel_forms", {})
  return "kernel forms: " + (", ".join(f"{k}={v}" for k, v in forms.items())
                             or "the defaults")
