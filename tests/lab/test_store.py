"""The SQLite run store: round trip, duplicates, corrupt and foreign files."""

from __future__ import annotations

import sqlite3

import pytest

from normlab.lab.run.train import EpochStats, RunConfig, RunRecord
from normlab.lab.sweep.store import ProtocolMismatchError, RunStore, StoreError


def _record(seed: int = 0) -> RunRecord:
    cfg = RunConfig(norm="bn", batch_size=4, seed=seed, epochs=1)
    return RunRecord(cfg, [EpochStats(1, 1.0, 50.0, 40.0, 0.01)], 40.0, 1.5, False, 10, 5, 1)


def test_round_trip_and_duplicates(tmp_path):
    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        assert store.add(_record(0)) is True
        assert store.add(_record(0)) is False
        assert store.add(_record(1)) is True
    with RunStore(db, create=False) as store:
        records = store.records()
        assert len(store) == 2 and store.keys() == {r.key for r in records}
    assert records[0] == _record(0)


def test_corrupt_file(tmp_path):
    db = tmp_path / "bad.db"
    db.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite database"):
        RunStore(db)


def test_foreign_sqlite(tmp_path):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not a normlab run store"):
        RunStore(db)


def test_newer_schema(tmp_path):
    db = tmp_path / "new.db"
    RunStore(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE normlab_meta SET value = '99' WHERE name = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 99"):
        RunStore(db)


def test_missing_store_for_report(tmp_path):
    with pytest.raises(StoreError, match="no such run store"):
        RunStore(tmp_path / "none.db", create=False)


def _run(epochs: int, seed: int = 0, **kw) -> RunRecord:
    cfg = RunConfig(norm="bn", batch_size=4, seed=seed, epochs=epochs, **kw)
    return RunRecord(cfg, [EpochStats(1, 1.0, 50.0, 40.0, 0.01)], 40.0, 1.5, False, 10, 5, 1)


def test_refuses_another_protocol(tmp_path):
    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        store.add(_run(epochs=3))
        store.add(_run(epochs=3, seed=1, device="cuda"))  # the device is not protocol
        with pytest.raises(ProtocolMismatchError) as info:
            store.add(_run(epochs=1, base_lr=0.1))
        assert len(store) == 2
    msg = str(info.value)
    assert "base_lr 0.00625 stored vs 0.1 now" in msg and "epochs 3 stored vs 1 now" in msg
    assert "another --db" in msg and "--allow-mixed-protocols" in msg
    # Reopened, the store still knows its protocol (from the stored runs).
    with RunStore(db) as store, pytest.raises(ProtocolMismatchError):
        store.check_protocol(_run(epochs=1).config)


def test_mixed_protocols_when_allowed(tmp_path):
    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        store.add(_run(epochs=3))
    with RunStore(db, allow_mixed_protocols=True) as store:
        assert store.add(_run(epochs=1)) is True
        assert sorted(p["epochs"] for p in store.protocols()) == [1, 3]


def test_merge_refuses_another_protocol_whole(tmp_path):
    main, shard = tmp_path / "main.db", tmp_path / "shard.db"
    with RunStore(main) as store:
        store.add(_run(epochs=3))
    with RunStore(shard) as store:
        store.add(_run(epochs=2, seed=5))
    with RunStore(main) as store:
        with pytest.raises(ProtocolMismatchError, match="epochs 3 stored vs 2 now"):
            store.merge_from(shard)
        assert len(store) == 1
