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

from .._lazy import lazy_package

if TYPE_CHECKING:
    from .codes import CODES as CODES
    from .codes import Finding as Finding
    from .diagnosis import DoctorForwardError as DoctorForwardError
    from .diagnosis import diagnose as diagnose
    from .report import FindingGroup as FindingGroup
    from .report import LayerInfo as LayerInfo
    from .report import Report as Report
    from .target import DoctorTargetError as DoctorTargetError
    from .target import load_target as load_target

#: Each module and the public names that live there.
_MODULES = {
    ".codes": ("CODES", "Finding"),
    ".diagnosis": ("DoctorForwardError", "diagnose"),
    ".report": ("FindingGroup", "LayerInfo", "Report"),
    ".target": ("DoctorTargetError", "load_target"),
}

__all__, __getattr__, __dir__ = lazy_package(__name__, globals(), _MODULES)
