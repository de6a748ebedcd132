"""docs/design.md states facts about the code: its dispatch table is the code's table."""

from __future__ import annotations

import pathlib
import re

from normlab._core.dispatch import TABLE

DESIGN = pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _doc_table() -> dict[str, tuple[str, str, str]]:
    text = DESIGN.read_text()
    block = text.split("<!-- dispatch-table", 1)[1].split("<!-- /dispatch-table -->", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\S+) \| (\S+) \| (\S+) \|$", block, re.M)
    return {op: (t, f, a) for op, t, f, a in rows}


def test_the_dispatch_table_in_design_md_is_the_codes():
    def has(reason: str | None) -> str:
        return "yes" if reason is None else "—"

    code = {op.value: (has(p.triton), has(p.fused), has(p.autograd)) for op, p in TABLE.items()}
    assert _doc_table() == code
