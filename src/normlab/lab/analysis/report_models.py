"""The report's account of a user's model (``normlab sweep --model``): what each norm did.

Each run of a user model stores its conversion summary
(:meth:`normlab.lab.models.user_model.ConversionSummary.to_dict`). The report shows, per model
and source version, one row per norm: how its layers were built, how many were
converted to which class, what was left in place and what warned, so a reader can see
which network each row of the error table trained.

Also the pieces the task reports (segmentation, detection) share: their runs among a
store's records (:func:`task_records`) and the protocol's data line (:func:`data_line`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..run.config import RunConfig, RunRecord

__all__ = [
    "all_of_task",
    "conversion_lines",
    "data_line",
    "model_line",
    "model_lines",
    "task_records",
    "training_length",
]


def task_records(records: Sequence[RunRecord], task: str) -> list[RunRecord]:
    """The runs of ``task`` among ``records``."""
    return [r for r in records if r.config.task == task]


def all_of_task(records: Sequence[RunRecord], task: str) -> bool:
    """Whether every one of ``records`` (at least one) is a run of ``task``."""
    return bool(records) and len(task_records(records, task)) == len(records)


def data_line(r: RunRecord, data: str) -> str:
    """The protocol's ``- Data: ...`` line of a segmentation or detection run ``r``."""
    c = r.config
    return (
        f"- Data: {data} at {c.image_size}×{c.image_size}, {r.num_train} training / "
        f"{r.num_test} test images."
    )


def model_line(config: RunConfig) -> str:
    """The protocol's ``- Model: ...`` line for a user model's runs."""
    return (
        f"- Model: the user's {config.model} (source hash {config.model_hash}), built once "
        "per run with the run's norm (see Conversions); one model per run, no packing."
    )


def _layers(summary: dict[str, Any]) -> str:
    parts = []
    if summary.get("built"):
        parts.append(f"{summary['built']} built via norm_layer=")
    if summary.get("converted") or not parts:
        parts.append(f"{summary.get('converted', 0)} converted")
    return " + ".join(parts)


def _types(summary: dict[str, Any]) -> str:
    """``GroupNorm ×4``: the class names (without their module path) and counts."""
    new = summary.get("new_types") or {}
    return ", ".join(f"{n.rpartition('.')[2]} ×{k}" for n, k in sorted(new.items())) or "–"


def conversion_lines(records: Sequence[RunRecord]) -> list[str]:
    """Markdown lines of a ``## Conversions`` section; empty without user-model runs."""
    models: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        c = r.config
        if c.model is None or r.conversion is None:
            continue
        models.setdefault((c.model, c.model_hash or ""), {}).setdefault(c.norm, r.conversion)
    if not models:
        return []
    out = ["## Conversions of the user's model", ""]
    for (name, source), by_norm in models.items():
        out += [
            f"{name} (source hash {source}): the norm layers each run's network got.",
            "",
            "| norm | built with | layers | now | skipped | warnings | parameters |",
            "|---|---|---|---|---|---|---|",
        ]
        notes: list[str] = []
        for norm, s in by_norm.items():
            skipped, warned = s.get("skipped") or [], s.get("warnings") or []
            out.append(
                f"| {norm} | {s.get('built_with') or '–'} | {_layers(s)} | {_types(s)} "
                f"| {len(skipped)} | {len(warned)} | {s.get('num_parameters', '–')} |"
            )
            notes += [
                f"- {norm}: skipped {k.get('path', '?')} ({k.get('type', '?')}): "
                f"{k.get('reason', '')}"
                for k in skipped
            ]
            notes += [f"- {norm}: warning: {w}" for w in warned]
            notes += [f"- {norm}: {n}" for n in s.get("notes") or []]
        out += ["", *notes, ""] if notes else [""]
    return out


def model_lines(r: RunRecord, values: str) -> list[str]:
    """The network: the lab's ResNet (and its deepest batch statistics) or a user's model."""
    c = r.config
    if c.model is not None:
        return [model_line(c)]
    return [
        f"- Model: ResNet, 3×3 stem of stride {c.stem_stride}, one stage per width "
        f"{list(c.widths)}, {c.blocks} basic block(s) per stage, last stage at "
        f"{r.final_map}×{r.final_map}.",
        f"- Values behind each batch statistic at the deepest BN layers (N × H × W): {values}.",
    ]


def training_length(c: RunConfig) -> str:
    """How long every run trained: fixed epochs, or fixed optimizer steps."""
    if c.steps is None:
        return (
            f"{c.warmup_epochs} epoch(s) linear warm-up then cosine, {c.epochs} epochs at "
            "every batch size"
        )
    return (
        f"linear warm-up over {c.warmup_epochs}/{c.epochs} of training then cosine, "
        f"{c.steps} optimizer steps at every batch size (data reshuffled every pass), "
        f"evaluated {c.epochs} times"
    )
