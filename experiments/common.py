"""Shared plumbing for the experiments: output folders, JSON, tables, plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax

ROOT = pathlib.Path(__file__).resolve().parent


def out_dir(name: str, override: str | None = None) -> pathlib.Path:
  """experiments/results/<name>/ (or ``override``), created."""
  path = (pathlib.Path(override) if override
          else ROOT / "results" / name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def environment() -> dict[str, Any]:
  """What ran this: versions, platform and devices."""
  dev = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "platform": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.UTC).isoformat(
          timespec="seconds"),
  }


def _jsonable(x):
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def write_json(path: pathlib.Path, payload: dict) -> pathlib.Path:
  path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
  return path


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]
                 ) -> str:
  """A plain-text table (markdown pipe syntax, so docs can paste it)."""
  rows = [[_cell(c) for c in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]
  line = lambda cells: "| " + " | ".join(
      c.ljust(w) for c, w in zip(cells, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _cell(c) -> str:
  if isinstance(c, float):
    return f"{c:.3g}" if abs(c) < 1e4 else f"{c:.3e}"
  return str(c)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def progress(iterable=None, **kw):
  """A tqdm progress bar (to stderr)."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  kw.setdefault("dynamic_ncols", True)
  kw.setdefault("mininterval", 0.5)
  return tqdm(iterable, **kw)


class Timer:
  """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

  def __enter__(self):
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._t0
