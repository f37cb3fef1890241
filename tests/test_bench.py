"""The benchmark's bookkeeping: merging re-measured rows into an earlier
report (with its provenance), and the JSON-lines row files of long runs."""

import json

from attnjax.bench import __main__ as bench_main
from attnjax.bench import common

KEYS = ("impl", "t", "mode")


def _row(impl, t, mode, tflops):
  return {"impl": impl, "t": t, "mode": mode, "tflops": tflops}


def test_merge_replaces_remeasured_rows_and_says_so(tmp_path):
  path = tmp_path / "softmax-dev.json"
  old_rows = [_row("a", 1024, "fwd", 1.0), _row("b", 1024, "fwd", 2.0),
              _row("b", 4096, "fwd", 3.0)]
  path.write_text(json.dumps({"info": {"date": "OLD", "rows_updated": "X"},
                              "rows": old_rows}))
  new_rows = [_row("b", 1024, "fwd", 5.0)]
  rows, info = bench_main._merge(str(path), new_rows, KEYS,
                                 {"date": "NEW"}, "impls b")
  got = {(r["impl"], r["t"]): r["tflops"] for r in rows}
  assert got == {("a", 1024): 1.0, ("b", 1024): 5.0, ("b", 4096): 3.0}
  assert info["date"] == "NEW"
  note = info["rows_updated"]
  assert note.startswith("NEW: 1 rows re-measured (impls b); 2 rows kept")
  assert note.endswith("kept from the report of OLD. Earlier: X")
  # Merged again: one flat line, newest first.
  path.write_text(json.dumps({"info": info, "rows": rows}))
  _, info2 = bench_main._merge(str(path), [_row("a", 1024, "fwd", 7.0)],
                               KEYS, {"date": "NEWER"}, "impls a")
  assert info2["rows_updated"] == (
      "NEWER: 1 rows re-measured (impls a); 2 rows kept from the report "
      "of NEW. Earlier: " + note)


def test_merge_without_kept_rows_adds_no_note(tmp_path):
  path = tmp_path / "r.json"
  path.write_text(json.dumps({"info": {"date": "OLD"},
                              "rows": [_row("a", 1, "fwd", 1.0)]}))
  rows, info = bench_main._merge(str(path), [_row("a", 1, "fwd", 2.0)],
                                 KEYS, {"date": "NEW"}, "all")
  assert rows == [_row("a", 1, "fwd", 2.0)]
  assert "rows_updated" not in info
  rows, info = bench_main._merge(str(tmp_path / "absent.json"), rows, KEYS,
                                 {"date": "NEW"}, "all")
  assert rows == [_row("a", 1, "fwd", 2.0)] and info == {"date": "NEW"}


def test_row_files_round_trip(tmp_path, monkeypatch):
  a, b = tmp_path / "sub" / "a.jsonl", tmp_path / "b.jsonl"
  monkeypatch.setenv(common.ROWS_ENV, str(a))
  common.append_row({"_info": {"device": "first"}})
  common.append_row(_row("x", 1, "fwd", 1.0))
  common.append_row({"marker": "no impl: skipped"})
  monkeypatch.setenv(common.ROWS_ENV, str(b))
  common.append_row({"_info": {"device": "second"}})
  common.append_row(_row("y", 2, "fwd", 2.0))
  with open(b, "a") as f:
    f.write("\n")
  rows, info = common.read_rows([str(a), str(b)])
  assert [r["impl"] for r in rows] == ["x", "y"]
  assert info == {"device": "second"}
  monkeypatch.delenv(common.ROWS_ENV)
  common.append_row(_row("z", 3, "fwd", 3.0))  # no file named: a no-op
  assert common.read_rows([str(a), str(b)])[0] == rows
