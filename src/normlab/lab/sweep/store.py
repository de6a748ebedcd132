"""SQLite store of finished lab runs: one row per run, committed as soon as it ends.

Schema (version 1)::

    normlab_meta(name TEXT PRIMARY KEY, value TEXT)   -- magic, schema_version
    runs(key TEXT PRIMARY KEY, norm TEXT, batch_size INTEGER, seed INTEGER,
         final_error REAL, wall_time REAL, finished_at TEXT, record TEXT)

``key`` is :meth:`RunConfig.key`, so rerunning a sweep skips what is stored, and a
killed sweep loses only the runs still in flight. ``record`` is the whole
:class:`RunRecord` as JSON (config, curves, versions).

A store holds runs of one protocol (:mod:`normlab.lab.run.protocol`): a run trained another
way is refused unless the store is opened with ``allow_mixed_protocols=True``, because a
report cell that averaged seeds of two protocols would mean neither. The protocol holds
the hash of the prepared data, so runs trained on other data bits are refused too.

Opened for writing, a store holds its lock file (:mod:`normlab.lab.sweep.lock`): a
second sweep on it is refused while the first runs. ``readonly=True`` (``report``,
``compare``) opens the file read-only (SQLite's ``mode=ro``) and never writes to it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from ..errors import ProtocolMismatchError, StoreError
from ..run.protocol import describe_difference, differing_fields, protocol_key, protocol_of
from ..run.train import RunConfig, RunRecord
from .lock import StoreLock
from .paths import check_store_path

__all__ = ["MAGIC", "SCHEMA_VERSION", "ProtocolMismatchError", "RunStore", "StoreError"]

MAGIC = "normlab-lab-runs"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS normlab_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    norm TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    final_error REAL NOT NULL,
    wall_time REAL NOT NULL,
    finished_at TEXT NOT NULL,
    record TEXT NOT NULL
);
"""


