"""The ecosystem case table covers every module of ``normlab.nn``."""

from __future__ import annotations

from _eco_cases import CASES, module_classes


def test_table_covers_every_module():
    covered = {case.cls for case in CASES}
    missing = sorted(cls.__name__ for cls in module_classes() - covered)
    assert not missing, f"add these normlab.nn modules to tests/ecosystem/_eco_cases.py: {missing}"


def test_cases_build_and_run():
    from _eco_cases import make_input

    for case in CASES:
        m = case.build()
        assert isinstance(m, case.cls), case.name
        y = m(make_input(case))
        assert y.dtype == make_input(case).dtype, case.name
