"""normlab: normalization layers for PyTorch, exact and fast, and a lab for small batches.

The submodules are imported on first access (PEP 562), so that ``import normlab`` and the
``normlab`` commands that need no tensors (``normlab compare``) do not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import functional, nn
    from .functional._checks import NormShapeError

__version__ = "0.1.0"

__all__ = ["NormShapeError", "__version__", "functional", "nn"]

#: Exported name -> (module it lives in, attribute there or None for the module itself).
_LAZY = {
    "NormShapeError": (".functional._checks", "NormShapeError"),
    "functional": (".functional", None),
    "nn": (".nn", None),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name, __name__)
        value = module if attr is None else getattr(module, attr)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")  # any public submodule
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
