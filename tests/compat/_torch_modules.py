"""Load PyTorch's ModuleInfo table (``torch.testing._internal.common_modules``).

It ships with torch but imports ``expecttest`` (a test-only dependency of
torch) and, on import, disables mutation of ``torch.backends`` flags outside
their context managers and wraps TorchScript calls for profiling. This loader
provides a stand-in for ``expecttest`` when it is missing and undoes those
global side effects, so importing the table changes nothing for other tests.
"""

from __future__ import annotations

import sys
import types
import unittest
from typing import Any

import torch

_FLAG = "__allow_nonbracketed_mutation_flag"


def common_modules() -> Any:
    """The ``common_modules`` module, imported once without side effects on torch."""
    name = "torch.testing._internal.common_modules"
    if name in sys.modules:
        return sys.modules[name]
    try:
        import expecttest  # noqa: F401
    except ModuleNotFoundError:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stub
    flag = getattr(torch.backends, _FLAG)
    calls = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    try:
        from torch.testing._internal import common_modules as cm
    finally:
        setattr(torch.backends, _FLAG, flag)
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = calls  # type: ignore[method-assign]
    return cm
