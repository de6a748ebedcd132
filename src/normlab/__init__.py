"""normlab: normalization layers for PyTorch, exact and fast, and a lab for small batches.

The submodules are imported on first access (PEP 562), so that ``import normlab`` and the
``normlab`` commands that need no tensors (``normlab compare``) do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

if TYPE_CHECKING:
    from . import functional, nn
    from ._core.checks import NormShapeError
    from ._core.running import NonFiniteStatisticsWarning

__version__ = "0.1.0"

__all__ = ["NonFiniteStatisticsWarning", "NormShapeError", "__version__", "functional", "nn"]

#: Exported name -> (module it lives in, attribute there or None for the module itself).
_LAZY = {
    "NonFiniteStatisticsWarning": ("._core.running", "NonFiniteStatisticsWarning"),
    "NormShapeError": ("._core.checks", "NormShapeError"),
    "functional": (".functional", None),
    "nn": (".nn", None),
}


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, __all__)
