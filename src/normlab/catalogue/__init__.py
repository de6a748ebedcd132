"""The layer catalogue: every layer in each mode, its float64 reference, and the self-check.

``cases`` holds :data:`CATALOGUE`, the table of :class:`LayerCase` (how to build each
layer and what input it takes), ``refs`` the adapters that run the NumPy reference
(:mod:`normlab.reference`) on a built layer, and ``selfcheck`` :func:`run_checks`, what
``normlab check`` runs; the test suite drives its reference and gradcheck tests from the
same table. The names are imported from their modules on first access
(``normlab._lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_package

if TYPE_CHECKING:
    from .cases import CATALOGUE as CATALOGUE
    from .cases import LayerCase as LayerCase
    from .selfcheck import (
        CheckResult as CheckResult,
    )
    from .selfcheck import (
        check_case as check_case,
    )
    from .selfcheck import (
        prepare as prepare,
    )
    from .selfcheck import (
        randomize as randomize,
    )
    from .selfcheck import (
        run_checks as run_checks,
    )

#: Each module and the public names that live there.
_MODULES = {
    ".cases": ("CATALOGUE", "LayerCase"),
    ".selfcheck": ("CheckResult", "check_case", "prepare", "randomize", "run_checks"),
}

__all__, __getattr__, __dir__ = lazy_package(__name__, globals(), _MODULES)
