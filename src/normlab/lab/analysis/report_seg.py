"""The report of segmentation runs (``normlab sweep --task segmentation``): mIoU and pixel error.

A segmentation run's headline error (``RunRecord.final_error``) is the mIoU error,
100 − mIoU (:mod:`normlab.lab.tasks.segmentation`), so the report's statistics (CIs, Welch tests,
smallest resolvable differences) need nothing new: a difference in it is a difference
in mIoU points with the sign turned. What a reader wants to see, though, is mIoU itself
(higher is better) and the pixel error (lower is better), each from the run's last
evaluation on the whole test set: this module lays out those tables, the plot of both
against the batch size, and the protocol's data and model lines, from the cells that
:func:`normlab.lab.analysis.report.metric_cells` makes (the report imports this module, not the
other way round).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.scenes import DEFAULT_SEG_TEST
from ..defaults import SEGMENTATION_TASK
from .report_models import all_of_task, data_line, model_line, task_records

if TYPE_CHECKING:
    from ..run.train import RunRecord
    from .cells import Cell

__all__ = [
    "METRIC_TITLES",
    "headline_sections",
    "is_segmentation",
    "plot_segmentation",
    "segmentation_protocol_lines",
    "segmentation_records",
]

#: The segmentation metrics a report shows, with their column and axis names.
METRIC_TITLES = {
    "miou": "test mIoU (%, higher is better)",
    "pixel_error": "test pixel error (%, lower is better)",
}


def segmentation_records(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The segmentation runs among ``records``."""
    return task_records(records, SEGMENTATION_TASK)


def is_segmentation(records: Sequence[RunRecord]) -> bool:
    """Whether every one of ``records`` (at least one) is a segmentation run."""
    return all_of_task(records, SEGMENTATION_TASK)


def headline_sections(
    records: Sequence[RunRecord], headline: list[str], metrics: Mapping[str, list[str]]
) -> list[str]:
    """The report's results sections: the headline error table (``headline``, Markdown
    lines) and, for segmentation runs, the tables of :data:`METRIC_TITLES` (``metrics``:
    metric -> its Markdown table) with a note on the headline error.

    Segmentation runs alone: their mIoU and pixel-error tables stand in for the headline
    table. Mixed with classification runs: the headline table, named for both, first.
    """
    if not segmentation_records(records):
        return ["## Test error (%), mean ± std over seeds", "", *headline, ""]
    out: list[str] = []
    if not is_segmentation(records):
        out += [
            "## Test error (%; segmentation rows: 100 − mIoU), mean ± std over seeds",
            "",
            *headline,
            "",
        ]
    for metric, title in METRIC_TITLES.items():
        out += [f"## {title[0].upper() + title[1:]}, mean ± std over seeds", ""]
        out += [*metrics[metric], ""]
    out += [
        "The spread and the Welch tests below use the mIoU error, 100 − mIoU (lower is "
        "better): a difference in it is the difference in mIoU points, sign turned.",
        "",
    ]
    return out


def segmentation_protocol_lines(r: RunRecord) -> list[str]:
    """The protocol's data and model lines for a segmentation run ``r``."""
    c = r.config
    data = (
        f"{c.data} (images/ + masks/, seeded random split of whole images)"
        if c.data
        else "built-in silhouette scenes (Animal-MNIST silhouettes pasted onto gratings; "
        f"the test scenes, always {DEFAULT_SEG_TEST}, use unseen silhouettes; "
        "target: animal vs background per pixel)"
    )
    levels = len(c.widths)
    model = (
        [model_line(c)]
        if c.model is not None
        else [
            f"- Model: U-Net, {levels} levels of widths {list(c.widths)} (two 3×3 "
            "conv-norm-activation layers each, stride-2 down, transposed-conv up, skip "
            f"concatenations), bottom level at {r.final_map}×{r.final_map}; per-pixel "
            "cross-entropy; one model per run, no packing.",
            f"- Values behind each batch statistic at the full-resolution norm layers "
            f"(N × H × W): N × {c.image_size * c.image_size}.",
        ]
    )
    return [
        data_line(r, data),
        *model,
        "- Metrics: mean IoU over the classes present and pixel error, from one confusion "
        "matrix summed over the whole test set (pooled pixels, void pixels skipped).",
    ]


def plot_segmentation(cells: Mapping[str, Sequence[Cell]], path: str | Path) -> Path:
    """PNG: test mIoU and test pixel error vs batch size (log-2 axis), one line per norm,
    ± std over seeds, side by side; ``cells``: metric -> its cells."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(METRIC_TITLES), figsize=(10.0, 4.2), dpi=120)
    try:
        for ax, (metric, title) in zip(axes, METRIC_TITLES.items(), strict=True):
            by_row: dict[str, list[Cell]] = defaultdict(list)
            for c in cells[metric]:
                by_row[c.row].append(c)
            for name, row in by_row.items():
                es = [0.0 if math.isnan(c.std) else c.std for c in row]
                ax.errorbar(
                    [c.batch_size for c in row], [c.mean for c in row], yerr=es,
                    marker="o", capsize=3, label=name,
                )  # fmt: skip
            sizes = sorted({c.batch_size for c in cells[metric]})
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.minorticks_off()
            ax.set_xlabel("batch size (images per step)")
            ax.set_ylabel(title)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(
            "Segmentation: test mIoU and pixel error vs batch size (mean ± std over seeds)"
        )
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
