"""The SASS loop summary of scripts/aot/ptxas_report.py (``--sass``) on a
synthetic nvdisasm listing with known answers."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts",
                                "aot"))

import ptxas_report  # noqa: E402


def _line(addr, text):
  return f"        /*{addr:04x}*/                   {text} ;"


def _listing():
  """An outer loop (.L_x_1 .. its branch) around an inner one (.L_x_2),
  a forward branch that closes nothing, and a loop without wgmma or MUFU."""
  lines, addr = [], 0

  def ins(text):
    nonlocal addr
    lines.append(_line(addr, text))
    addr += 16

  ins("MOV R1, c[0x0][0x28]")
  lines.append(".L_x_1:")
  ins("UIADD3 UR4, UR4, 0x1, URZ")
  lines.append(".L_x_2:")
  ins("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT")
  ins("MUFU.EX2 R3, R2")
  ins("@P0 MUFU.EX2 R5, R4")
  ins("FADD R6, R3, R5")
  ins("@!P1 BRA `(.L_x_2)")
  ins("BRA `(.L_x_3)")
  lines.append(".L_x_3:")
  ins("ISETP.NE.AND P2, PT, R0, RZ, PT")
  ins("@P2 BRA `(.L_x_1)")
  lines.append(".L_x_4:")
  ins("IADD3 R7, R7, 0x1, RZ")
  ins("BRA `(.L_x_4)")
  ins("EXIT")
  return "\n".join(lines)


def test_innermost_loops_first_with_opcode_counts():
  loops = ptxas_report.sass_loops(_listing(), top=5)
  # The IADD3-only loop holds neither wgmma nor MUFU: left out.
  assert [n for n, _ in loops] == [5, 9]
  n, inner = loops[0]
  # Predicates are stripped and modifiers dropped (MUFU.EX2 -> MUFU).
  assert inner == {"MUFU": 2, "HGMMA": 1, "FADD": 1, "BRA": 1}
  _, outer = loops[1]
  assert outer["MUFU"] == 2 and outer["UIADD3"] == 1
  assert outer["BRA"] == 3 and outer["ISETP"] == 1


def test_top_limits_the_count():
  assert len(ptxas_report.sass_loops(_listing(), top=1)) == 1
