"""What both frameworks' precise-BN adapters do once they hold the batches.

Framework-free, so that Lightning's ``PreciseBN`` and mmengine's ``PreciseBNHook`` take
their batches the same way and recalibrate the same way: in eval mode, pooled over the
ranks when there are several, the model's training flags restored after.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..distributed import WORLD, sync_running_stats
from ..recalibrate import RecalibrationReport, recalibrate

__all__ = ["batch_count", "first_batches", "recalibrate_in_eval"]


def batch_count(owner: str, num_batches: int) -> int:
    """``num_batches`` as an int, refused below 1 (``owner``: the adapter, for the message)."""
    if int(num_batches) < 1:
        raise ValueError(f"{owner}: num_batches must be >= 1, got {num_batches}.")
    return int(num_batches)


def first_batches(loader: Iterable[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` batches of ``loader`` (all of them for None), no more drawn."""
    return list(loader if limit is None else itertools.islice(loader, limit))


def recalibrate_in_eval(
    model: nn.Module,
    batches: list[Any],
    *,
    method: str,
    variance: str,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    distributed: bool,
) -> RecalibrationReport:
    """:func:`normlab.recalibrate.recalibrate` on ``batches`` with every module in eval
    mode; ``distributed``: the statistics pool over the default group, then
    :func:`~normlab.distributed.sync_running_stats` makes every other running buffer
    agree. Each module's training flag is restored, whatever happens."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        report = recalibrate(
            model,
            batches,
            method=method,  # type: ignore[arg-type]
            variance=variance,  # type: ignore[arg-type]
            forward_fn=forward_fn,
            process_group=WORLD if distributed else None,
            progress=False,
            return_report=True,
        )
        if distributed:
            sync_running_stats(model, "reduce")
    finally:
        for m, flag in flags:
            m.training = flag
    return report
