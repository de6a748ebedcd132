"""Model surgery: swap BatchNorm for another norm, freeze / unfreeze it, fold it into convs.

Every function here walks a model and returns it: modules are *replaced* in their
parent, never patched, and a module registered twice stays one module
(:mod:`normlab.convert.surgery`); the one exception, the stats-only freeze, keeps
each layer the same module and swaps its class (``frozen_stats``). ``norms`` holds
:func:`convert_norms`, ``freeze`` :func:`freeze_bn` / :func:`unfreeze_bn`, ``select``
the ``include=`` / ``exclude=`` filters every whole-model tool shares,
``architecture`` what a conversion changes beyond the normalization;
:func:`fuse_conv_bn` lives in :mod:`normlab.fuse`. The names are imported from their
modules on first access (``normlab._lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_package

if TYPE_CHECKING:
    from ..fuse import fuse_conv_bn as fuse_conv_bn
    from ..kinds import is_batch_norm as is_batch_norm
    from ..kinds import is_frozen_batch_norm as is_frozen_batch_norm
    from .freeze import freeze_bn as freeze_bn
    from .freeze import unfreeze_bn as unfreeze_bn
    from .frozen_stats import is_stats_frozen as is_stats_frozen
    from .norms import convert_norms as convert_norms
    from .select import Selection as Selection
    from .select import select_modules as select_modules
    from .surgery import (
        ConversionReport as ConversionReport,
    )
    from .surgery import (
        Replacement as Replacement,
    )
    from .surgery import (
        Skipped as Skipped,
    )

#: Each module and the public names that live there.
_MODULES = {
    ".surgery": ("ConversionReport", "Replacement", "Skipped"),
    ".norms": ("convert_norms",),
    ".freeze": ("freeze_bn", "unfreeze_bn"),
    ".frozen_stats": ("is_stats_frozen",),
    ".select": ("Selection", "select_modules"),
    "..fuse": ("fuse_conv_bn",),
    "..kinds": ("is_batch_norm", "is_frozen_batch_norm"),
}

__all__, __getattr__, __dir__ = lazy_package(__name__, globals(), _MODULES)
