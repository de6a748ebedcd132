"""``normlab data export-coco DIR``: the built-in detection scenes written in COCO format.

So a user can see the format ``normlab sweep --task detection --data`` reads, and train
on it: ``DIR/train.json`` and ``DIR/val.json`` with the images in ``DIR/images/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import int_at_least, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="write the lab's built-in data in a standard format",
        description="Write the lab's built-in data in a format other tools read.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser(
        "export-coco",
        help="write the built-in detection scenes as COCO json + PNG images",
        description="Write the built-in detection scenes as DIR/train.json, DIR/val.json "
        "and DIR/images/*.png (COCO format); train on them with `normlab sweep --task "
        "detection --data DIR/train.json --val-data DIR/val.json`.",
    )
    e.add_argument(
        "dir", help="output folder (created; existing files of the same name are replaced)"
    )
    e.add_argument(
        "--train", type=positive_int, default=600, help="training scenes (default: %(default)s)"
    )
    e.add_argument(
        "--val", type=positive_int, default=300, help="validation scenes (default: %(default)s)"
    )
    e.add_argument(
        "--image-size",
        type=int_at_least(16),
        default=48,
        help="side of the square scenes (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from ..lab.data.det_coco import export_coco

    root = Path(args.dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a folder; pass a folder to write into")
    train, val = export_coco(root, args.train, args.val, args.image_size)
    print(
        f"wrote {train} ({args.train} images) and {val} ({args.val} images), "
        f"images in {root / 'images'}"
    )
    return 0
