"""One writer per run store: an advisory lock on ``<store>.lock`` beside it.

Two sweeps on one store would both train every pending run (each reads the keys before
the other stores anything). A store opened for writing therefore holds an exclusive
``fcntl.flock`` on the lock file for as long as it is open; a second process that opens
it for writing is refused at once, with the holder's process id. Inside one process the
lock is shared (rank 0 of a torchrun sweep writes from two threads) and counted; the
last release removes the file. Readers (``report``, ``compare``) take no lock.

Where ``fcntl`` does not exist (Windows) there is no lock and SQLite's own locking is
what keeps the file consistent.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from ..errors import StoreLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["StoreLock", "lock_path"]

_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (file descriptor, holders)
_GUARD = threading.Lock()


def lock_path(store: Path) -> Path:
    """The lock file of the store at ``store``."""
    return store.with_name(store.name + ".lock")


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().strip())
        return f" (process {pid})"
    return ""


def _acquire(path: Path, store: Path) -> int:
    """An fd holding the exclusive lock on ``path``; retried if the file was replaced."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLockedError(
                f"{store}: another normlab sweep is writing this store{_holder(path)}; "
                "two sweeps on one store would train the same runs twice. Wait for it to "
                f"finish (or, if none runs, delete {path}), or pass another --db"
            ) from None
        # The holder before us may have removed the file after we opened it: then our
        # lock is on a file nobody else sees. Lock the one at the path instead.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)


class StoreLock:
    """The write lock of the store at ``store``: held from construction to :meth:`release`.

    Raises:
        StoreLockedError: another process holds it.
    """

    def __init__(self, store: Path) -> None:
        self.path = lock_path(store)
        self._key = str(self.path.absolute())
        self._released = fcntl is None
        if fcntl is None:  # pragma: no cover - Windows
            return
        with _GUARD:
            fd, holders = _HELD.get(self._key, (-1, 0))
            if holders == 0:
                fd = _acquire(self.path, store)
            _HELD[self._key] = (fd, holders + 1)

    def release(self) -> None:
        """Give the lock up (idempotent); the last holder removes the lock file."""
        if self._released:
            return
        self._released = True
        with _GUARD:
            fd, holders = _HELD.pop(self._key)
            if holders > 1:
                _HELD[self._key] = (fd, holders - 1)
                return
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)
