"""scripts/gpu/pick_config.py: which tiling override a GPU call goes on
to test, from bench.linear row files with known speeds."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts",
                                "gpu"))

import pick_config  # noqa: E402


def _rows(path, cfg, speeds, fla=None):
  """One bench.linear process: its info line (with the override, if any)
  and attnjax rows at the given {T: tokens/s} (fla rows beside them)."""
  info = {"device": "test"}
  if cfg is not None:
    info["delta_config"] = json.dumps(cfg)
  lines = [{"_info": info}]
  for t, s in speeds.items():
    for mode, f in (("fwd", 10.0), ("fwd+bwd", 1.0)):
      lines.append(dict(impl="attnjax pallas", family="attnjax",
                        variant="delta", T=t, B=1, mode=mode,
                        tokens_per_s=s * f * 1e6))
      if fla:
        lines.append(dict(impl="fla chunk_delta_rule", family="fla",
                          variant="delta", T=t, B=1, mode=mode,
                          tokens_per_s=fla * f * 1e6))
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return str(path)


def test_picks_the_candidate_faster_at_every_length(tmp_path, capsys):
  base = [_rows(tmp_path / "b0.jsonl", None, {16: 100.0, 32: 90.0}, fla=500),
          _rows(tmp_path / "b1.jsonl", None, {16: 102.0, 32: 92.0})]
  cands = [
      # Faster at 32k only: not picked.
      _rows(tmp_path / "c1.jsonl", {"a": 1}, {16: 99.0, 32: 110.0}),
      # 5% faster at both.
      _rows(tmp_path / "c2.jsonl", {"b": 2}, {16: 106.05, 32: 95.55}),
      # 10% faster at both: the best.
      _rows(tmp_path / "c3.jsonl", {"c": 3}, {16: 111.1, 32: 100.1}),
      # Missing a length: not picked, however fast.
      _rows(tmp_path / "c4.jsonl", {"d": 4}, {16: 500.0}),
  ]
  assert pick_config.main(["--variant", "delta", "--baseline",
                           ",".join(base)] + cands) == 0
  out = capsys.readouterr()
  assert json.loads(out.out) == {"c": 3}
  # The baseline is the two defaults' mean (fla rows ignored).
  assert "fwd+bwd: T=16 101.00 M tok/s, T=32 91.00 M tok/s" in out.err
  assert "T=32 1.209" in out.err  # c1: 110 against (90 + 92) / 2


def test_picks_nothing_within_the_margin(tmp_path, capsys):
  base = [_rows(tmp_path / "b.jsonl", None, {16: 100.0, 32: 100.0})]
  cand = _rows(tmp_path / "c.jsonl", {"a": 1}, {16: 101.5, 32: 101.5})
  pick_config.main(["--variant", "delta", "--baseline", base[0], cand])
  assert capsys.readouterr().out == ""
  # The forward rows are their own choice.
  pick_config.main(["--variant", "delta", "--mode", "fwd", "--margin",
                    "0.01", "--baseline", base[0], cand])
  assert json.loads(capsys.readouterr().out) == {"a": 1}
