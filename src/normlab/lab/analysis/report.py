"""From stored runs to answers: a table with spread, Welch tests, a plot, a Markdown report.

- :func:`summarize`: mean ± std and 95% CI (Student t) of test error per norm × batch.
- :func:`key_comparisons`: Welch's t-test of each norm's smallest vs largest batch, and
  of every norm vs the first one at each batch size, with the smallest difference the
  seeds can resolve.
- :func:`plot_errors`: error vs batch size (log-2 axis), one line per norm, ± std bars.
- :func:`write_report`: ``report.md`` + ``sweep.png`` + ``summary.json`` in a folder.

Runs of different protocols (:mod:`normlab.lab.run.protocol`, e.g. other epoch counts) are
never averaged together: each protocol gets rows of its own, named by the fields that
differ (``BN (epochs=1)``), and is compared only with rows of the same protocol.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..run.protocol import protocol_key, protocol_names, protocol_of
from ..run.train import RunRecord
from . import report_det as det
from . import report_seg as seg
from .cells import Cell
from .report_models import conversion_lines, model_lines, training_length
from .ttests import WelchResult, mean_ci, welch_test

__all__ = [
    "Cell",
    "Comparison",
    "ReportFiles",
    "key_comparisons",
    "markdown_table",
    "metric_cells",
    "plot_errors",
    "render_markdown",
    "summarize",
    "summary_dicts",
    "write_json",
    "write_report",
]


@dataclass(frozen=True)
class Comparison:
    a: Cell
    b: Cell
    test: WelchResult


def _label(r: RunRecord) -> str:
    """A run's norm as reported: data-parallel runs name their rank count (``bn×2``)."""
    return r.config.norm if r.config.ranks == 1 else f"{r.config.norm}×{r.config.ranks}"


def _norm_order(records: Sequence[RunRecord]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(_label(r), None)
    names = list(seen)
    head = [n for n in ("bn", "bn+recal", "gn") if n in seen]
    return head + [n for n in names if n not in head]


def _protocol_name(records: Sequence[RunRecord]) -> dict[str, str]:
    """Run key -> the name of its protocol ("" when all runs share one)."""
    names = protocol_names(protocol_of(r.config) for r in records)
    return {r.key: names[protocol_key(protocol_of(r.config))] for r in records}


def summarize(records: Sequence[RunRecord]) -> list[Cell]:
    """One :class:`Cell` per norm × protocol × batch size: norms in report order,
    protocols in order of appearance, batches ascending. A run counts once."""
    named = _protocol_name(records)
    groups: dict[tuple[str, str, int], dict[str, RunRecord]] = defaultdict(dict)
    for r in records:
        groups[(_label(r), named[r.key], r.config.batch_size)].setdefault(r.key, r)
    cells = []
    for norm in _norm_order(records):
        for proto in dict.fromkeys(p for (n, p, _) in groups if n == norm):
            for bs in sorted(b for (n, p, b) in groups if n == norm and p == proto):
                runs = list(groups[(norm, proto, bs)].values())
                errs = [r.final_error for r in runs]
                m, s, ci = mean_ci(errs)
                diverged = sum(r.diverged for r in runs)
                cells.append(Cell(norm, bs, tuple(errs), m, s, ci, proto, diverged))
    return cells


def metric_cells(records: Sequence[RunRecord], metric: str) -> list[Cell]:
    """:func:`summarize` of a final test metric of the task (``RunRecord.final_metrics``,
    e.g. segmentation's ``miou``) instead of the headline error, over the runs that have it."""
    runs = [r for r in records if metric in r.final_metrics]
    return summarize([dataclasses.replace(r, final_error=r.final_metrics[metric]) for r in runs])


def summary_dicts(cells: Sequence[Cell]) -> list[dict[str, object]]:
    """The JSON summary: ``{norm, batch_size, mean_error, std_error, n_seeds}`` (percent),
    plus ``protocol`` (its name) when the runs span several protocols and ``n_diverged``
    (seeds whose loss turned non-finite) when any did; a summary without it had none."""
    return [
        {
            "norm": c.norm,
            "batch_size": c.batch_size,
            "mean_error": round(c.mean, 4),
            "std_error": None if math.isnan(c.std) else round(c.std, 4),
            "n_seeds": c.n,
            **({"protocol": c.protocol} if c.protocol else {}),
            **({"n_diverged": c.diverged} if c.diverged else {}),
        }
        for c in cells
    ]


def write_json(cells: Sequence[Cell], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary_dicts(cells), indent=2) + "\n")
    return path


