"""Sweeps under torchrun with ``per_rank_batch``: every rank trains every run together.

Each run is data-parallel over the ranks (:func:`normlab.lab.run.train.train_model`): a batch
size in the grid is the per-rank batch, so plain BN sees ``b`` images per statistic while
``bn+sync`` sees the global ``K·b``. Rank 0 reads the store, decides what is pending and
broadcasts it; it alone writes the store, so no file is shared between the ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.images import check_batch_size, load_split
from ..run.train import RunConfig, RunRecord, train_run
from .ranks import device_for_rank
from .runner import Progress
from .store import ProtocolMismatchError, RunStore

if TYPE_CHECKING:
    from .config import SweepConfig, SweepResult

__all__ = ["run_data_parallel"]


def run_data_parallel(
    config: SweepConfig,
    db: Path,
    *,
    progress: bool,
    on_record: Callable[[RunRecord], None] | None,
    rank: int,
    world_size: int,
    allow_mixed_protocols: bool,
) -> SweepResult:
    """Every rank trains every pending run together; rank 0 stores them."""
    import torch.distributed as dist

    from .config import SweepResult, plan_runs

    split = load_split(config.data, config.image_size, config.max_train)
    check_batch_size(split, max(config.batch_sizes) * world_size)
    start = time.perf_counter()
    device = device_for_rank(config.device)
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
            for r in plan_runs(config, ranks=world_size, data_hash=split.data_hash)
        ]
        # Rank 0 owns the store and decides what is pending (or refuses the protocol,
        # for every rank); the others follow.
        pending_idx: list[Any] = [None]
        if rank == 0:
            with RunStore(db, allow_mixed_protocols=allow_mixed_protocols) as store:
                try:
                    store.check_protocol(planned[0])
                except ProtocolMismatchError as e:
                    pending_idx = [str(e)]
                else:
                    done = store.keys()
                    pending_idx = [[i for i, r in enumerate(planned) if r.key() not in done]]
        dist.broadcast_object_list(pending_idx, src=0)
        if isinstance(pending_idx[0], str):
            raise ProtocolMismatchError(pending_idx[0])
        pending = [planned[i] for i in pending_idx[0]]
        bar = Progress(sum(r.epochs for r in pending), len(pending), progress and rank == 0)
        ran: list[RunRecord] = []
        store = RunStore(db, allow_mixed_protocols=allow_mixed_protocols) if rank == 0 else None
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
        with RunStore(db, readonly=True) as store:
            records = [r for r in store.records() if r.key in keys]
    return SweepResult(
        records, len(pending), len(planned) - len(pending), time.perf_counter() - start, db
    )
