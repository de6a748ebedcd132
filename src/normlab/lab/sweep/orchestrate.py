"""The sweep: norms × batch sizes × seeds, run in parallel processes, stored as they end.

Each run is independent, so the sweep scales by processes: ``workers`` spawned worker
processes (one torch thread each; on a 2-core CPU two single-thread processes double
the throughput of one), or ``workers=1`` to run in this process. The parent process is
the only writer of the store and commits each run the moment it arrives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the ranks share out the
pending runs and send each finished run to rank 0, which alone writes the store: no
shared file system is needed (:mod:`normlab.lab.sweep.ranks`). With ``per_rank_batch=True``
the ranks instead train every run *together*, data-parallel
(:func:`normlab.lab.run.train.train_model`): a batch size in the grid is the per-rank batch,
so plain BN sees ``b`` images per statistic while ``bn+sync`` sees the global ``K·b``.

``model`` sweeps the user's own network instead of the lab's ResNet
(:mod:`normlab.lab.run.user_builder`): every norm's model is built once as a check before the
store is created or anything trains, and each run trains one model (unpacked).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..data.images import check_batch_size
from ..defaults import DEFAULT_BATCH_SIZES
from ..run.train import RunRecord
from ..tasks.segmentation import load_task_split
from .config import (
    SweepConfig,
    SweepResult,
    default_norms,
    expand_norms,
    model_builder,
    plan_runs,
)
from .data_parallel import run_data_parallel
from .ranks import RankFailedError, merge_shards, run_sharded
from .runner import Progress, SweepInterrupted, execute_runs, sigint_guard
from .store import RunStore

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
            :mod:`normlab.lab.sweep.ranks`); rank 0 alone writes ``db``.
        allow_mixed_protocols: store runs into a ``db`` that holds runs of another
            protocol (the report keeps them in separate rows).

    Returns:
        the stored records of the whole grid (finished earlier or now) on rank 0; on
        other ranks, the runs that rank trained.

    Raises:
        DataError: the data cannot be loaded or is too small for the batch sizes.
        ProtocolMismatchError: ``db`` holds runs of another protocol.
        SweepInterrupted: Ctrl-C; finished runs are stored (:mod:`normlab.lab.sweep.runner`).
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
    planned = plan_runs(config, data_hash=split.data_hash)
    build = model_builder(config, planned, split)
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
    with RunStore(db, readonly=True) as store:
        records = [r for r in store.records() if r.key in keys]
    return SweepResult(records, new, len(planned) - len(pending), time.perf_counter() - start, db)
