"""docs/design.md states facts about the code: its dispatch table is the code's table."""

from __future__ import annotations

import pathlib
import re

from normlab._core.dispatch import OP_PATHS

DESIGN = pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _doc_table() -> dict[str, tuple[str, str, str]]:
    text = DESIGN.read_text()
    block = text.split("<!-- dispatch-table", 1)[1].split("<!-- /dispatch-table -->", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\S+) \| (\S+) \| (\S+) \|$", block, re.M)
    return {op: (t, f, a) for op, t, f, a in rows}


def test_the_dispatch_table_in_design_md_is_the_codes():
    def has(reason: str | None) -> str:
        return "yes" if reason is None else "—"

    code = {op.value: (has(p.triton), has(p.fused), has(p.autograd)) for op, p in OP_PATHS.items()}
    assert _doc_table() == code


RECALIBRATE = DESIGN.parent / "recalibrate.md"


def _sections(text: str) -> dict[str, str]:
    return {s.split("\n", 1)[0].strip(): s for s in text.split("\n## ")[1:]}


def test_recalibrate_md_names_the_codes_methods_variances_and_kinds():
    from normlab.recalibrate import KINDS, recalibrate
    from normlab.recalibrate.population import VARIANCES
    from normlab.recalibrate.recalibration import METHODS

    sections = _sections(RECALIBRATE.read_text())
    bullet = re.compile(r'^- \*\*`(?:method=)?"(\w+)"`\*\*', re.M)
    assert tuple(bullet.findall(sections["Methods"])) == METHODS
    variances = next(s for title, s in sections.items() if title.startswith("Which variance"))
    assert tuple(bullet.findall(variances)) == VARIANCES
    kinds = sections["The protocol: which layers are recalibrated"]
    assert tuple(bullet.findall(kinds)) == tuple(KINDS)
    assert "docs/recalibrate.md" in (recalibrate.__doc__ or "")


def test_doctor_md_lists_every_finding_code():
    from normlab.doctor import CODES

    text = (DESIGN.parent / "doctor.md").read_text()
    block = text.split("<!-- doctor-codes", 1)[1].split("<!-- /doctor-codes -->", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", block, re.M) == list(CODES)
