"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it.

``folding`` holds :func:`fuse_conv_bn`; which BN is fed by which conv is read off the
model's data flow (``graph``), not its module order; the folded weights and the checks
that guard them are in ``check``, the report in ``report``. The names are imported
from their modules on first access (``normlab._lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_package

if TYPE_CHECKING:
    from .check import compare_outputs as compare_outputs
    from .folding import fuse_conv_bn as fuse_conv_bn
    from .report import REASONS as REASONS
    from .report import FuseReport as FuseReport

#: Each module and the public names that live there.
_MODULES = {
    ".report": ("REASONS", "FuseReport"),
    ".check": ("compare_outputs",),
    ".folding": ("fuse_conv_bn",),
}

__all__, __getattr__, __dir__ = lazy_package(__name__, globals(), _MODULES)
