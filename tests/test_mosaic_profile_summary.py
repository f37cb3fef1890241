"""The trace summary of scripts/gpu/mosaic_profile.py (the Mosaic GPU
in-kernel profiler's output) on a synthetic trace with known answers."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts",
                                "gpu"))

import mosaic_profile  # noqa: E402


def _trace():
  """Three CTAs of two consumer warpgroups (3 traces a block, the producer
  silent) on two SMs: SM 1 runs blocks 0 and 2 (block 2 starts 4 us after
  block 0 ends), SM 2 block 1. Each consumer: a 1 us prologue, four 2 us
  steps every 3 us (the last two with a nested 0.5 us dq), a 1 us
  epilogue."""
  events = []

  def rng(tid, pid, name, b, e):
    events.append(dict(name=name, ph="B", ts=b, pid=pid, tid=tid))
    events.append(dict(name=name, ph="E", ts=e, pid=pid, tid=tid))

  for block, (pid, t0) in enumerate([(1, 0.0), (2, 0.0), (1, 20.0)]):
    for wg in range(2):
      tid = 1 + wg + 3 * block
      rng(tid, pid, "prologue", t0, t0 + 1)
      for i in range(4):
        b = t0 + 2 + 3 * i
        events.append(dict(name="step", ph="B", ts=b, pid=pid, tid=tid))
        if i >= 2:
          rng(tid, pid, "dq", b + 1, b + 1.5)
        events.append(dict(name="step", ph="E", ts=b + 2, pid=pid, tid=tid))
      rng(tid, pid, "epilogue", t0 + 15, t0 + 16)
  return events


def test_summary_of_a_known_trace():
  s = mosaic_profile.summarize(_trace(), traces_per_block=3)
  assert s["kernel_us"] == 36.0 and s["ctas"] == 3 and s["sms"] == 2
  assert s["regions"]["step"] == dict(n=24, mean=2.0, p50=2.0, p90=2.0)
  assert s["regions"]["dq"]["n"] == 12 and s["regions"]["dq"]["mean"] == 0.5
  assert s["step_interval"]["mean"] == 3.0 and s["step_interval"]["n"] == 18
  assert s["cta_span"]["mean"] == 16.0
  # Before the first step (2 us) and after the last (16 - 13 = 3 us).
  assert s["cta_outside_steps"]["mean"] == 5.0
  assert s["sm_gap"] == dict(n=1, mean=4.0, p50=4.0, p90=4.0)
  assert s["first_wave_span"]["n"] == 2 and s["later_span"]["n"] == 1


def test_summary_without_events():
  assert mosaic_profile.summarize([], 3) == dict(error="no events")


def test_steps_by_place_in_the_walk():
  """One warpgroup of ten steps: the first four take 5 us, the middle two
  1 us, the last four 2 us."""
  events = []
  t = 0.0
  for i, d in enumerate([5.0] * 4 + [1.0] * 2 + [2.0] * 4):
    events.append(dict(name="step", ph="B", ts=t, pid=1, tid=1))
    events.append(dict(name="step", ph="E", ts=t + d, pid=1, tid=1))
    t += d + 1
  s = mosaic_profile.summarize(events, traces_per_block=3)
  assert mosaic_profile.EDGE_STEPS == 4
  by = s["step_by_place"]
  assert by["first"] == dict(n=4, mean=5.0, p50=5.0, p90=5.0)
  assert by["middle"] == dict(n=2, mean=1.0, p50=1.0, p90=1.0)
  assert by["last"] == dict(n=4, mean=2.0, p50=2.0, p90=2.0)
