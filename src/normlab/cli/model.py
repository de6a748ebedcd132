"""``normlab sweep --model``: the user's own network, and the tables the lab prints.

Built without torch (every ``normlab`` command builds the sweep's parser); the factory
is loaded when the sweep starts (:class:`normlab.lab.sweep.orchestrate.SweepConfig`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..lab.run.train import RunRecord

__all__ = ["add_model_arguments", "print_tables"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--model`` (default None: the lab's ResNet) to ``p``."""
    p.add_argument(
        "--model",
        metavar="FILE.py:FACTORY",
        help="train your own network instead of the lab's ResNet: path/to/file.py:factory "
        "or package.module:factory, a function or class returning an nn.Module (it may "
        "take num_classes=, in_channels=, norm_layer=). Its BatchNorm layers become each "
        "norm of the grid; each run trains one model (no packing); the file's hash keys "
        "the runs, so an edited file gets new runs. With --task detection: a torchvision-style "
        "detector (model(images, targets) -> dict of losses in training, one dict of boxes, "
        "labels, scores per image in eval; num_classes= counts the background)",
    )


def print_tables(records: Sequence[RunRecord]) -> None:
    """Print the error table, and the conversions of a user model's runs if any."""
    from ..lab.analysis.report import markdown_table, summarize
    from ..lab.analysis.report_models import conversion_lines

    print("\n".join(markdown_table(summarize(records))))
    conversions = conversion_lines(records)
    if conversions:
        print("\n" + "\n".join(conversions).rstrip())
