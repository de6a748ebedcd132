"""One training run of the lab: config in, :class:`RunRecord` out.

Protocol (the same for every norm and batch size, after the Group Normalization paper):
SGD with momentum 0.9 and weight decay 5e-4; learning rate ``base_lr · batch / 32``
(linear scaling); linear warm-up over the first ``warmup_epochs`` epochs, then cosine
decay to zero, stepped per iteration; the same number of epochs at every batch size;
the last incomplete batch of an epoch is dropped (a batch of 1 would break BN). The test
error is measured in eval mode, so BN uses its running statistics: after every epoch on
the first 500 test images (a curve, cheaply), after the last one on the whole test set.
``bn+recal`` trains as BN and recomputes the running statistics over the training set
(:func:`normlab.recalibrate.recalibrate`, precise BN) before every evaluation;
``bn+recal-pb`` likewise, storing the mean of the per-batch variances instead of the
pooled variance.

With ``RunConfig.steps`` = N every run takes exactly N optimizer steps whatever its batch
size, so that large batches are not simply given fewer steps: the data order still
reshuffles at every pass over the data, the warm-up is the same fraction of training
(``warmup_epochs / epochs`` of the N steps) and the run is evaluated at ``epochs``
points, after steps ``⌊k · N / epochs⌋``. The store keeps the two protocols apart.

Data-parallel runs (``ranks`` > 1, inside an initialized :mod:`torch.distributed` group of
that size, e.g. under ``torchrun``): ``batch_size`` is the *per-rank* batch. Every rank
draws the same shuffled order, takes its own slice of each global batch of
``ranks · batch_size`` images, and the gradients are averaged by
``DistributedDataParallel``, so the optimizer sees the global batch: the learning rate
scales with the global batch and an epoch has ``n // (ranks · batch_size)`` steps. A
plain norm (``bn``) normalizes with per-rank statistics, a ``+sync`` one (``bn+sync``)
with global-batch statistics.

Lone, packed and data-parallel runs share one loop, :func:`normlab.lab.run.loop.train_loop`;
every function here passes its ``task`` and model builder ``build`` on to it. A builder
that changes a network it is given (a user model's norms) says how in a
``conversion(config) -> dict | None`` method, which goes into the run's record.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ..._core.running import NonFiniteStatisticsWarning
from ..data.images import Split
from ..data.scenes import SegSplit
from ..defaults import SEGMENTATION_TASK
from ..errors import DataError
from ..models.resnet import final_spatial_size
from ..tasks.segmentation import load_task_split
from ..tasks.task import CLASSIFICATION, Task
from .config import EpochStats, RunConfig, RunRecord, versions
from .loop import ModelBuilder, check_packable, lab_model, train_loop

__all__ = [
    "EpochStats",
    "RunConfig",
    "RunRecord",
    "train_model",
    "train_packed",
    "train_run",
    "train_runs",
    "versions",
]


def train_model(
    config: RunConfig,
    split: Split,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    task: Task = CLASSIFICATION,
    build: ModelBuilder = lab_model,
) -> tuple[torch.nn.Module, list[EpochStats], bool]:
    """Train one model by the protocol; returns ``(model, per-epoch stats, diverged)``.

    For ``config.ranks > 1`` every rank of the initialized process group calls this with
    the same config and data; the returned model is this rank's replica (unwrapped).
    """
    model, [(history, diverged)] = _quiet_loop(
        [config],
        split,
        task=task,
        build=build,
        on_epoch=None if on_epoch is None else lambda _, stats: on_epoch(stats),
    )
    return model, history, diverged


def train_run(
    config: RunConfig,
    *,
    split: Split | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    task: Task = CLASSIFICATION,
    build: ModelBuilder = lab_model,
) -> RunRecord:
    """Train and evaluate one model; ``on_epoch`` is called after every epoch."""
    start = time.perf_counter()
    if split is None:
        split = load_task_split(config.task, config.data, config.image_size, config.max_train)
    config = on_data(config, split)
    _, history, diverged = train_model(config, split, on_epoch, task=task, build=build)
    wall = time.perf_counter() - start
    return _record(config, split, history, diverged, wall, 1, _conversion(build, config))


def on_data(config: RunConfig, split: Split | SegSplit) -> RunConfig:
    """``config`` with the data hash of ``split`` (what the run's record keeps).

    Raises:
        DataError: ``config`` was planned on other data bits than ``split`` holds (e.g. a
            worker or rank that prepared the data differently from the planning process).
    """
    if config.data_hash is None:
        return dataclasses.replace(config, data_hash=split.data_hash)
    if config.data_hash != split.data_hash:
        raise DataError(
            f"the data prepared for {config.norm}@{config.batch_size} has hash "
            f"{split.data_hash}, but the sweep was planned on data with hash "
            f"{config.data_hash}; the processes prepare the data differently (another "
            "normlab, torch or data file on this machine?). Run every process from one "
            "installation and one data file"
        )
    return config


def _conversion(build: ModelBuilder, config: RunConfig) -> dict[str, Any] | None:
    """What ``build`` did to the network of ``config``, if it says (see the module doc)."""
    describe = getattr(build, "conversion", None)
    return None if describe is None else describe(config)


def _final_map(config: RunConfig) -> int:
    """Side of the deepest feature map: the ResNet's last stage, the U-Net's bottom level
    (a user model: 0, unknown)."""
    if config.model is not None:
        return 0
    if config.task == SEGMENTATION_TASK:
        return config.image_size // 2 ** (len(config.widths) - 1)
    return final_spatial_size(config.image_size, len(config.widths), config.stem_stride)


def _record(
    config: RunConfig,
    split: Split,
    history: list[EpochStats],
    diverged: bool,
    wall_time: float,
    packed: int,
    conversion: dict[str, Any] | None = None,
) -> RunRecord:
    return RunRecord(
        config=config,
        epochs=history,
        final_error=history[-1].test_error,
        wall_time=wall_time,
        diverged=diverged,
        num_train=len(split.x_train),
        num_test=len(split.x_test),
        final_map=_final_map(config),
        versions=versions(),
        packed=packed,
        conversion=conversion,
    )


# -- seeds side by side (normlab.lab.run.packed) ------------------------------------------------


def train_packed(
    configs: Sequence[RunConfig],
    split: Split,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
    *,
    task: Task = CLASSIFICATION,
    build: ModelBuilder = lab_model,
) -> tuple[torch.nn.Module, list[tuple[list[EpochStats], bool]]]:
    """Train runs that differ only in seed side by side in one packed model.

    Seed s's network starts from the weights ``train_model`` would build for it
    (``torch.manual_seed(seed)``), draws its own data order, and gets exactly its own
    gradient and update (see :mod:`normlab.lab.run.packed`), so each run follows the protocol
    of :func:`train_model`; only float rounding differs. A run whose loss turns
    non-finite is evaluated at once and stops being recorded, as an unpacked run stops;
    the others go on.

    Returns:
        ``(packed model, per run in order (per-epoch stats, diverged))``;
        :func:`normlab.lab.run.packed.unpack_state` cuts one run's weights out of the model.
        ``on_epoch(i, stats)`` is called after each epoch of run ``i``.
    """
    check_packable(configs)
    return _quiet_loop(configs, split, task=task, build=build, on_epoch=on_epoch)


def _quiet_loop(*args: Any, **kwargs: Any) -> Any:
    """:func:`train_loop` without the layers' non-finite-statistics warnings: a run whose
    loss turns non-finite is recorded as diverged, and a packed run's NaN reaches only its
    own channels of each layer (the others' statistics still update)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        return train_loop(*args, **kwargs)


def train_runs(
    configs: Sequence[RunConfig],
    *,
    split: Split | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
    pack: bool = True,
    task: Task = CLASSIFICATION,
    build: ModelBuilder = lab_model,
) -> list[RunRecord]:
    """Train runs that differ only in seed; packed side by side unless ``pack=False``.

    ``on_epoch(i, stats)`` is called after each epoch of run ``i``.
    """
    check_packable(configs)
    if not pack or len(configs) == 1:
        return [
            train_run(
                c,
                split=split,
                on_epoch=None if on_epoch is None else partial(on_epoch, i),
                task=task,
                build=build,
            )
            for i, c in enumerate(configs)
        ]
    start = time.perf_counter()
    base = configs[0]
    if split is None:
        split = load_task_split(base.task, base.data, base.image_size, base.max_train)
    configs = [on_data(c, split) for c in configs]
    _, results = train_packed(configs, split, on_epoch, task=task, build=build)
    share = (time.perf_counter() - start) / len(configs)
    return [
        _record(c, split, history, diverged, share, len(configs), _conversion(build, c))
        for c, (history, diverged) in zip(configs, results, strict=True)
    ]
