"""What a sweep is: its grid and protocol (:class:`SweepConfig`), the runs it plans
(:func:`plan_runs`) and what running it returned (:class:`SweepResult`).

Kept apart from :mod:`normlab.lab.sweep.orchestrate`, which runs the plan, so that the ways of
running it (in worker processes, sharded over torchrun ranks, data-parallel) all build
on the same plan without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...registry import NORM_LAYERS
from ..data.images import Split
from ..defaults import (
    CLASSIFICATION_TASK,
    DEFAULT_BATCH_SIZES,
    DETECTION_TASK,
    SEGMENTATION_TASK,
    TASKS,
)
from ..models.resnet import canonical_norm
from ..models.user_factory import UserFactory, load_factory
from ..run.loop import ModelBuilder, lab_model
from ..run.pretrain import DetectionBuilder, spec
from ..run.train import RunConfig, RunRecord
from ..tasks.segmentation import segmentation_model
from .devices import check_device

__all__ = [
    "SMALL_BATCH_FAMILY",
    "SweepConfig",
    "SweepResult",
    "default_norms",
    "expand_norms",
    "model_builder",
    "plan_runs",
]


#: The small-batch family, in the order they appear in the report when present.
SMALL_BATCH_FAMILY = ("frn", "sn", "mabn", "brn", "cbn")


def default_norms(per_rank_batch: bool = False) -> list[str]:
    """BN, GN and the small-batch family the registry has (FRN, SN, MABN, BRN, CBN).

    The whole default grid (7 norms × 5 batch sizes × 3 seeds) fits the 10-minute budget
    on a 2-core CPU because each cell's seeds train packed in one model
    (:mod:`normlab.lab.run.packed`) and the stem conv has stride 2 (see the README's protocol).
    With ``per_rank_batch``: BN with per-rank statistics, BN synced over the ranks, GN.
    """
    if per_rank_batch:
        return ["bn", "bn+sync", "gn"]
    return expand_norms(["all"])


def expand_norms(names: Sequence[str]) -> list[str]:
    """Expand ``"all"`` into BN, GN and the small-batch family the registry has; every
    name in its one spelling (:func:`~normlab.lab.models.resnet.canonical_norm`), once."""
    out: list[str] = []
    for name in names:
        group = ["bn", "gn", *(n for n in SMALL_BATCH_FAMILY if n in NORM_LAYERS)]
        for n in group if name.strip().lower() == "all" else [canonical_norm(name)]:
            if n not in out:
                out.append(n)
    return out


@dataclass(frozen=True)
class SweepConfig:
    """The grid and the protocol shared by every run (see :class:`RunConfig`)."""

    norms: Sequence[str] = field(default_factory=default_norms)
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = RunConfig.epochs
    base_lr: float = RunConfig.base_lr
    data: str | None = None
    image_size: int = RunConfig.image_size
    max_train: int | None = RunConfig.max_train
    widths: tuple[int, ...] = RunConfig.widths
    blocks: int = RunConfig.blocks
    stem_stride: int = RunConfig.stem_stride
    device: str = "cpu"
    per_rank_batch: bool = False
    #: Train the seeds of each (norm, batch size) cell side by side in one packed model
    #: (:mod:`normlab.lab.run.packed`): same runs up to float rounding, a fraction of the time.
    pack: bool = True
    #: Optimizer steps of every run instead of fixed epochs (see :class:`RunConfig`).
    steps: int | None = RunConfig.steps
    #: The user's network: a factory spec (``"path/to/file.py:build"``,
    #: ``"package.module:build"``), loaded here, or a loaded factory; None: the lab's
    #: ResNet. Its runs train unpacked whatever ``pack`` says.
    model: str | UserFactory | None = None
    #: What every run learns (:data:`normlab.lab.defaults.TASKS`). Segmentation runs
    #: train the lab's U-Net (or the user's model) with ``widths`` as its levels' channels,
    #: unpacked, on the built-in scenes or a ``data`` folder of ``images/`` and ``masks/``;
    #: the CLI's defaults for it are :data:`~normlab.lab.defaults.SEGMENTATION_DEFAULTS`.
    task: str = CLASSIFICATION_TASK
    #: Detection: the pretraining protocol of every run's backbone
    #: (:data:`normlab.lab.run.pretrain.DEFAULT_PRETRAIN`, the CLI's default), or None to
    #: train from scratch (``--no-pretrain``).
    pretrain: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if not self.norms:
            raise ValueError("norms is empty; name at least one norm (e.g. bn, gn)")
        # One spelling per method before any key is made (BN and bn are one norm).
        object.__setattr__(self, "norms", list(dict.fromkeys(map(canonical_norm, self.norms))))
        if not self.batch_sizes:
            raise ValueError("batch_sizes is empty; name at least one (e.g. 2, 32)")
        for b in self.batch_sizes:
            if int(b) < 2:
                raise ValueError(
                    f"batch size {b} is invalid: batch statistics need >= 2 samples per batch"
                )
        if not self.seeds:
            raise ValueError("seeds is empty; use at least one seed (>= 3 for error bars)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds contain duplicates: {list(self.seeds)}")
        check_device(self.device)
        if isinstance(self.model, str):
            object.__setattr__(self, "model", load_factory(self.model))
        if self.model is not None:
            if self.per_rank_batch:
                raise ValueError(
                    "--model with --per-rank-batch: data-parallel training of a user model "
                    "is not supported; sweep it without --per-rank-batch, in one process "
                    "(--workers N trains N runs at a time)"
                )
            object.__setattr__(self, "pack", False)  # one user model per run
        if self.task == SEGMENTATION_TASK:
            if self.per_rank_batch:
                raise ValueError(
                    "--task segmentation with --per-rank-batch is not supported; sweep "
                    "segmentation without --per-rank-batch (--workers N trains N runs at a time)"
                )
            object.__setattr__(self, "pack", False)  # one U-Net per run
        if self.task == DETECTION_TASK:
            object.__setattr__(self, "pack", False)  # one detector per run
            if self.model is not None:  # the user's factory loads its own pretrained weights
                object.__setattr__(self, "pretrain", None)
            if self.pretrain is not None:
                spec(self.pretrain)
        elif self.pretrain is not None:
            raise ValueError("pretraining is part of --task detection only; drop it")

    @property
    def factory(self) -> UserFactory | None:
        """The loaded user factory, or None for the lab's ResNet."""
        return self.model if isinstance(self.model, UserFactory) else None

    def runs(self) -> list[RunConfig]:
        return plan_runs(self)


def plan_runs(config: SweepConfig, ranks: int = 1, data_hash: str | None = None) -> list[RunConfig]:
    """Every run of the grid, most expensive (smallest batch) first, for load balance.

    ``ranks`` > 1 plans data-parallel runs over that many ranks (per-rank batch sizes).
    ``data_hash``: the prepared split's (:attr:`normlab.lab.data.images.Split.data_hash`), so
    that the store compares it with its runs' before anything trains.
    """
    factory = config.factory
    runs = [
        RunConfig(
            norm=n,
            batch_size=int(b),
            seed=int(s),
            epochs=config.epochs,
            steps=config.steps,
            base_lr=config.base_lr,
            data=config.data,
            image_size=config.image_size,
            max_train=config.max_train,
            widths=tuple(config.widths),
            blocks=config.blocks,
            stem_stride=config.stem_stride,
            ranks=ranks,
            device=config.device,
            model=None if factory is None else factory.name,
            model_hash=None if factory is None else factory.source_hash,
            task=config.task,
            data_hash=data_hash,
            pretrain=config.pretrain,
        )
        for b in sorted(config.batch_sizes)
        for s in config.seeds
        for n in config.norms
    ]
    return runs


@dataclass
class SweepResult:
    """Stored runs of the planned grid, and what this call did."""

    records: list[RunRecord]
    new_runs: int
    skipped_runs: int
    wall_time: float
    db: Path


def model_builder(config: SweepConfig, planned: list[RunConfig], split: Split) -> ModelBuilder:
    """The runs' model builder; a user model's, or the U-Net, is built once per norm first,
    so that a model that does not fit fails before the store is touched or anything trains."""
    if config.factory is None:
        if config.task == SEGMENTATION_TASK:
            for norm in dict.fromkeys(c.norm for c in planned):  # a 1-D norm fails here
                segmentation_model(next(c for c in planned if c.norm == norm), split)
        if config.task == DETECTION_TASK:
            build = DetectionBuilder()
            build.check(planned, split)  # refusals and pretraining come here
            return build
        return lab_model  # the loop's default: the run's own task's model
    from ..run.user_builder import UserModelBuilder
    from ..run.user_detection import UserDetectionBuilder

    build: UserModelBuilder = (
        UserDetectionBuilder(config.factory)
        if config.task == DETECTION_TASK
        else UserModelBuilder(config.factory, config.task)
    )
    build.check(planned, split)
    return build
