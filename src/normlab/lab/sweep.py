"""The sweep: norms × batch sizes × seeds, run in parallel processes, stored as they end.

Each run is independent, so the sweep scales by processes: ``workers`` spawned worker
processes (one torch thread each; on a 2-core CPU two single-thread processes double
the throughput of one), or ``workers=1`` to run in this process. The parent process is
the only writer of the store and commits each run the moment it arrives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the ranks share out the
pending runs and send each finished run to rank 0, which alone writes the store: no
shared file system is needed (:mod:`normlab.lab.ranks`). With ``per_rank_batch=True``
the ranks instead train every run *together*, data-parallel
(:func:`normlab.lab.train.train_model`): a batch size in the grid is the per-rank batch,
so plain BN sees ``b`` images per statistic while ``bn+sync`` sees the global ``K·b``.

``model`` sweeps the user's own network instead of the lab's ResNet
(:mod:`normlab.lab.user_runs`): every norm's model is built once as a check before the
store is created or anything trains, and each run trains one model (unpacked).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..registry import NORM_LAYERS
from .data import Split, check_batch_size
from .data_parallel import run_data_parallel
from .defaults import DEFAULT_BATCH_SIZES
from .devices import check_device
from .loop import ModelBuilder, lab_model
from .models import resolve_norm
from .ranks import RankFailedError, merge_shards, run_sharded
from .runner import Progress, SweepInterrupted, execute_runs, sigint_guard
from .seg_task import load_task_split, segmentation_model
from .store import RunStore
from .task_defaults import CLASSIFICATION_TASK, SEGMENTATION_TASK, TASKS
from .train import RunConfig, RunRecord
from .user_factory import UserFactory, load_factory

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "RankFailedError",
    "SweepConfig",
    "SweepInterrupted",
    "SweepResult",
    "default_norms",
    "expand_norms",
    "merge_shards",
    "plan_runs",
    "run_sweep",
]

#: The small-batch family, in the order they appear in the report when present.
SMALL_BATCH_FAMILY = ("frn", "sn", "mabn", "brn")


def default_norms(per_rank_batch: bool = False) -> list[str]:
    """BN, GN and the small-batch family the registry has (FRN, SN, MABN, BRN).

    The whole default grid (6 norms × 5 batch sizes × 3 seeds) fits the 10-minute budget
    on a 2-core CPU because each cell's seeds train packed in one model
    (:mod:`normlab.lab.packed`) and the stem conv has stride 2 (see the README's protocol).
    With ``per_rank_batch``: BN with per-rank statistics, BN synced over the ranks, GN.
    """
    if per_rank_batch:
        return ["bn", "bn+sync", "gn"]
    return expand_norms(["all"])


def expand_norms(names: Sequence[str]) -> list[str]:
    """Expand ``"all"`` into BN, GN and the small-batch family the registry has."""
    out: list[str] = []
    for name in names:
        group = ["bn", "gn", *(n for n in SMALL_BATCH_FAMILY if n in NORM_LAYERS)]
        for n in group if name == "all" else [name]:
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
    #: (:mod:`normlab.lab.packed`): same runs up to float rounding, a fraction of the time.
    pack: bool = True
    #: Optimizer steps of every run instead of fixed epochs (see :class:`RunConfig`).
    steps: int | None = RunConfig.steps
    #: The user's network: a factory spec (``"path/to/file.py:build"``,
    #: ``"package.module:build"``), loaded here, or a loaded factory; None: the lab's
    #: ResNet. Its runs train unpacked whatever ``pack`` says.
    model: str | UserFactory | None = None
    #: What every run learns (:data:`normlab.lab.task_defaults.TASKS`). Segmentation runs
    #: train the lab's U-Net (or the user's model) with ``widths`` as its levels' channels,
    #: unpacked, on the built-in scenes or a ``data`` folder of ``images/`` and ``masks/``;
    #: the CLI's defaults for it are :data:`~normlab.lab.task_defaults.SEGMENTATION_DEFAULTS`.
    task: str = CLASSIFICATION_TASK

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if not self.norms:
            raise ValueError("norms is empty; name at least one norm (e.g. bn, gn)")
        for n in self.norms:
            resolve_norm(n)
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

    @property
    def factory(self) -> UserFactory | None:
        """The loaded user factory, or None for the lab's ResNet."""
        return self.model if isinstance(self.model, UserFactory) else None

    def runs(self) -> list[RunConfig]:
        return plan_runs(self)


def plan_runs(config: SweepConfig, ranks: int = 1) -> list[RunConfig]:
    """Every run of the grid, most expensive (smallest batch) first, for load balance.

    ``ranks`` > 1 plans data-parallel runs over that many ranks (per-rank batch sizes).
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


def run_sweep(
    config: SweepConfig,
    db: str | Path,
    *,
    workers: int = 2,
    progress: bool = True,
    on_record: Callable[[RunRecord], None] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    allow_mixed_protocols: bool = False,
) -> SweepResult:
    """Run every planned run not yet in ``db``; store each one as it finishes.

    The data is loaded and checked, and the store's protocol compared with this one,
    before the store is created or anything trains.

    Args:
        config: the grid and protocol.
        db: path of the SQLite run store (created if missing).
        workers: worker processes (``1``: run in this process).
        progress: show a tqdm bar with ETA on stderr.
        on_record: called after each run is committed to the store.
        rank, world_size: this process's rank under torchrun; default from ``RANK`` /
            ``WORLD_SIZE``. With ``world_size`` > 1 every rank calls this (see
            :mod:`normlab.lab.ranks`); rank 0 alone writes ``db``.
        allow_mixed_protocols: store runs into a ``db`` that holds runs of another
            protocol (the report keeps them in separate rows).

    Returns:
        the stored records of the whole grid (finished earlier or now) on rank 0; on
        other ranks, the runs that rank trained.

    Raises:
        DataError: the data cannot be loaded or is too small for the batch sizes.
        ProtocolMismatchError: ``db`` holds runs of another protocol.
        SweepInterrupted: Ctrl-C; finished runs are stored (:mod:`normlab.lab.runner`).
        RankFailedError: under torchrun, another rank failed; the sweep stopped.
        ModelFactoryError: ``config.model`` cannot be built, converted by a norm of the
            grid, or does not fit the task (checked before the store is touched).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    db = Path(db)
    if world_size > 1 and config.factory is not None:
        raise ValueError(
            "--model under torchrun is not supported yet; run the sweep of a user model "
            "in one process (with --workers)"
        )
    if world_size > 1:
        common = dict(
            progress=progress,
            on_record=on_record,
            rank=rank,
            world_size=world_size,
            allow_mixed_protocols=allow_mixed_protocols,
        )
        if config.per_rank_batch:
            return run_data_parallel(config, db, **common)
        return run_sharded(config, db, workers=workers, **common)
    split = load_task_split(config.task, config.data, config.image_size, config.max_train)
    check_batch_size(split, max(config.batch_sizes))
    start = time.perf_counter()
    planned = plan_runs(config)
    build = _builder(config, planned, split)
    with sigint_guard(), RunStore(db, allow_mixed_protocols=allow_mixed_protocols) as store:
        store.check_protocol(planned[0])  # every planned run shares one protocol
        done = store.keys()
        pending = [r for r in planned if r.key() not in done]
        bar = Progress(sum(r.epochs for r in pending), len(pending), progress)
        try:
            new = execute_runs(pending, store, workers, bar, on_record, config.pack, build)
        finally:
            bar.close()
    keys = {r.key() for r in planned}
    with RunStore(db) as store:
        records = [r for r in store.records() if r.key in keys]
    return SweepResult(records, new, len(planned) - len(pending), time.perf_counter() - start, db)


def _builder(config: SweepConfig, planned: list[RunConfig], split: Split) -> ModelBuilder:
    """The runs' model builder; a user model's, or the U-Net, is checked on every norm first."""
    if config.factory is None:
        if config.task == SEGMENTATION_TASK:
            for norm in dict.fromkeys(c.norm for c in planned):  # a 1-D norm fails here
                segmentation_model(next(c for c in planned if c.norm == norm), split)
        return lab_model  # the loop's default: the run's own task's model
    from .user_runs import UserModelBuilder

    build = UserModelBuilder(config.factory, config.task)
    build.check(planned, split)
    return build
