"""normlab: normalization layers for PyTorch, exact and fast, and a lab for small batches."""

from . import functional, nn
from .functional._checks import NormShapeError

__version__ = "0.1.0"

__all__ = ["NormShapeError", "__version__", "functional", "nn"]
