"""Sweeps under torchrun: whole runs sharded over the ranks, every run stored by rank 0.

Sharded (the default): rank 0 opens the store ``DB``, decides which runs are pending and
sends their keys to every rank. The pending runs, grouped into the jobs the runner trains
together (a cell's seeds when packing), go round-robin to the ranks, most expensive first.
Each rank sends every run to rank 0 the moment it finishes (:mod:`normlab.lab.sweep.links`) and
rank 0 commits it at once: rank 0 alone writes ``DB``, the other ranks write no file, so
the machines share no file system. Rerunning the same command resumes: rank 0 finds the
stored runs and only the rest is shared out.

If a rank fails (it raises, its process dies, or it is silent for ``NORMLAB_RANK_TIMEOUT``
seconds), every rank stops: the failing rank raises its own error, the others a
:class:`RankFailedError` that names it. The runs stored before stay in ``DB``.

:func:`merge_shards` merges per-rank shard stores ``DB.rank<r>`` that earlier versions
of the sharded sweep wrote.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.images import check_batch_size
from ..run.loop import ModelBuilder
from ..run.train import RunConfig, RunRecord
from ..tasks.segmentation import load_task_split
from .links import Channel, Kind, RankFailedError, gist, open_group, rank_timeout
from .runner import Progress, execute_runs, run_groups, sigint_guard
from .store import RunStore

if TYPE_CHECKING:
    from .config import SweepConfig, SweepResult

__all__ = ["RankFailedError", "device_for_rank", "merge_shards", "run_sharded"]


def device_for_rank(device: str) -> str:
    """``cuda`` becomes this process's GPU under torchrun (``cuda:LOCAL_RANK``)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(e).__name__}: {e}"[:2000]


class _Session:
    """This rank's channels, the messages that arrived on them, and the first failure.

    On rank 0 a collector thread with its own connection to the store commits the runs
    that the other ranks send, in the order they arrive.
    """

    def __init__(self, rank: int, world_size: int, db: Path) -> None:
        self.rank, self.world_size, self.db = rank, world_size, db
        timeout = rank_timeout()
        self._group, self._store = open_group(rank, world_size, timeout)
        self.failure: str | None = None
        self.inbox: queue.Queue[tuple[int, Kind, str] | None] = queue.Queue()
        self.all_done = threading.Event()
        self.received = 0
        self.lost: set[int] = set()  # peers whose connection failed: nothing more to send
        self._collector: threading.Thread | None = None
        self._lock = threading.Lock()
        self._training = False
        peers = range(1, world_size) if rank == 0 else [0]
        self.channels = {p: Channel(self._group, p, timeout, self._deliver) for p in peers}

    def _deliver(self, peer: int, kind: Kind, body: str) -> None:
        if kind is Kind.ERROR:
            self.fail(f"rank {peer} failed: {body}" if self.rank == 0 else body)
        elif kind is Kind.LOST:
            self.lost.add(peer)
            self.fail(f"rank {peer} of {self.world_size} {body}")
        else:
            self.inbox.put((peer, kind, body))

    def fail(self, reason: str) -> None:
        """Record the first failure; interrupt this rank's training if it is under way."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
            if self._training:
                _thread.interrupt_main()  # a KeyboardInterrupt in the main thread

    def check(self) -> None:
        if self.failure is not None:
            raise RankFailedError(self.failure)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Within the block another rank's failure interrupts this rank's runs."""
        with self._lock:
            self._training = True
        try:
            self.check()
            yield
        finally:
            with self._lock:
                self._training = False

    def send(self, peer: int, kind: Kind, body: str = "") -> None:
        """Send a message; if ``peer`` is gone, that is the sweep's failure."""
        try:
            self.channels[peer].send(kind, body)
        except RuntimeError as e:
            self.lost.add(peer)
            self.fail(f"rank {peer} of {self.world_size} could not be reached ({gist(e)})")
        self.check()

    def receive(self, kind: Kind) -> str:
        """The body of the next message from rank 0, which must be of ``kind``."""
        while True:
            self.check()
            try:
                item = self.inbox.get(timeout=0.25)
            except queue.Empty:
                continue
            if item is None or item[1] is not kind:
                raise RuntimeError(f"rank {self.rank} expected {kind.name}, got {item}")
            return item[2]

    def wait_until_all_done(self) -> None:
        while not self.all_done.wait(0.25):
            self.check()

    def start_collector(self, allow_mixed_protocols: bool) -> None:
        self._collector = threading.Thread(
            target=self._collect, args=(allow_mixed_protocols,), daemon=True
        )
        self._collector.start()

    def _collect(self, allow_mixed_protocols: bool) -> None:
        done: set[int] = set()
        try:
            with RunStore(self.db, allow_mixed_protocols=allow_mixed_protocols) as store:
                while (item := self.inbox.get()) is not None:
                    peer, kind, body = item
                    if kind is Kind.RECORD:
                        self.received += store.add(RunRecord.from_dict(json.loads(body)))
                    elif kind is Kind.DONE:
                        done.add(peer)
                        if len(done) == self.world_size - 1:
                            self.all_done.set()
        except Exception as e:
            self.fail(f"rank 0 could not store a run sent to it: {_describe(e)}")

    def stop(self, kind: Kind, body: str = "") -> None:
        """Send each peer this side's final message (unless sent), wait for theirs,
        then let the collector commit what arrived."""
        for peer, channel in self.channels.items():
            if peer not in self.lost:
                with contextlib.suppress(RuntimeError):  # that peer is gone
                    channel.send(kind, body)
        for channel in self.channels.values():
            channel.close()
        if self._collector is not None:
            self.inbox.put(None)
            self._collector.join()
            self._collector = None


