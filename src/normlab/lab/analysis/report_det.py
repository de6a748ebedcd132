"""The report of detection runs (``normlab sweep --task detection``): COCO AP and staleness.

A detection run's headline error is ``ap_error`` = 100 − AP@[.5:.95]
(:mod:`normlab.lab.tasks.detection`), so the report's statistics need nothing new: a
difference in it is a difference in AP points with the sign turned. This module adds
what a reader of a detection sweep wants to see: the AP, AP50 and AP75 tables, for the
frozen treatments how far the frozen statistics are from the detection images' own per
depth (the doctor's staleness, kept in each run's record by
:class:`normlab.lab.run.pretrain.DetectionBuilder`), and the protocol's data, model and
pretraining lines. The report imports this module, not the other way round.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..defaults import DETECTION_TASK
from .report_models import all_of_task, data_line, model_line, task_records

if TYPE_CHECKING:
    from ..run.train import RunRecord

__all__ = [
    "AP_TITLES",
    "detection_protocol_lines",
    "detection_records",
    "detection_sections",
    "is_detection",
    "staleness_lines",
]

#: The detection metrics a report shows as tables, with their titles.
AP_TITLES = {
    "ap": "Test COCO AP@[.5:.95] (%, higher is better)",
    "ap50": "Test AP50 (%)",
    "ap75": "Test AP75 (%)",
}


def detection_records(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The detection runs among ``records``."""
    return task_records(records, DETECTION_TASK)


def is_detection(records: Sequence[RunRecord]) -> bool:
    """Whether every one of ``records`` (at least one) is a detection run."""
    return all_of_task(records, DETECTION_TASK)


def staleness_lines(records: Sequence[RunRecord]) -> list[str]:
    """Per frozen treatment, the median over its runs of each backbone BN's staleness
    (depth order); ``–`` where the gap was within the detection images' sampling noise."""
    by_norm: dict[str, list[list[float | None]]] = defaultdict(list)
    for r in detection_records(records):
        stale = (r.conversion or {}).get("staleness")
        if stale:
            by_norm[r.config.norm].append(stale)
    if not by_norm:
        return []
    depth = max(len(s) for runs in by_norm.values() for s in runs)
    head = "| treatment | " + " | ".join(f"BN {i + 1}" for i in range(depth)) + " |"
    out = [
        "## Frozen statistics vs the detection images', per depth",
        "",
        "The doctor's staleness of each backbone BN (stem first): the median over channels "
        "of the RMS gap in the normalized output between the frozen statistics and those "
        "of the detection training images that reach the layer (– : within their sampling "
        "noise); median over the treatment's runs.",
        "",
        head,
        "|---|" + "---|" * depth,
    ]
    for norm, runs in by_norm.items():
        cells = []
        for i in range(depth):
            values = [s[i] for s in runs if i < len(s) and s[i] is not None]
            cells.append(f"{statistics.median(values):.2f}" if values else "–")
        out.append(f"| {norm} | " + " | ".join(cells) + " |")
    return [*out, ""]


def detection_sections(
    records: Sequence[RunRecord], table: Callable[[str], list[str]]
) -> list[str]:
    """The AP tables (``table(metric)``: its Markdown lines), a note on the headline
    error and the staleness table, for the detection runs among ``records``."""
    if not detection_records(records):
        return []
    out: list[str] = []
    for metric, title in AP_TITLES.items():
        out += [f"## {title}, mean ± std over seeds", "", *table(metric), ""]
    out += [
        "Detection rows: the error above, the spread and the Welch tests use 100 − AP@[.5:.95] "
        "(lower is better): a difference in it is the difference in AP points, sign turned.",
        "",
    ]
    return out + staleness_lines(records)


def detection_protocol_lines(r: RunRecord) -> list[str]:
    """The protocol's data, model and pretraining lines for a detection run ``r``."""
    c = r.config
    data = (
        f"{c.data} (COCO annotations)"
        if c.data
        else "built-in detection scenes (1-3 Animal-MNIST silhouettes per textured RGB "
        "scene, unseen silhouettes in the test scenes; class: animal)"
    )
    model = (
        model_line(c)
        if c.model is not None
        else f"- Model: the lab's CenterNet detector (backbone widths {list(c.widths)}, "
        "FPN neck, heatmap + box head on the stride-4 map); one model per run."
    )
    pretrain = (
        f"- Backbone pretrained on the classification images ({c.pretrain}), once per norm "
        "family; frozen_bn: statistics and affine frozen; bn_eval: statistics frozen; "
        "bn+recal: statistics re-estimated on the detection images, then frozen."
        if c.pretrain
        else "- Backbone trained from scratch (--no-pretrain)."
    )
    err = (r.conversion or {}).get("pretrain_error")
    if c.pretrain and err is not None and not math.isnan(err):
        pretrain += f" Pretrained {c.norm} backbone's classification test error: {err:.1f} %."
    return [
        data_line(r, data),
        model,
        pretrain,
        "- Metrics: COCO AP@[.5:.95], AP50, AP75 by pycocotools over every test image's "
        "top-20 detections (3×3 max-pool peaks).",
    ]
