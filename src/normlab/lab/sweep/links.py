"""Messages between the ranks of a torchrun sweep, over a gloo group of their own.

Rank 0 alone holds the run store; every other rank sends it each run the moment the run
finishes, so a sweep over several machines needs no shared file system and a crash
loses only the runs in flight. The messages travel over a gloo process group created
for them (also when the runs train on CUDA). It is not made torch.distributed's default
group, so a ``+sync`` norm in a run that one rank trains alone still sees one process.

Each pair (rank 0, rank r) talks over a :class:`Channel`, one in each process. A message
is an int64 header (kind, body length) followed by a UTF-8 body; sends are serialized by
a lock and one thread per channel receives. How a rank that crashes is noticed:

* it raises: it sends the error as its last message, then exits;
* its process ends (killed, out of memory): its TCP connections close, which the peer's
  receiving thread sees at once;
* it hangs, or its machine or network goes down: each side also sends a heartbeat every
  ``timeout / 4`` seconds (at most 10 s), so a receiver that hears nothing for
  ``timeout`` seconds gives up on the peer.

Each direction ends with one final message (DONE or ERROR from rank r, FINISHED or
ERROR from rank 0); after it nothing more is sent or received on that direction, so no
operation is left pending when the group is dropped. ``NORMLAB_RANK_TIMEOUT`` (seconds,
default 120) sets the timeout; it also bounds how long the ranks wait for each other to
start.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "FINAL",
    "TIMEOUT_ENV",
    "Channel",
    "Kind",
    "RankFailedError",
    "gist",
    "open_group",
    "rank_timeout",
]

TIMEOUT_ENV = "NORMLAB_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 120.0


class RankFailedError(RuntimeError):
    """A rank of a torchrun sweep failed or was lost; the sweep stopped on every rank."""


class Kind(enum.IntEnum):
    """What a message carries."""

    HEARTBEAT = 0  #: nothing: the sender is alive
    PLAN = 1  #: rank 0 -> r: JSON list of the pending runs' keys
    RECORD = 2  #: r -> rank 0: one finished run, RunRecord.to_dict() as JSON
    DONE = 3  #: r -> rank 0: every run of r's share was sent (final)
    FINISHED = 4  #: rank 0 -> r: every rank is done, the runs are stored (final)
    ERROR = 5  #: either way: why the sender stopped the sweep (final)
    LOST = 6  #: never sent: the receiving thread's note that the peer is gone


FINAL = frozenset({Kind.DONE, Kind.FINISHED, Kind.ERROR})

#: Deliver ``(peer, kind, body)`` from a channel's receiving thread.
Deliver = Callable[[int, Kind, str], None]

_groups = itertools.count()


def rank_timeout() -> float:
    """Seconds of silence after which a rank is given up (``NORMLAB_RANK_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def gist(e: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without the source
    location gloo puts in front."""
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else ""
    return line.split(". ")[0].rstrip(".") or type(e).__name__


def open_group(rank: int, world_size: int, timeout: float) -> tuple[Any, Any]:
    """A gloo process group over every rank, for the sweep's messages alone, and the
    rendezvous store that must stay referenced while the group is in use (or ``None``).

    A fresh rendezvous on ``MASTER_ADDR:MASTER_PORT`` (torchrun's store when torchrun
    started this process), unless torch.distributed is already initialized here, in
    which case a gloo group is added to it.

    Raises:
        ValueError: no launcher set ``MASTER_ADDR`` / ``MASTER_PORT``, or the existing
            process group has another size.
        RankFailedError: the ranks could not meet (one did not start within ``timeout``
            seconds, or the address is unusable).
    """
    wait = datetime.timedelta(seconds=timeout)
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise ValueError(
                f"the process group has {dist.get_world_size()} ranks, the sweep was told "
                f"{world_size}"
            )
        return dist.new_group(backend="gloo", timeout=wait), None
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(
            f"a sweep over {world_size} ranks needs its ranks started together by torchrun, "
            f"but {' and '.join(missing)} is not set; run `torchrun --nproc-per-node "
            f"{world_size} -m normlab sweep ...` (or `--nnodes N --node-rank i` on each "
            "machine), or leave RANK and WORLD_SIZE unset for one process"
        )
    try:
        store, _, _ = next(
            dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=wait)
        )
        prefix = f"normlab-sweep-messages/{next(_groups)}"
        group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world_size, wait)
    except RuntimeError as e:  # torch's DistError and gloo's errors are RuntimeErrors
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise RankFailedError(
            f"rank {rank}: the {world_size} ranks could not meet at {where} ({gist(e)}). "
            f"A rank failed to start or came more than {timeout:.0f} s late (see its output; "
            f"{TIMEOUT_ENV} sets the wait), the port is taken, or the address cannot be "
            "reached. Fix that and rerun the same command on every machine"
        ) from e
    return group, store


class Channel:
    """This process's end of the message stream with ``peer``: send, receive, heartbeat.

    Every message received other than a heartbeat goes to ``deliver`` (from the receiving
    thread); so does a :attr:`Kind.LOST` note, whose body says what happened, when the
    peer closes its connection or stays silent for ``timeout`` seconds.
    """

    def __init__(self, group: Any, peer: int, timeout: float, deliver: Deliver) -> None:
        self.peer = peer
        self.timeout = timeout
        self._group = group
        self._wait = datetime.timedelta(seconds=timeout)
        self._deliver = deliver
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._beater = threading.Thread(target=self._beat, daemon=True)
        self._receiver.start()
        self._beater.start()

    @property
    def closed(self) -> bool:
        """Whether this side sent its final message."""
        return self._closed

    def send(self, kind: Kind, body: str = "") -> bool:
        """Send one message; ``False`` (nothing sent) after this side's final message.

        Returns once the peer received it. Raises ``RuntimeError`` if the peer is gone.
        """
        data = body.encode()
        with self._lock:
            if self._closed:
                return False
            self._closed = kind in FINAL
            header = torch.tensor([int(kind), len(data)], dtype=torch.int64)
            self._group.send([header], self.peer, 0).wait(self._wait)
            if data:
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                self._group.send([payload], self.peer, 0).wait(self._wait)
        return True

    def close(self) -> None:
        """Stop the heartbeat and wait (at most ``timeout``) for the peer's final message."""
        self._stop.set()
        self._beater.join()
        self._receiver.join(self.timeout)

    def _beat(self) -> None:
        interval = min(self.timeout / 4, 10.0)
        while not self._stop.wait(interval):
            try:
                if not self.send(Kind.HEARTBEAT):
                    return
            except RuntimeError:
                return  # the receiving thread reports the lost peer

    def _receive(self) -> None:
        header = torch.zeros(2, dtype=torch.int64)
        while True:
            try:
                self._group.recv([header], self.peer, 0).wait(self._wait)
                kind, size = Kind(int(header[0])), int(header[1])
                body = ""
                if size:
                    payload = torch.empty(size, dtype=torch.uint8)
                    self._group.recv([payload], self.peer, 0).wait(self._wait)
                    body = payload.numpy().tobytes().decode()
            except (RuntimeError, ValueError) as e:  # ValueError: not a message kind
                self._deliver(self.peer, Kind.LOST, self._lost(e))
                return
            if kind is not Kind.HEARTBEAT:
                self._deliver(self.peer, kind, body)
            if kind in FINAL:
                return

    def _lost(self, e: Exception) -> str:
        if "timed out" in str(e).lower():
            return (
                f"sent nothing for {self.timeout:.0f} s: it hangs, or its machine or the "
                f"network is down (if it is only slow, raise {TIMEOUT_ENV})"
            )
        return (
            "closed its connection without reporting an error: its process was killed "
            f"(out of memory?) or its machine went down ({gist(e)})"
        )
