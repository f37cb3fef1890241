"""The runnable examples of docs/linear/*.md run and their asserts hold."""

from __future__ import annotations

import pathlib
import re

import pytest

_DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "linear"
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples():
  for page in sorted(_DOCS.glob("*.md")):
    for i, code in enumerate(_BLOCK.findall(page.read_text())):
      yield pytest.param(code, id=f"{page.stem}-{i}")


@pytest.mark.parametrize("code", list(_examples()))
def test_doc_example_runs(code):
  exec(compile(code, "<docs example>", "exec"), {})  # noqa: S102