class _Outbox:
    """The run store of ranks other than 0: ``add`` sends the run to rank 0."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.sent: list[RunRecord] = []

    def add(self, record: RunRecord) -> bool:
        self.session.send(0, Kind.RECORD, json.dumps(record.to_dict()))
        self.sent.append(record)
        return True


def _share(
    pending: list[RunConfig], rank: int, world_size: int, config: SweepConfig
) -> list[RunConfig]:
    """This rank's runs of ``pending``: every ``world_size``-th job, on this rank's device."""
    device = device_for_rank(config.device)
    jobs = run_groups(pending, config.pack)
    return [
        RunConfig.from_dict({**pending[i].to_dict(), "device": device})
        for j, job in enumerate(jobs)
        if j % world_size == rank
        for i in job
    ]


def _train(
    session: _Session,
    runs: list[RunConfig],
    store: Any,
    workers: int,
    progress: bool,
    on_record: Callable[[RunRecord], None] | None,
    pack: bool,
    build: ModelBuilder,
) -> int:
    bar = Progress(sum(r.epochs for r in runs), len(runs), progress)
    try:
        with sigint_guard(), session.training():
            return execute_runs(runs, store, workers, bar, on_record, pack, build)
    finally:
        bar.close()


def run_sharded(
    config: SweepConfig,
    db: Path,
    *,
    workers: int,
    progress: bool,
    on_record: Callable[[RunRecord], None] | None,
    rank: int,
    world_size: int,
    allow_mixed_protocols: bool,
) -> SweepResult:
    """This rank's part of a sharded sweep (see the module docstring).

    Returns:
        on rank 0 every stored run of the grid, with ``new_runs`` counting the runs every
        rank stored in this call; on other ranks the runs this rank trained.

    Raises:
        RankFailedError: another rank failed or was lost; the sweep stopped.
    """
    from .config import SweepResult, model_builder, plan_runs

    start = time.perf_counter()
    session = _Session(rank, world_size, db)
    try:
        split = load_task_split(config.task, config.data, config.image_size, config.max_train)
        check_batch_size(split, max(config.batch_sizes))
        planned = plan_runs(config, data_hash=split.data_hash)
        build = model_builder(config, planned, split)
        if rank == 0:
            with RunStore(db, allow_mixed_protocols=allow_mixed_protocols) as store:
                store.check_protocol(planned[0])  # every planned run shares one protocol
                done = store.keys()
                pending = [r for r in planned if r.key() not in done]
                session.start_collector(allow_mixed_protocols)
                for peer in session.channels:
                    session.send(peer, Kind.PLAN, json.dumps([r.key() for r in pending]))
                mine = _share(pending, 0, world_size, config)
                new = _train(session, mine, store, workers, progress, on_record, config.pack, build)
            session.wait_until_all_done()
        else:
            keys = json.loads(session.receive(Kind.PLAN))
            by_key = {r.key(): r for r in planned}
            if any(k not in by_key for k in keys):
                raise ValueError(
                    f"rank {rank} plans other runs than rank 0 (another grid or protocol); "
                    "run the same command, with the same arguments, on every machine"
                )
            pending = [by_key[k] for k in keys]
            outbox = _Outbox(session)
            mine = _share(pending, rank, world_size, config)
            new = _train(session, mine, outbox, workers, progress, on_record, config.pack, build)
            session.send(0, Kind.DONE)
            session.receive(Kind.FINISHED)
        session.stop(Kind.FINISHED)
    except BaseException as e:
        raise _stopped(session, e) from None
    wall = time.perf_counter() - start
    skipped = len(planned) - len(pending)
    if rank != 0:
        return SweepResult(outbox.sent, new, skipped, wall, db)
    keys = {r.key() for r in planned}
    with RunStore(db, readonly=True) as store:
        records = [r for r in store.records() if r.key in keys]
    return SweepResult(records, new + session.received, skipped, wall, db)


def _stopped(session: _Session, e: BaseException) -> BaseException:
    """End the sweep on every rank after ``e``; the error this rank raises."""
    own = session.failure is None  # this rank failed first
    if own:
        session.fail(f"rank {session.rank} failed: {_describe(e)}")
    reason = session.failure or ""
    session.stop(Kind.ERROR, reason if session.rank == 0 else _describe(e))
    if own:
        return e
    where = (
        f"the runs finished so far are stored in {session.db}"
        if session.rank == 0
        else f"the runs that reached rank 0 are stored in its {session.db}"
    )
    return RankFailedError(
        f"{reason}. The sweep stopped on every rank; {where}. Fix the cause and rerun the "
        "same command (on every machine) to resume: stored runs are skipped"
    )


# -- shard stores of earlier versions ---------------------------------------------------------


def _shard_path(db: Path, rank: int) -> Path:
    return db.with_name(f"{db.name}.rank{rank}")


def merge_shards(db: str | Path, world_size: int, *, allow_mixed_protocols: bool = False) -> int:
    """Merge the shard stores ``DB.rank0 … DB.rank<world_size-1>`` that exist into ``DB``.

    Earlier versions of the sharded sweep left one such store per rank; the sweep now
    sends every run to rank 0 instead and writes no shards. Returns how many runs were new.
    """
    db = Path(db)
    added = 0
    with RunStore(db, allow_mixed_protocols=allow_mixed_protocols) as store:
        for r in range(world_size):
            shard = _shard_path(db, r)
            if shard.exists():
                added += store.merge_from(shard)
    return added
