"""Model surgery: swap BatchNorm for another norm, freeze / unfreeze it, fold it into convs.

Every function here walks a model and returns it: modules are *replaced* in their
parent, never patched, and a module registered twice stays one module
(:mod:`normlab.convert.surgery`). ``norms`` holds :func:`convert_norms`, ``freeze``
:func:`freeze_bn` / :func:`unfreeze_bn`, ``architecture`` what a conversion changes
beyond the normalization; :func:`fuse_conv_bn` lives in :mod:`normlab.fuse`. The names
are imported from their modules on first access (``normlab._lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes, names_from

if TYPE_CHECKING:
    from ..fuse import fuse_conv_bn
    from ..kinds import is_batch_norm, is_frozen_batch_norm
    from .freeze import freeze_bn, unfreeze_bn
    from .norms import convert_norms
    from .surgery import (
        ConversionReport,
        Replacement,
        Skipped,
    )

#: Each module and the public names that live there.
_MODULES = {
    ".surgery": ("ConversionReport", "Replacement", "Skipped"),
    ".norms": ("convert_norms",),
    ".freeze": ("freeze_bn", "unfreeze_bn"),
    "..fuse": ("fuse_conv_bn",),
    "..kinds": ("is_batch_norm", "is_frozen_batch_norm"),
}
__all__ = [
    "ConversionReport",
    "Replacement",
    "Skipped",
    "convert_norms",
    "freeze_bn",
    "fuse_conv_bn",
    "is_batch_norm",
    "is_frozen_batch_norm",
    "unfreeze_bn",
]
_LAZY = names_from(_MODULES)

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, __all__)
