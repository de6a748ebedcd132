"""The sweep: norms × batch sizes × seeds, run in parallel processes, stored as they end.

Each run is independent, so the sweep scales by processes: ``workers`` spawned worker
processes (one torch thread each; on a 2-core CPU two single-thread processes double
the throughput of one), or ``workers=1`` to run in this process. The parent process is
the only writer of the store and commits each run the moment it arrives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) rank r takes the runs whose
index i in the plan has ``i % world_size == r`` and stores them in its own shard
``DB.rank<r>``; after a barrier rank 0 merges every shard into ``DB``.

With ``per_rank_batch=True`` under ``torchrun`` the ranks instead train every run
*together*, data-parallel (:func:`normlab.lab.train.train_model`): a batch size in the grid
is the per-rank batch, so plain BN sees ``b`` images per statistic while ``bn+sync``
sees the global ``K·b``; rank 0 alone writes the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..registry import NORM_LAYERS
from .models import resolve_norm
from .store import RunStore
from .train import RunConfig, RunRecord, train_run, train_runs

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "SweepConfig",
    "SweepResult",
    "default_norms",
    "expand_norms",
    "merge_shards",
    "plan_runs",
    "run_sweep",
]

DEFAULT_BATCH_SIZES = (2, 4, 8, 16, 32)
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

    def __post_init__(self) -> None:
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
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} requested but torch sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu"
            )

    def runs(self) -> list[RunConfig]:
        return plan_runs(self)


def plan_runs(config: SweepConfig, ranks: int = 1) -> list[RunConfig]:
    """Every run of the grid, most expensive (smallest batch) first, for load balance.

    ``ranks`` > 1 plans data-parallel runs over that many ranks (per-rank batch sizes).
    """
    runs = [
        RunConfig(
            norm=n,
            batch_size=int(b),
            seed=int(s),
            epochs=config.epochs,
            base_lr=config.base_lr,
            data=config.data,
            image_size=config.image_size,
            max_train=config.max_train,
            widths=tuple(config.widths),
            blocks=config.blocks,
            stem_stride=config.stem_stride,
            ranks=ranks,
            device=config.device,
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


# -- worker processes ---------------------------------------------------------------------

_PROGRESS: Any = None


def _init_worker(progress: Any) -> None:
    global _PROGRESS
    _PROGRESS = progress
    torch.set_num_threads(1)


def _run_in_worker(job: list[RunConfig], indices: list[int], pack: bool) -> list[RunRecord]:
    def on_epoch(i: int, _: Any) -> None:
        if _PROGRESS is not None:
            _PROGRESS.put(indices[i])

    return train_runs(job, on_epoch=on_epoch, pack=pack)


def _jobs(pending: list[RunConfig], pack: bool) -> list[list[int]]:
    """Indices of ``pending`` grouped into jobs: runs that differ only in seed go together
    when packing, else one run per job; plan order (smallest batch first) is kept."""
    if not pack:
        return [[i] for i in range(len(pending))]
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(pending):
        cell = {**run.to_dict(), "seed": None}
        groups.setdefault(repr(sorted(cell.items())), []).append(i)
    return list(groups.values())


def _device_for_rank(device: str) -> str:
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


class _Progress:
    """tqdm bar over epochs of pending runs, with runs done in the postfix."""

    def __init__(self, total_epochs: int, total_runs: int, enabled: bool) -> None:
        self.bar = None
        self.runs_done = 0
        self.total_runs = total_runs
        if enabled and total_runs:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_epochs, unit="epoch", desc="sweep", dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"runs {self.runs_done}/{self.total_runs}")

    def epoch(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def run_done(self) -> None:
        self.runs_done += 1
        self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sweep(
    config: SweepConfig,
    db: str | Path,
    *,
    workers: int = 2,
    progress: bool = True,
    on_record: Callable[[RunRecord], None] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> SweepResult:
    """Run every planned run not yet in ``db``; store each one as it finishes.

    Args:
        config: the grid and protocol.
        db: path of the SQLite run store (created if missing).
        workers: worker processes (``1``: run in this process).
        progress: show a tqdm bar with ETA on stderr.
        on_record: called after each run is committed to the store.
        rank, world_size: shard of this process; default from ``RANK`` / ``WORLD_SIZE``.

    Returns:
        the stored records of the whole grid (finished earlier or now) on rank 0; on
        other ranks, those of its own shard.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    db = Path(db)
    if config.per_rank_batch and world_size > 1:
        return _run_data_parallel(config, db, progress, on_record, rank, world_size)
    start = time.perf_counter()
    planned = plan_runs(config)
    mine = [r for i, r in enumerate(planned) if i % world_size == rank]
    if world_size > 1:
        device = _device_for_rank(config.device)
        mine = [RunConfig.from_dict({**r.to_dict(), "device": device}) for r in mine]
    target = db if world_size == 1 else _shard_path(db, rank)
    done: set[str] = set()
    if world_size > 1 and db.exists():
        with RunStore(db) as main_store:
            done = main_store.keys()
    with RunStore(target) as store:
        done |= store.keys()
        pending = [r for r in mine if r.key() not in done]
        bar = _Progress(sum(r.epochs for r in pending), len(pending), progress)
        try:
            new = _execute(pending, store, workers, bar, on_record, config.pack)
        finally:
            bar.close()
    skipped = len(mine) - len(pending)
    if world_size > 1:
        _barrier()
        if rank == 0:
            merge_shards(db, world_size)
            target = db
    keys = {r.key() for r in (planned if target == db else mine)}
    with RunStore(target) as store:
        records = [r for r in store.records() if r.key in keys]
    return SweepResult(records, new, skipped, time.perf_counter() - start, target)


