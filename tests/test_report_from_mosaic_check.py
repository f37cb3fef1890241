"""scripts/gpu/report_from_mosaic_check.py: which softmax report rows a
mosaic_check.py record replaces, with which of its numbers."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts",
                                "gpu"))

import report_from_mosaic_check as rep  # noqa: E402
from attnjax.bench import softmax  # noqa: E402


def _row(impl, mode, tflops, family="other", t=1024, kh=2):
  return dict(suite="softmax", impl=impl, family=family, b=16, t=t, n=8,
              k=kh, h=256, causal=True, dtype="bfloat16", mode=mode,
              ms=1.0, tflops=tflops, rel_err=1e-3)


def _record(label="H256 T1024 causal GQA8:2", kh=2):
  return {"section": "time", "label": label, "b": 16, "t": 1024, "n": 8,
          "kh": kh, "h": 256, "causal": True, "ours_fwd": 400.0,
          "ours_fwd_ms": 0.5, "ours_fwdbwd": 300.0, "pdkv_fwdbwd": 330.0,
          "cudnn_fwd": 380.0, "cudnn_fwdbwd": 310.0, "tokamax_fwd": 390.0,
          "tokamax_fwdbwd": 150.0}


def _rows():
  rows = []
  for mode in ("fwd", "fwd+bwd"):
    rows.append(_row("attnjax pallas_mosaic_gpu", mode, 1.0, "attnjax"))
    rows.append(_row("jax.nn cudnn", mode, 2.0))
    rows.append(_row("tokamax mosaic", mode, 3.0))
    rows.append(_row("attnjax pallas_triton", mode, 4.0, "attnjax"))
    rows.append(_row("jax.nn cudnn", mode, 5.0, t=4096))  # another point
  return rows


def _get(rows, impl, mode, t=1024):
  return next(r for r in rows
              if r["impl"] == impl and r["mode"] == mode and r["t"] == t)


def test_replaces_the_three_columns_with_the_named_variant():
  rows = _rows()
  n = rep.merge(rows, [_record(), {"section": "status"}],
                [("H256 T1024 causal GQA8:2", "pdkv")], "run.jsonl")
  assert n == 6
  ours = _get(rows, "attnjax pallas_mosaic_gpu", "fwd+bwd")
  assert ours["tflops"] == 330.0 and ours["source"] == "run.jsonl (pdkv)"
  assert "rel_err" not in ours
  fwd = _get(rows, "attnjax pallas_mosaic_gpu", "fwd")
  assert fwd["tflops"] == 400.0 and fwd["ms"] == 0.5  # the record's ms
  assert _get(rows, "jax.nn cudnn", "fwd+bwd")["tflops"] == 310.0
  assert _get(rows, "tokamax mosaic", "fwd")["tflops"] == 390.0
  # ms from the FLOP count where the record has none: 3.5 x forward.
  flops = 4.0 * 16 * 8 * 1024 * 1024 * 256 / 2 * 3.5
  assert _get(rows, "jax.nn cudnn", "fwd+bwd")["ms"] == pytest.approx(
      flops / 310.0 / 1e9)
  # Other implementations and other points are left alone.
  assert _get(rows, "attnjax pallas_triton", "fwd")["tflops"] == 4.0
  assert _get(rows, "jax.nn cudnn", "fwd", t=4096)["tflops"] == 5.0
  softmax.add_ratios(rows)
  assert ours["ratio_vs_best_other"] == pytest.approx(330.0 / 310.0)


def test_default_is_ours_and_a_missing_row_is_an_error():
  rows = _rows()
  rep.merge(rows, [_record()], [("H128", "pdq")], "r")
  assert _get(rows, "attnjax pallas_mosaic_gpu", "fwd+bwd")["tflops"] == 300.0
  with pytest.raises(SystemExit, match="no report row"):
    rep.merge(rows, [_record(kh=8)], [], "r")
