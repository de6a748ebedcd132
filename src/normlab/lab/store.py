"""SQLite store of finished lab runs: one row per run, committed as soon as it ends.

Schema (version 1)::

    normlab_meta(name TEXT PRIMARY KEY, value TEXT)   -- magic, schema_version
    runs(key TEXT PRIMARY KEY, norm TEXT, batch_size INTEGER, seed INTEGER,
         final_error REAL, wall_time REAL, finished_at TEXT, record TEXT)

``key`` is :meth:`RunConfig.key`, so rerunning a sweep skips what is stored, and a
killed sweep loses only the runs still in flight. ``record`` is the whole
:class:`RunRecord` as JSON (config, curves, versions).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from .train import RunRecord

__all__ = ["MAGIC", "SCHEMA_VERSION", "RunStore", "StoreError"]

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


class StoreError(RuntimeError):
    """The file is not a normlab run store (corrupt, foreign, or from a newer version)."""


class RunStore:
    """A run store at ``path``; created if missing. Use as a context manager or ``close()``."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists and not create:
            raise StoreError(f"{self.path}: no such run store; run `normlab sweep --db {path}`")
        try:
            self._con = sqlite3.connect(self.path)
            tables = {
                r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise StoreError(
                f"{self.path}: not a readable SQLite database ({e}); the file is corrupt or not "
                "a normlab store. Move it away or pass another --db"
            ) from e
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

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> set[str]:
        """Keys of every finished run."""
        return {r[0] for r in self._con.execute("SELECT key FROM runs")}

    def add(self, record: RunRecord) -> bool:
        """Insert and commit one run; ``False`` (and no change) if its key is stored already."""
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
        """Copy the runs of another store (e.g. a rank's shard) into this one."""
        with RunStore(other, create=False) as src:
            return self.add_many(src.records())
