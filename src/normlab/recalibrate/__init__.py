"""Precise running statistics: :func:`recalibrate` and the protocol a layer follows.

``recalibration`` holds :func:`recalibrate` and its report, ``passes`` the passes over
the batches and the all-or-nothing write, ``levels`` the dependency levels of the
exact method, ``population`` which statistic a layer keeps (:func:`recalibration_kind`)
and its exact float64 moments, ``exact`` the exact method's passes, ``ranks`` the
merge of every rank's moments (``process_group=``). The methods, the variance choice
and the protocol are explained in ``docs/recalibrate.md``. The names are imported from
their modules on first access (``normlab._lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_package

if TYPE_CHECKING:
    from .population import KINDS as KINDS
    from .population import recalibration_kind as recalibration_kind
    from .recalibration import (
        RecalibrationReport as RecalibrationReport,
    )
    from .recalibration import (
        recalibrate as recalibrate,
    )

#: Each module and the public names that live there (``_Population``, the accumulator,
#: resolves too, for tests).
_MODULES = {
    ".population": ("KINDS", "recalibration_kind"),
    ".recalibration": ("RecalibrationReport", "recalibrate"),
}

__all__, __getattr__, __dir__ = lazy_package(
    __name__, globals(), _MODULES, private={"_Population": (".population", "Population")}
)
