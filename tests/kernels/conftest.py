"""Kernel tests: Triton's interpreter on CPU, at tiny shapes.

``TRITON_INTERPRET=1`` is set here, before anything imports triton, unless the
environment already sets it: ``TRITON_INTERPRET=0 pytest tests/kernels`` on a
machine with a GPU runs the same tables natively on CUDA. Without triton every
test module here skips itself (``pytest.importorskip``) with the reason.

Every test runs with the kernels' allocations poisoned (NaN-filled), so a value
a kernel forgot to write cannot pass for a right one.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def _have_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def pytest_report_header(config):
    if not _have_triton():
        return "kernels: triton is not installed, tests/kernels are skipped"
    return f"kernels: TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"


@pytest.fixture(autouse=True)
def _poisoned_allocations():
    if not _have_triton():
        yield
        return
    from normlab.kernels._common import poisoned

    with poisoned():
        yield
