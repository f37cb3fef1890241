"""scripts/gpu/force_forms.py: the pytest plugin that runs a GPU suite with
opt-in kernel forms on."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts",
                                "gpu"))

import force_forms  # noqa: E402
from pallas_kernels.flash import mosaic_gpu, mosaic_gpu_bwd  # noqa: E402


def test_sets_flags_of_either_module(monkeypatch):
  # monkeypatch restores whatever _apply sets.
  monkeypatch.setattr(mosaic_gpu, "_P_SMEM", False)
  monkeypatch.setattr(mosaic_gpu, "_SERIAL_TURN", True)
  monkeypatch.setattr(mosaic_gpu_bwd, "_DP_INIT", mosaic_gpu_bwd._DP_INIT)  # pylint: disable=protected-access
  applied = force_forms._apply("_P_SMEM=1, _SERIAL_TURN=0")  # pylint: disable=protected-access
  assert applied == {"mosaic_gpu._P_SMEM": True,
                     "mosaic_gpu._SERIAL_TURN": False}
  assert mosaic_gpu._P_SMEM and not mosaic_gpu._SERIAL_TURN  # pylint: disable=protected-access
  assert force_forms._apply("") == {}  # pylint: disable=protected-access


def test_sets_integer_thresholds(monkeypatch):
  monkeypatch.setattr(mosaic_gpu, "WG3_MIN_LEN_MASKED",
                      mosaic_gpu.WG3_MIN_LEN_MASKED)
  applied = force_forms._apply("WG3_MIN_LEN_MASKED=8192")  # pylint: disable=protected-access
  assert applied == {"mosaic_gpu.WG3_MIN_LEN_MASKED": 8192}
  assert mosaic_gpu.WG3_MIN_LEN_MASKED == 8192
  assert mosaic_gpu.default_fwd_config(
      64, True, q_len=8192, kv_len=8192).num_compute_wgs == 3


@pytest.mark.parametrize("spec,match", [("_P_SMEMM=1", "no kernel flag"),
                                        ("_P_SMEM=true", "NAME=0|1"),
                                        ("_P_SMEM", "NAME=0|1"),
                                        ("WG3_MIN_LEN_MASKED=8k",
                                         "NAME=<int>")])
def test_rejects_typos(monkeypatch, spec, match):
  monkeypatch.setattr(mosaic_gpu, "_P_SMEM", mosaic_gpu._P_SMEM)  # pylint: disable=protected-access
  monkeypatch.setattr(mosaic_gpu, "WG3_MIN_LEN_MASKED",
                      mosaic_gpu.WG3_MIN_LEN_MASKED)
  with pytest.raises(ValueError, match=match):
    force_forms._apply(spec)  # pylint: disable=protected-access