def _execute(
    pending: list[RunConfig],
    store: RunStore,
    workers: int,
    bar: _Progress,
    on_record: Callable[[RunRecord], None] | None,
    pack: bool = True,
) -> int:
    seen = [0] * len(pending)
    ended: set[int] = set()

    def epoch_done(i: int) -> None:
        if i not in ended:  # an epoch message may arrive after its run's result
            seen[i] += 1
            bar.epoch()

    def finish(records: list[RunRecord], indices: list[int]) -> None:
        for record, i in zip(records, indices, strict=True):
            ended.add(i)
            store.add(record)  # committed now: a kill loses no finished run
            bar.epoch(record.config.epochs - seen[i])  # a diverged run ends early
            bar.run_done()
            if on_record is not None:
                on_record(record)

    jobs = _jobs(pending, pack)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            records = train_runs(
                [pending[i] for i in job],
                on_epoch=lambda j, _, job=job: epoch_done(job[j]),
                pack=pack,
            )
            finish(records, job)
        return len(pending)

    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                epoch_done(progress_q.get_nowait())
            except queue.Empty:
                return

    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(progress_q,),
    )
    try:
        futures = {
            pool.submit(_run_in_worker, [pending[i] for i in job], job, pack): job for job in jobs
        }
        remaining = set(futures)
        while remaining:
            finished, remaining = cf.wait(remaining, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            drain()
            for fut in finished:
                finish(fut.result(), futures[fut])
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        progress_q.close()
        progress_q.join_thread()
    return len(pending)


# -- torchrun: data-parallel runs (--per-rank-batch) ----------------------------------------


def _run_data_parallel(
    config: SweepConfig,
    db: Path,
    progress: bool,
    on_record: Callable[[RunRecord], None] | None,
    rank: int,
    world_size: int,
) -> SweepResult:
    """Every rank trains every pending run together; rank 0 stores them."""
    import torch.distributed as dist

    start = time.perf_counter()
    device = _device_for_rank(config.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"the process group has {dist.get_world_size()} ranks, the sweep was told {world_size}"
        )
    try:
        planned = [
            RunConfig.from_dict({**r.to_dict(), "device": device})
            for r in plan_runs(config, ranks=world_size)
        ]
        # Rank 0 owns the store and decides what is pending; the others follow.
        pending_idx: list[Any] = [None]
        if rank == 0:
            with RunStore(db) as store:
                done = store.keys()
            pending_idx = [[i for i, r in enumerate(planned) if r.key() not in done]]
        dist.broadcast_object_list(pending_idx, src=0)
        pending = [planned[i] for i in pending_idx[0]]
        bar = _Progress(sum(r.epochs for r in pending), len(pending), progress and rank == 0)
        ran: list[RunRecord] = []
        store = RunStore(db) if rank == 0 else None
        try:
            for run in pending:
                record = train_run(run, on_epoch=lambda _: bar.epoch())
                ran.append(record)
                bar.run_done()
                if store is not None:
                    store.add(record)  # committed now: a kill loses no finished run
                    if on_record is not None:
                        on_record(record)
        finally:
            bar.close()
            if store is not None:
                store.close()
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
    records = ran
    if rank == 0:
        keys = {r.key() for r in planned}
        with RunStore(db) as store:
            records = [r for r in store.records() if r.key in keys]
    return SweepResult(
        records, len(pending), len(planned) - len(pending), time.perf_counter() - start, db
    )


# -- torchrun sharding ---------------------------------------------------------------------


def _shard_path(db: Path, rank: int) -> Path:
    return db.with_name(f"{db.name}.rank{rank}")


def _barrier() -> None:
    """Wait for every rank (torch.distributed, gloo) when launched by torchrun."""
    import torch.distributed as dist

    if not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def merge_shards(db: str | Path, world_size: int) -> int:
    """Merge the shard stores ``DB.rank0 … DB.rank<world_size-1>`` that exist into ``DB``."""
    db = Path(db)
    added = 0
    with RunStore(db) as store:
        for r in range(world_size):
            shard = _shard_path(db, r)
            if shard.exists():
                added += store.merge_from(shard)
    return added
