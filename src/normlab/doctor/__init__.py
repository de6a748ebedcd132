"""The BN doctor: what is wrong with a model's norm layers, where, why, and the fix.

``diagnosis`` holds :func:`diagnose`, ``checks`` the checks it runs, ``codes`` what each
finding code means and its fix (overview: ``docs/doctor.md``), ``report`` the
:class:`Report` it returns, ``staleness`` the statistics measured on the example forward,
``target`` :func:`load_target` (a ``file.py:factory`` for ``normlab doctor``). The names
are imported from their modules on first access (``normlab._lazy``), so that the command
line parses its arguments without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .codes import CODES, Finding
    from .diagnosis import DoctorForwardError, diagnose
    from .report import FindingGroup, LayerInfo, Report
    from .target import DoctorTargetError, load_target

__all__ = [
    "CODES",
    "DoctorForwardError",
    "DoctorTargetError",
    "Finding",
    "FindingGroup",
    "LayerInfo",
    "Report",
    "diagnose",
    "load_target",
]

#: Exported name -> (module it lives in, attribute there).
_LAZY = {
    "CODES": (".codes", "CODES"),
    "Finding": (".codes", "Finding"),
    "DoctorForwardError": (".diagnosis", "DoctorForwardError"),
    "diagnose": (".diagnosis", "diagnose"),
    "FindingGroup": (".report", "FindingGroup"),
    "LayerInfo": (".report", "LayerInfo"),
    "Report": (".report", "Report"),
    "DoctorTargetError": (".target", "DoctorTargetError"),
    "load_target": (".target", "load_target"),
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, __all__)
