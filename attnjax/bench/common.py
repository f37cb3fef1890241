"""Timing, FLOP counting and report writing shared by the benchmark suites."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax

__all__ = ["append_row", "attention_flops", "device_info", "read_rows",
           "time_fn", "write_report"]

# Rows are appended here (one JSON line each) as they are measured, so that
# a run cut short by a time limit keeps them; ``read_rows`` reads them back.
ROWS_ENV = "ATTNJAX_BENCH_ROWS"


def attention_flops(b, n, t, s, h, hv=None, *, causal=False, mode="fwd"):
  """FlashAttention's convention: forward 2*B*N*T*S*(H + Hv) (= 4*B*N*T*S*H),
  halved when causal; forward+backward is 3.5x the forward."""
  hv = h if hv is None else hv
  f = 2.0 * b * n * t * s * (h + hv)
  if causal:
    f /= 2
  return f * (3.5 if mode == "fwd+bwd" else 1.0)


def time_fn(fn: Callable, *args, min_seconds: float = 0.25,
            repeats: int = 5) -> float:
  """Median seconds per call of a jitted fn (async dispatch pipelined).

  Calls are issued back to back and synchronised once per repeat, so host
  dispatch overlaps device work, as in the anchors' measurement script.
  """
  jax.block_until_ready(fn(*args))  # compile + warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = max(time.perf_counter() - t0, 1e-6)
  n = max(1, min(200, int(min_seconds / once)))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / n)
  return statistics.median(samples)


def _version(pkg):
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return None


def device_info() -> dict:
  dev = jax.devices()[0]
  info = {
      "device": dev.device_kind,
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(),
      "python": platform.python_version(),
  }
  for pkg in ("jax", "jaxlib", "attnjax", "tokamax", "torch", "triton",
              "flash-linear-attention", "fla-core", "ringattention"):
    v = _version(pkg)
    if v:
      info[pkg] = v
  return info


def _slug(s: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()


def write_report(out_dir: str, suite: str, info: dict, rows: list[dict],
                 markdown: str, plot: Callable | None = None) -> list[str]:
  """Writes <suite>-<device>.json/.md (and .png) into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{suite}-{_slug(info['device'])}")
  paths = [stem + ".json", stem + ".md"]
  with open(paths[0], "w") as f:
    json.dump({"info": info, "rows": rows}, f, indent=1, default=str)
  header = "\n".join(f"- {k}: {v}" for k, v in info.items())
  with open(paths[1], "w") as f:
    f.write(f"# {suite} benchmark on {info['device']}\n\n{header}\n\n"
            f"{markdown}\n")
  if plot is not None:
    try:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
      fig = plot(plt)
      fig.savefig(stem + ".png", dpi=110, bbox_inches="tight")
      plt.close(fig)
      paths.append(stem + ".png")
    except ImportError:
      pass
  return paths


def markdown_table(header: list[str], rows: list[list]) -> str:
  def fmt(x):
    if isinstance(x, float):
      return f"{x:.3g}" if abs(x) < 10 else f"{x:.0f}"
    return "—" if x is None else str(x)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
  return "\n".join(lines)


def append_row(row: dict) -> None:
  """Appends ``row`` as a JSON line to ``$ATTNJAX_BENCH_ROWS``, when set."""
  path = os.environ.get(ROWS_ENV)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")


def read_rows(paths) -> tuple[list[dict], dict | None]:
  """(rows, device info) from ``append_row`` files: lines ``{"_info": ...}``
  give the info (the last one wins), other lines without ``impl`` (markers)
  and blank lines are skipped."""
  rows, info = [], None
  for path in paths:
    with open(path) as f:
      for line in f:
        if not line.strip():
          continue
        r = json.loads(line)
        if "_info" in r:
          info = r["_info"]
        elif "impl" in r:
          rows.append(r)
  return rows, info

