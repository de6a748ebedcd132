"""Precise running statistics: :func:`recalibrate` and the protocol a layer follows.

``recalibration`` holds :func:`recalibrate` and its report, ``passes`` the passes over
the batches and the all-or-nothing write, ``levels`` the dependency levels of the
exact method, ``population`` which statistic a layer keeps (:func:`recalibration_kind`)
and its exact float64 moments. The methods, the variance choice and the protocol are
explained in ``docs/recalibrate.md``. The names are imported from their modules on
first access (``normlab._lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .population import KINDS, recalibration_kind
    from .recalibration import RecalibrationReport, recalibrate

__all__ = ["KINDS", "RecalibrationReport", "recalibrate", "recalibration_kind"]

#: Exported name -> (module it lives in, attribute there). ``_Population`` is the
#: exact-moments accumulator, for tests that compare against it.
_LAZY = {
    "KINDS": (".population", "KINDS"),
    "RecalibrationReport": (".recalibration", "RecalibrationReport"),
    "recalibrate": (".recalibration", "recalibrate"),
    "recalibration_kind": (".population", "recalibration_kind"),
    "_Population": (".population", "Population"),
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, __all__)
