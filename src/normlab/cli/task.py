"""``normlab sweep --task``: what the runs learn, the defaults that follow from it, and the
tables the sweep and the report print.

Built without torch (every ``normlab`` command builds the sweep's parser). The options
whose default depends on the task (``--batch-sizes``, ``--lr``, ``--image-size``,
``--max-train``, ``--norms`` and ``--epochs``) parse to classification's defaults and
record whether the user gave them (:class:`GivenOption`; ``--norms`` defaults to None,
``--epochs`` and ``--steps`` too); :func:`resolve_task_defaults` then
puts the task's own defaults in those the user did not give.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..lab import defaults
from ..lab.defaults import (
    CLASSIFICATION_TASK,
    DETECTION_DEFAULTS,
    DETECTION_TASK,
    SEGMENTATION_DEFAULTS,
    SEGMENTATION_TASK,
    TASKS,
)
from .args import GivenOption, positive_float

if TYPE_CHECKING:
    from ..lab.run.train import RunRecord

__all__ = [
    "add_lr_argument",
    "add_task_arguments",
    "print_results",
    "resolve_task_defaults",
    "task_options",
]


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--task`` (default classification) to ``p``."""
    seg = SEGMENTATION_DEFAULTS
    p.add_argument(
        "--task",
        choices=TASKS,
        default=CLASSIFICATION_TASK,
        help="what the runs learn: classification (the ResNet on Animal-MNIST, top-1 "
        "error) or segmentation (a U-Net with the run's norm on built-in silhouette "
        "scenes, or --data FOLDER with images/ and masks/; reports mIoU and pixel error). "
        f"Segmentation's defaults: norms {','.join(seg.norms)}, batch sizes "
        f"{','.join(map(str, seg.batch_sizes))}, {seg.epochs} epochs, lr {seg.base_lr}, "
        f"image size {seg.image_size}, {seg.max_train} training scenes, no packing. "
        "detection: the lab's CenterNet detector on built-in detection scenes, or --data "
        "annotations.json (COCO), COCO AP by pycocotools; defaults: treatments "
        f"{','.join(DETECTION_DEFAULTS.norms)}, batch sizes "
        f"{','.join(map(str, DETECTION_DEFAULTS.batch_sizes))}, {DETECTION_DEFAULTS.epochs} "
        f"epochs, lr {DETECTION_DEFAULTS.base_lr}, image size {DETECTION_DEFAULTS.image_size}, "
        f"{DETECTION_DEFAULTS.max_train} training scenes (default: %(default)s)",
    )
    det = p.add_argument_group("detection (--task detection)")
    det.add_argument(
        "--images",
        metavar="DIR",
        help="folder the COCO file's file_name entries are relative to (default: the "
        "folder of the --data annotations file)",
    )
    det.add_argument(
        "--no-pretrain",
        action="store_true",
        help="train the detector from scratch (default: its backbone is first pretrained on "
        "the classification images, once per norm family, and cached; frozen_bn, bn_eval "
        "and bn+recal need it)",
    )
    det.add_argument(
        "--val-data",
        metavar="FILE.json",
        help="COCO annotations of the test images (default: a seeded 20%% of --data's)",
    )


def add_lr_argument(p: argparse.ArgumentParser) -> None:
    """Add ``--lr`` (the base learning rate, at batch 32) to ``p``."""
    p.add_argument(
        "--lr",
        type=positive_float,
        action=GivenOption,
        default=defaults.DEFAULT_BASE_LR,
        help="learning rate at batch 32; scaled linearly (default: %(default)s; "
        f"segmentation: {SEGMENTATION_DEFAULTS.base_lr})",
    )


def resolve_task_defaults(args: argparse.Namespace) -> None:
    """Put the defaults of ``args.task`` in the options the user did not give.

    ``--epochs`` counts too when ``--steps`` is given (it is then the number of
    evaluation points); the length option records whether ``--epochs`` was given.
    """
    if args.task not in (SEGMENTATION_TASK, DETECTION_TASK):
        return
    seg = SEGMENTATION_DEFAULTS if args.task == SEGMENTATION_TASK else DETECTION_DEFAULTS
    chosen: dict[str, Any] = {
        "batch_sizes": list(seg.batch_sizes),
        "lr": seg.base_lr,
        "image_size": seg.image_size,
        "max_train": seg.max_train,
    }
    given = getattr(args, "given_options", set())
    for name, value in chosen.items():
        if name not in given:
            setattr(args, name, value)
    if args.norms is None:
        args.norms = list(seg.norms)
    if "epochs" not in given:
        args.epochs = seg.epochs


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~normlab.lab.sweep.config.SweepConfig` fields that follow from ``args.task``,
    after :func:`resolve_task_defaults` has put the task's defaults into ``args``."""
    resolve_task_defaults(args)
    detection_only = [o for o in ("images", "val_data") if getattr(args, o, None) is not None]
    if getattr(args, "no_pretrain", False) and args.task != DETECTION_TASK:
        detection_only.append("no_pretrain")
    if args.task != DETECTION_TASK and detection_only:
        flag = "--" + detection_only[0].replace("_", "-")
        raise ValueError(f"{flag} belongs to --task detection (COCO data); drop it or add it")
    if args.task == SEGMENTATION_TASK:
        return {"task": args.task, "widths": SEGMENTATION_DEFAULTS.widths}
    if args.task == DETECTION_TASK:
        from ..lab.data.det_coco import data_spec

        if args.data is None and detection_only:
            raise ValueError("--images and --val-data need --data annotations.json")
        if args.data is not None:
            args.data = data_spec(args.data, args.images, args.val_data)
        from ..lab.run.pretrain import DEFAULT_PRETRAIN

        pretrain = None if args.no_pretrain else DEFAULT_PRETRAIN
        return {"task": args.task, "widths": DETECTION_DEFAULTS.widths, "pretrain": pretrain}
    return {"task": args.task}


def print_results(records: Sequence[RunRecord]) -> None:
    """Print the sweep's tables: the error table (and a user model's conversions) of
    classification runs; mIoU and pixel error of segmentation runs, with their names."""
    from ..lab.analysis.report import markdown_table, metric_cells
    from ..lab.analysis.report_models import conversion_lines
    from ..lab.analysis.report_seg import METRIC_TITLES, segmentation_records
    from .model import print_tables

    segmented = segmentation_records(records)
    keys = {r.key for r in segmented}
    others = [r for r in records if r.key not in keys]
    if others:
        print_tables(others)
    for metric, title in METRIC_TITLES.items() if segmented else ():
        print(f"\nSegmentation, {title}, mean ± std over seeds:")
        print("\n".join(markdown_table(metric_cells(segmented, metric))))
    conversions = conversion_lines(segmented)
    if conversions:
        print("\n" + "\n".join(conversions).rstrip())
