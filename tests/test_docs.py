"""The documentation's examples run, and the mask drawings match the code."""

import doctest
import importlib
import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Pages whose ```python blocks are executed (each page's blocks in order, in
# one namespace). A block whose first line is "# not run" is skipped (e.g.
# GPU-only snippets).
DOC_PAGES = ["README.md", "docs/api.md", "docs/masks.md"]
DOC_PAGES += sorted(str(p.relative_to(ROOT)) for p in
                    (ROOT / "docs").glob("**/*.md")
                    if p.read_text().startswith("<!-- tested -->"))
DOCTEST_MODULES = ["attnjax.masks", "attnjax.softmax.api", "attnjax.testing",
                   "attnjax.decode"]


def python_blocks(text):
  return [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
          if not b.startswith("# not run")]


@pytest.mark.parametrize("page", sorted(set(DOC_PAGES)))
def test_page_examples_run(page):
  blocks = python_blocks((ROOT / page).read_text())
  assert blocks, f"{page} has no python examples"
  namespace = {}
  for block in blocks:
    exec(compile(block, page, "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
  mod = importlib.import_module(module)
  result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result


def test_masks_page_is_current():
  page = runpy.run_path(str(ROOT / "scripts" / "draw_masks.py"))["page"]()
  assert (ROOT / "docs" / "masks.md").read_text() == page, (
      "docs/masks.md is stale: run python scripts/draw_masks.py > "
      "docs/masks.md")
