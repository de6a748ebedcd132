"""The doctor's report: findings grouped by code, the layer table, text and JSON.

:func:`normlab.doctor.diagnose` returns a :class:`Report`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .codes import CODES, SEVERITY_ORDER, Finding, Severity

__all__ = ["FindingGroup", "LayerInfo", "Report"]

#: module names shown per code before "and N more" (all of them with verbose)
SHOWN_MODULES = 3


@dataclass(frozen=True)
class LayerInfo:
    """What the doctor saw of one norm layer during the example forward.

    ``values_per_statistic`` is the number of values behind each statistic the
    layer computes from its input: N × spatial for batch statistics (N =
    ``train_batch_size`` when given), (C/G) × spatial for GroupNorm and
    EvoNorm-S0, spatial for InstanceNorm and FRN; None if the layer did not run.
    """

    module: str
    type: str
    training: bool
    batch_statistics: bool
    input_shape: tuple[int, ...] | None
    values_per_statistic: int | None


@dataclass(frozen=True)
class FindingGroup:
    """Every finding of one code: the worst severity, the modules, the shared why and fix."""

    code: str
    severity: Severity
    modules: list[str]
    message: str
    fix: str
    findings: list[Finding]

    def module_list(self, limit: int | None = SHOWN_MODULES) -> str:
        """``"a, b, c and 6 more"`` (all names when ``limit`` is None)."""
        names = [m or "<model>" for m in self.modules]
        if limit is None or len(names) <= limit:
            return ", ".join(names)
        return f"{', '.join(names[:limit])} and {len(names) - limit} more"


@dataclass
class Report:
    """Findings (most severe first, then by code, then in model order) and the layer table.

    ``evaluating`` and ``train_batch_size`` record the mode that was judged.
    """

    findings: list[Finding] = field(default_factory=list)
    layers: list[LayerInfo] = field(default_factory=list)
    evaluating: bool = True
    train_batch_size: int | None = None

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def ok(self) -> bool:
        """No error and no warning."""
        return all(f.severity == "info" for f in self.findings)

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def counts(self) -> dict[str, int]:
        """Findings per severity (``error``, ``warning``, ``info``)."""
        c = Counter(f.severity for f in self.findings)
        return {s: c.get(s, 0) for s in SEVERITY_ORDER}

    @property
    def groups(self) -> list[FindingGroup]:
        """One :class:`FindingGroup` per code, most severe first."""
        by_code: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_code.setdefault(f.code, []).append(f)
        groups = []
        for code, found in by_code.items():
            why, fix = CODES.get(code, (found[0].message, found[0].fix))
            worst = min((f.severity for f in found), key=SEVERITY_ORDER.__getitem__)
            modules = list(dict.fromkeys(f.module for f in found))  # in order, once each
            groups.append(FindingGroup(code, worst, modules, why, fix, found))
        groups.sort(key=lambda g: SEVERITY_ORDER[g.severity])
        return groups

    def to_dict(self) -> dict[str, Any]:
        """Plain data: counts, the groups, every finding (with its detail) and the layers."""
        return {
            "ok": self.ok,
            "counts": self.counts(),
            "mode": "eval" if self.evaluating else "train",
            "train_batch_size": self.train_batch_size,
            "groups": [
                {
                    "code": g.code,
                    "severity": g.severity,
                    "count": len(g.modules),
                    "modules": g.modules,
                    "message": g.message,
                    "fix": g.fix,
                }
                for g in self.groups
            ],
            "findings": [asdict(f) for f in self.findings],
            "layers": [
                {**asdict(info), "input_shape": list(info.input_shape or []) or None}
                for info in self.layers
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line: how many layers, the mode judged, findings per severity."""
        c = self.counts()
        mode = "eval mode" if self.evaluating else "training mode"
        if self.train_batch_size is not None:
            mode += f", training judged at batch size {self.train_batch_size}"
        elif self.evaluating:
            mode += " (training-time batch statistics not judged: give a train batch size)"
        batch = [i for i in self.layers if i.batch_statistics and i.values_per_statistic]
        fewest = ""
        if batch and (self.train_batch_size is not None or not self.evaluating):
            low = min(batch, key=lambda i: i.values_per_statistic or 0)
            fewest = (
                f"; fewest values per batch statistic: {low.values_per_statistic} "
                f"({low.module or '<model>'})"
            )
        return (
            f"{len(self.layers)} norm layer(s), {mode}: {c['error']} error(s), "
            f"{c['warning']} warning(s), {c['info']} info{fewest}."
        )

    def to_table(self, verbose: bool = False) -> str:
        """Human-readable: one line per code with its modules, then each code's why and fix.

        ``verbose`` lists every module with what was seen there, and the layer table.
        """
        groups = self.groups
        lines: list[str] = []
        if groups:
            w_code = max(len(g.code) for g in groups)
            lines.append(f"{'SEVERITY':<8}  {'CODE':<{w_code}}  MODULES")
            for g in groups:
                shown = f"{len(g.modules)} module(s)" if verbose else g.module_list()
                lines.append(f"{g.severity:<8}  {g.code:<{w_code}}  {shown}")
            for g in groups:
                lines.append("")
                lines.append(f"{g.code} ({g.severity}): {g.message}")
                if verbose:
                    for f in g.findings:
                        lines.append(f"  - {f.module or '<model>'} [{f.severity}]: {f.detail}")
                lines.append(f"  fix: {g.fix}")
        else:
            lines.append("no findings")
        lines.append("")
        lines.append(self.summary())
        if not verbose and (groups or self.layers):
            lines.append("Every module and the layer table: --verbose (to_table(verbose=True)).")
        if verbose and self.layers:
            lines.append("")
            lines.extend(self._layer_table())
        return "\n".join(lines)

    def _layer_table(self) -> list[str]:
        w_mod = max(len(i.module or "<model>") for i in self.layers)
        w_type = max(len(i.type) for i in self.layers)
        lines = [f"{'MODULE':<{w_mod}}  {'TYPE':<{w_type}}  MODE   BATCH-STATS  VALUES/STAT"]
        for i in self.layers:
            values = "-" if i.values_per_statistic is None else str(i.values_per_statistic)
            lines.append(
                f"{i.module or '<model>':<{w_mod}}  {i.type:<{w_type}}  "
                f"{'train' if i.training else 'eval ':<5}  "
                f"{'yes' if i.batch_statistics else 'no':<11}  {values}"
            )
        return lines

    def __str__(self) -> str:
        return self.to_table()
