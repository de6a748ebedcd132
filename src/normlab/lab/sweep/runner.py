"""Running a sweep's pending runs, in this process or in spawned worker processes.

Every run trains on one torch thread, in a worker or in this process alike: on a
shared 2-core CPU, intra-op threads of a small model mostly wait on each other, and one
thread per run is what lets two workers double the throughput. This process's thread
count is restored when the runs end.

Ctrl-C: the first SIGINT stops the sweep at once. Worker processes are terminated, the
runs they were training are dropped (a half-trained run is never stored) and
:class:`SweepInterrupted` lists them; every run that finished earlier is already
committed to the store. Further SIGINTs while stopping are ignored, so the stop itself
is never interrupted. Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole
process group; the parent alone decides): they are started with SIGINT ignored, which
a spawned interpreter inherits, so a Ctrl-C while they start cannot print their
tracebacks either.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..data.prepare import one_thread
from ..run.loop import ModelBuilder, lab_model
from ..run.train import RunConfig, RunRecord, train_runs
from .store import RunStore

__all__ = ["SweepInterrupted", "execute_runs", "sigint_guard"]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the sweep; finished runs are stored, these were not."""

    def __init__(self, stored: int, dropped: list[RunConfig], not_started: int) -> None:
        super().__init__(
            f"interrupted: {stored} run(s) stored, {len(dropped)} in flight dropped, "
            f"{not_started} not started"
        )
        #: Runs finished and committed during this call.
        self.stored = stored
        #: Runs that were training when the sweep stopped; not stored.
        self.dropped = dropped
        #: Pending runs that never started.
        self.not_started = not_started


class _SigintGuard:
    """The first SIGINT raises KeyboardInterrupt (after a shielded section, if inside
    one); later ones are ignored."""

    def __init__(self) -> None:
        self.hits = 0
        self.shielded = False
        self.pending = False

    def handle(self, signum: int, frame: Any) -> None:
        self.hits += 1
        if self.hits > 1:
            return
        if self.shielded:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Defer the interrupt to the end of this block (e.g. a store commit)."""
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


_GUARD: _SigintGuard | None = None


@contextlib.contextmanager
def sigint_guard() -> Iterator[None]:
    """Within the block SIGINT behaves as described in the module docstring.

    A no-op outside the main thread or where a SIGINT handler other than Python's
    default is installed (the caller handles interrupts its own way).
    """
    global _GUARD
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    guard = _SigintGuard()
    previous = signal.signal(signal.SIGINT, guard.handle)
    _GUARD = guard
    try:
        yield
    finally:
        _GUARD = None
        signal.signal(signal.SIGINT, previous)


def _shield() -> contextlib.AbstractContextManager[None]:
    return _GUARD.shield() if _GUARD is not None else contextlib.nullcontext()


class Progress:
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


# -- worker processes ---------------------------------------------------------------------

_PROGRESS: Any = None


def _init_worker(progress: Any) -> None:
    global _PROGRESS
    _PROGRESS = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _run_in_worker(
    job: list[RunConfig], indices: list[int], pack: bool, build: ModelBuilder
) -> list[RunRecord]:
    if _PROGRESS is not None:
        _PROGRESS.put(("start", indices))

    def on_epoch(i: int, _: Any) -> None:
        if _PROGRESS is not None:
            _PROGRESS.put(("epoch", indices[i]))

    return train_runs(job, on_epoch=on_epoch, pack=pack, build=build)


def run_groups(pending: list[RunConfig], pack: bool) -> list[list[int]]:
    """Indices of ``pending`` grouped into jobs: runs that differ only in seed go together
    when packing, else one run per job; plan order (smallest batch first) is kept."""
    if not pack:
        return [[i] for i in range(len(pending))]
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(pending):
        cell = {**run.to_dict(), "seed": None}
        groups.setdefault(repr(sorted(cell.items())), []).append(i)
    return list(groups.values())


def _stop_workers(pool: cf.ProcessPoolExecutor) -> None:
    """Terminate the workers now: their runs are dropped, nothing queued starts.

    Python < 3.14 has no public way to stop running workers, hence ``_processes``.
    """
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)


def execute_runs(
    pending: list[RunConfig],
    store: RunStore,
    workers: int,
    bar: Progress,
    on_record: Callable[[RunRecord], None] | None,
    pack: bool = True,
    build: ModelBuilder = lab_model,
) -> int:
    """Train ``pending`` and store each run as it finishes; returns how many ran.

    ``build`` makes each run's network; it is pickled into the worker processes (a
    function by reference, a user model's builder by its factory's spec).

    Raises:
        SweepInterrupted: on Ctrl-C (see the module docstring).
    """
    seen = [0] * len(pending)
    ended: set[int] = set()
    started: set[int] = set()

    def epoch_done(i: int) -> None:
        if i not in ended:  # an epoch message may arrive after its run's result
            seen[i] += 1
            bar.epoch()

    def finish(records: list[RunRecord], indices: list[int]) -> None:
        for record, i in zip(records, indices, strict=True):
            with _shield():
                store.add(record)  # committed now: a kill loses no finished run
                ended.add(i)
            bar.epoch(record.config.epochs - seen[i])  # a diverged run ends early
            bar.run_done()
            if on_record is not None:
                on_record(record)

    def interrupted() -> SweepInterrupted:
        dropped = sorted(started - ended)
        return SweepInterrupted(
            len(ended), [pending[i] for i in dropped], len(pending) - len(ended) - len(dropped)
        )

    jobs = run_groups(pending, pack)
    if workers == 1 or len(jobs) <= 1:
        try:
            with one_thread():
                for job in jobs:
                    started.update(job)
                    records = train_runs(
                        [pending[i] for i in job],
                        on_epoch=lambda j, _, job=job: epoch_done(job[j]),
                        pack=pack,
                        build=build,
                    )
                    finish(records, job)
        except KeyboardInterrupt:
            raise interrupted() from None
        return len(pending)

    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                kind, value = progress_q.get_nowait()
            except queue.Empty:
                return
            if kind == "start":
                started.update(value)
            else:
                epoch_done(value)

    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(progress_q,),
    )
    try:
        # Workers are spawned by submit(); they inherit an ignored SIGINT.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _GUARD else None
        try:
            futures = {
                pool.submit(_run_in_worker, [pending[i] for i in job], job, pack, build): job
                for job in jobs
            }
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        remaining = set(futures)
        while remaining:
            finished, remaining = cf.wait(remaining, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            drain()
            for fut in finished:
                finish(fut.result(), futures[fut])
    except KeyboardInterrupt:
        drain()
        _stop_workers(pool)
        raise interrupted() from None
    except BaseException:
        _stop_workers(pool)  # an error ends the sweep: no queued run starts
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        progress_q.close()
        progress_q.join_thread()
    return len(pending)