def key_comparisons(cells: Sequence[Cell]) -> list[Comparison]:
    """Smallest vs largest batch per row; each norm vs the first norm at every batch.

    A row is a norm under one protocol; rows are compared only within a protocol.
    """
    by_row: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_row[c.row].append(c)
    out = []
    for row in by_row.values():
        lo, hi = row[0], row[-1]
        if lo is not hi and lo.n > 1 and hi.n > 1:
            out.append(Comparison(lo, hi, welch_test(lo.errors, hi.errors)))
    first: dict[str, str] = {}  # protocol -> its first row
    for name, row in by_row.items():
        first.setdefault(row[0].protocol, name)
    for name, row in by_row.items():
        ref_name = first[row[0].protocol]
        if name == ref_name:
            continue
        ref = {c.batch_size: c for c in by_row[ref_name]}
        for c in row:
            r = ref.get(c.batch_size)
            if r is not None and r.n > 1 and c.n > 1:
                out.append(Comparison(c, r, welch_test(c.errors, r.errors)))
    return out


def plot_errors(cells: Sequence[Cell], path: str | Path, title: str | None = None) -> Path:
    """PNG of test error vs batch size (log-2 axis), one line per norm, ± std error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_row: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_row[c.row].append(c)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for name, row in by_row.items():
            xs = [c.batch_size for c in row]
            ys = [c.mean for c in row]
            es = [0.0 if math.isnan(c.std) else c.std for c in row]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        sizes = sorted({c.batch_size for c in cells})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size (images per step)")
        ax.set_ylabel("test error (%), mean ± std over seeds")
        ax.set_title(title or "Test error vs batch size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(cells: Sequence[Cell]) -> list[str]:
    """Lines of a Markdown table: one row per norm (and protocol), one column per batch size."""
    sizes = sorted({c.batch_size for c in cells})
    grid = {(c.row, c.batch_size): c for c in cells}
    rows = list(dict.fromkeys(c.row for c in cells))
    lines = [
        "| norm | " + " | ".join(f"batch {s}" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in rows:
        row = []
        for s in sizes:
            c = grid.get((name, s))
            flag = "" if c is None or not c.diverged else f" ({c.diverged} diverged)"
            row.append("" if c is None else f"{_fmt(c.mean)} ± {_fmt(c.std)}{flag}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def _ci_table(cells: Sequence[Cell]) -> list[str]:
    lines = ["| norm | batch | seeds | mean | std | 95% CI |", "|---|---|---|---|---|---|"]
    for c in cells:
        ci = "–" if math.isnan(c.ci95) else f"[{c.mean - c.ci95:.1f}, {c.mean + c.ci95:.1f}]"
        std = _fmt(c.std, 2)
        lines.append(f"| {c.row} | {c.batch_size} | {c.n} | {c.mean:.2f} | {std} | {ci} |")
    return lines


def _comparison_lines(comps: Sequence[Comparison]) -> list[str]:
    lines = [
        "| A | B | A − B (points) | t | df | p | smallest resolvable |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in comps:
        t = k.test
        lines.append(
            f"| {k.a.row} @ {k.a.batch_size} | {k.b.row} @ {k.b.batch_size} "
            f"| {t.diff:+.1f} | {t.t:.2f} | {t.df:.1f} | {t.p_value:.3g} | {t.resolvable:.1f} |"
        )
    return lines


def _protocol_lines(records: Sequence[RunRecord]) -> list[str]:
    r = records[0]
    c = r.config
    sizes = sorted({x.config.batch_size for x in records})
    values = ", ".join(f"{b}: {b * r.final_map**2}" for b in sizes)
    wall = sum(x.wall_time for x in records)
    head = [
        f"- Data: {c.data or 'embedded Animal-MNIST'} at {c.image_size}×{c.image_size}, "
        f"{r.num_train} training / {r.num_test} test images (fixed stratified split"
        + (f"; data hash {c.data_hash}" if c.data_hash else "")
        + ").",
        *model_lines(r, values),
    ]
    return [
        *(
            seg.segmentation_protocol_lines(r)
            if seg.is_segmentation([r])
            else det.detection_protocol_lines(r)
            if det.is_detection([r])
            else head
        ),
        f"- SGD momentum 0.9, weight decay {c.weight_decay}, lr = {c.base_lr} × batch / 32, "
        + training_length(c)
        + "; test error in eval mode (BN: running statistics).",
        *_ranks_lines(records),
        f"- {len(records)} runs, {wall:.0f} s of training in total (sum over runs).",
        *_packed_lines(records),
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items()) if k != "platform")
        + f"; {r.versions.get('platform', '')}; device {c.device}.",
    ]


def _packed_lines(records: Sequence[RunRecord]) -> list[str]:
    packed = sum(x.packed > 1 for x in records)
    if not packed:
        return []
    return [
        f"- {packed} of the runs trained side by side with the other seeds of their cell "
        "in one packed model (normlab.lab.run.packed): each seed's own gradients, updates and "
        "statistics; a run's wall time is its share of the packed job."
    ]


def _ranks_lines(records: Sequence[RunRecord]) -> list[str]:
    ranks = sorted({x.config.ranks for x in records if x.config.ranks > 1})
    if not ranks:
        return []
    return [
        f"- Data-parallel runs (norm×K: K ∈ {ranks} ranks, DDP): the batch size is per rank, "
        "the lr scales with the global batch K × batch; a plain norm uses per-rank "
        "statistics, a +sync norm global-batch ones."
    ]


def render_markdown(
    records: Sequence[RunRecord], *, plot_name: str | None = "sweep.png", title: str = ""
) -> str:
    """The report as Markdown (embeds ``plot_name`` relative to the report's folder)."""
    if not records:
        raise ValueError("no runs to report; run `normlab sweep` first")
    cells = summarize(records)
    comps = key_comparisons(cells)
    out = [f"# {title or 'normlab sweep: test error vs batch size'}", ""]
    if plot_name:
        out += [f"![test error vs batch size]({plot_name})", ""]
    tables = {m: markdown_table(metric_cells(records, m)) for m in seg.METRIC_TITLES}
    out += seg.headline_sections(records, markdown_table(cells), tables)
    out += det.detection_sections(records, lambda m: markdown_table(metric_cells(records, m)))
    diverged = [x for x in records if x.diverged]
    if diverged:
        out += [
            f"{len(diverged)} run(s) diverged (non-finite loss) and count with the error "
            "they had when they stopped: "
            + ", ".join(
                f"{x.config.norm}@{x.config.batch_size}/seed {x.config.seed}" for x in diverged
            ),
            "",
        ]
    out += conversion_lines(records)
    out += ["## Spread: 95% confidence intervals (Student t)", "", *_ci_table(cells), ""]
    if comps:
        out += [
            "## Is it luck? Welch's t-test",
            "",
            "Two-sided Welch t-test on the per-seed errors. *Smallest resolvable* is the "
            "difference that would reach p < 0.05 with these spreads and seed counts; "
            "differences below it are within run-to-run noise.",
            "",
            *_comparison_lines(comps),
            "",
        ]
    out += ["## Protocol", ""]
    named = _protocol_name(records)
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for x in records:
        groups[named[x.key]].append(x)
    for name, group in groups.items():
        if name:
            out += [f"### Protocol {name}", ""]
        out += [*_protocol_lines(group), ""]
    return "\n".join(out)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plot: Path
    json: Path


def write_report(records: Sequence[RunRecord], out_dir: str | Path) -> ReportFiles:
    """Write ``report.md``, ``sweep.png`` and ``summary.json`` into ``out_dir``."""
    if not records:
        raise ValueError("no runs to report; run `normlab sweep` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = summarize(records)
    if seg.is_segmentation(records):
        png = seg.plot_segmentation(
            {m: metric_cells(records, m) for m in seg.METRIC_TITLES}, out / "sweep.png"
        )
    elif det.is_detection(records):
        png = plot_errors(cells, out / "sweep.png", "Detection: 100 − COCO AP@[.5:.95]")
    else:
        png = plot_errors(cells, out / "sweep.png")
    md = out / "report.md"
    md.write_text(render_markdown(records, plot_name=png.name))
    js = write_json(cells, out / "summary.json")
    return ReportFiles(md, png, js)