class RunStore:
    """A run store at ``path``; created if missing. Use as a context manager or ``close()``.

    ``allow_mixed_protocols``: accept runs whose protocol differs from the stored ones
    (the report then keeps each protocol in rows of its own). ``readonly``: read an
    existing store without writing anything (implies ``create=False``; :meth:`add`
    fails).

    Raises:
        OutputPathError: the path cannot hold a store (a folder, a folder that does not
            exist or is not writable).
        StoreLockedError: another process is writing the store (not with ``readonly``).
        StoreError: the file is not a normlab run store, or is damaged.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        allow_mixed_protocols: bool = False,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.allow_mixed_protocols = allow_mixed_protocols
        self.readonly = readonly
        self._protocols: dict[str, dict[str, object]] | None = None
        self._lock: StoreLock | None = None
        check_store_path(self.path, write=not readonly)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists and (readonly or not create):
            raise StoreError(f"{self.path}: no such run store; run `normlab sweep --db {path}`")
        if not readonly:
            self._lock = StoreLock(self.path)
        try:
            if readonly:
                uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
                self._con = sqlite3.connect(uri, uri=True)
            else:
                self._con = sqlite3.connect(self.path)
            tables = {
                r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.OperationalError as e:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: SQLite cannot open the file ({e}); check that it is a file you "
                "may read (and, for a sweep, write) or pass another --db"
            ) from e
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: not a readable SQLite database ({e}); the file is corrupt or not "
                "a normlab store. Move it away or pass another --db"
            ) from e
        if not tables and readonly:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: an empty SQLite database, not a normlab run store (no runs); "
                f"run `normlab sweep --db {path}` first"
            )
        if tables and "normlab_meta" not in tables:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: a SQLite database that is not a normlab run store (tables: "
                f"{', '.join(sorted(tables))}); pass another --db so it is not overwritten"
            )
        try:
            if not tables:
                with self._con:
                    self._con.executescript(_SCHEMA)
                    self._con.executemany(
                        "INSERT INTO normlab_meta(name, value) VALUES (?, ?)",
                        [("magic", MAGIC), ("schema_version", str(SCHEMA_VERSION))],
                    )
            meta = dict(self._con.execute("SELECT name, value FROM normlab_meta"))
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise StoreError(f"{self.path}: the run store is damaged ({e}); move it away") from e
        if meta.get("magic") != MAGIC:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: its normlab_meta table lacks the magic {MAGIC!r}; it is not a "
                "normlab run store. Pass another --db"
            )
        version = int(meta.get("schema_version", "0"))
        if version != SCHEMA_VERSION:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: store schema version {version}, this normlab reads version "
                f"{SCHEMA_VERSION}; use the normlab that wrote it or start a new --db"
            )

    def _close_quietly(self) -> None:
        con = getattr(self, "_con", None)
        if con is not None:
            con.close()
        if self._lock is not None:
            self._lock.release()

    def close(self) -> None:
        self._con.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> set[str]:
        """Keys of every finished run."""
        return {r[0] for r in self._con.execute("SELECT key FROM runs")}

    def protocols(self) -> list[dict[str, object]]:
        """The distinct protocols of the stored runs (:func:`protocol_of`)."""
        return list(self._stored_protocols().values())

    def _stored_protocols(self) -> dict[str, dict[str, object]]:
        if self._protocols is None:
            found: dict[str, dict[str, object]] = {}
            try:
                for (blob,) in self._con.execute("SELECT record FROM runs"):
                    p = protocol_of(RunConfig.from_dict(json.loads(blob)["config"]))
                    found.setdefault(protocol_key(p), p)
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.path}: a stored run cannot be decoded ({e})") from e
            self._protocols = found
        return self._protocols

    def check_protocol(self, config: RunConfig) -> None:
        """Refuse ``config`` if its protocol differs from the stored runs' (unless mixing
        is allowed): the error names the fields that differ and the ways out.

        Raises:
            ProtocolMismatchError: the protocols differ and mixing was not allowed.
        """
        new = protocol_of(config)
        stored = self._stored_protocols()
        if not stored or protocol_key(new) in stored or self.allow_mixed_protocols:
            return
        closest = min(stored.values(), key=lambda p: len(differing_fields([p, new])))
        data = (
            " (the prepared data differ: another normlab, torch or data file made them, or "
            "the stored runs predate data hashes)"
            if "data_hash" in differing_fields([closest, new])
            else ""
        )
        raise ProtocolMismatchError(
            f"{self.path} holds runs of another protocol ({describe_difference(closest, new)})"
            f"{data}; one report cell would average seeds trained differently. Use another "
            "--db for "
            "this protocol, or pass --allow-mixed-protocols to keep both (the report then "
            "shows each protocol in rows of its own)"
        )

    def add(self, record: RunRecord) -> bool:
        """Insert and commit one run; ``False`` (and no change) if its key is stored already.

        Raises:
            ProtocolMismatchError: see :meth:`check_protocol`.
        """
        self.check_protocol(record.config)
        new = protocol_of(record.config)
        with self._con:
            cur = self._con.execute(
                "INSERT OR IGNORE INTO runs(key, norm, batch_size, seed, final_error, wall_time,"
                " finished_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key,
                    record.config.norm,
                    record.config.batch_size,
                    record.config.seed,
                    record.final_error,
                    record.wall_time,
                    time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    json.dumps(record.to_dict()),
                ),
            )
        self._stored_protocols().setdefault(protocol_key(new), new)
        return cur.rowcount == 1

    def add_many(self, records: Iterable[RunRecord]) -> int:
        """Insert runs not stored yet; returns how many were new."""
        return sum(self.add(r) for r in records)

    def records(self) -> list[RunRecord]:
        """Every stored run, ordered by norm, batch size and seed."""
        rows = self._con.execute("SELECT record FROM runs ORDER BY norm, batch_size, seed")
        try:
            return [RunRecord.from_dict(json.loads(r[0])) for r in rows]
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{self.path}: a stored run cannot be decoded ({e})") from e

    def __len__(self) -> int:
        return int(self._con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def merge_from(self, other: str | Path) -> int:
        """Copy the runs of another store (e.g. a rank's shard) into this one.

        Raises:
            ProtocolMismatchError: see :meth:`check_protocol`.
        """
        with RunStore(other, readonly=True) as src:
            records = src.records()
        for r in records:  # all or nothing
            self.check_protocol(r.config)
        return self.add_many(records)
