"""Tiny sweeps: store + table + PNG, resume after an interruption, sharding, bad arguments."""

from __future__ import annotations

import json
import sqlite3

import matplotlib.image as mpimg
import pytest

from normlab.lab.analysis.report import summarize, write_report
from normlab.lab.run.train import RunConfig, train_run
from normlab.lab.sweep.orchestrate import (
    SweepConfig,
    default_norms,
    expand_norms,
    merge_shards,
    run_sweep,
)
from normlab.lab.sweep.store import RunStore


def test_tiny_sweep_store_table_png(tmp_path, tiny_kwargs):
    cfg = SweepConfig(norms=("bn", "gn"), batch_sizes=(2, 4), **tiny_kwargs)
    result = run_sweep(cfg, tmp_path / "runs.db", workers=1, progress=False)
    assert result.new_runs == 4 and result.skipped_runs == 0
    assert len(result.records) == 4
    rec = result.records[0]
    assert len(rec.epochs) == 1 and 0.0 <= rec.final_error <= 100.0
    assert rec.versions["torch"] and rec.wall_time > 0
    cells = summarize(result.records)
    assert [(c.norm, c.batch_size, c.n) for c in cells] == [
        ("bn", 2, 1),
        ("bn", 4, 1),
        ("gn", 2, 1),
        ("gn", 4, 1),
    ]
    files = write_report(result.records, tmp_path / "report")
    png = files.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert mpimg.imread(files.plot).ndim == 3
    md = files.markdown.read_text()
    assert "![test error vs batch size](sweep.png)" in md and "| BN |" in md
    summary = json.loads(files.json.read_text())
    assert summary[0].keys() == {"norm", "batch_size", "mean_error", "std_error", "n_seeds"}


class _Stop(Exception):
    pass


def test_interrupt_then_resume(tmp_path, tiny_kwargs):
    cfg = SweepConfig(norms=("bn", "gn"), batch_sizes=(2, 4), **tiny_kwargs)
    db = tmp_path / "runs.db"

    def stop_after_first(_record):
        raise _Stop

    with pytest.raises(_Stop):
        run_sweep(cfg, db, workers=1, progress=False, on_record=stop_after_first)
    with RunStore(db) as store:
        assert len(store) == 1  # the finished run was committed before the interruption
    again = run_sweep(cfg, db, workers=1, progress=False)
    assert again.skipped_runs == 1 and again.new_runs == 3
    # Simulate a kill that lost a row: it is rerun, nothing is duplicated.
    con = sqlite3.connect(db)
    con.execute("DELETE FROM runs WHERE rowid = (SELECT MIN(rowid) FROM runs)")
    con.commit()
    con.close()
    third = run_sweep(cfg, db, workers=1, progress=False)
    assert third.new_runs == 1 and third.skipped_runs == 3
    con = sqlite3.connect(db)
    rows = con.execute("SELECT norm, batch_size, seed, COUNT(*) FROM runs GROUP BY key").fetchall()
    con.close()
    assert len(rows) == 4 and all(r[3] == 1 for r in rows)


@pytest.mark.slow
def test_parallel_workers(tmp_path, tiny_kwargs):
    cfg = SweepConfig(norms=("bn", "gn"), batch_sizes=(2, 4), **tiny_kwargs)
    result = run_sweep(cfg, tmp_path / "runs.db", workers=2, progress=False)
    assert result.new_runs == 4 and len(result.records) == 4
    serial = run_sweep(cfg, tmp_path / "serial.db", workers=1, progress=False)
    # Same seeds, same runs: the worker processes reproduce the in-process results.
    assert {r.key: r.final_error for r in result.records} == {
        r.key: r.final_error for r in serial.records
    }


def test_packed_seeds_store_resume_and_match_unpacked(tmp_path, tiny_kwargs):
    """Seeds of a cell train packed; a cell whose seeds are partly stored packs the rest;
    packed runs keep the unpacked runs' keys and reach the same errors."""
    kw = {**tiny_kwargs, "seeds": (0, 1, 2)}
    cfg = SweepConfig(norms=("bn", "sn"), batch_sizes=(2, 4), **kw)
    db = tmp_path / "runs.db"
    done = []

    def stop_after_four(record):
        done.append(record)
        if len(done) == 4:
            raise _Stop

    with pytest.raises(_Stop):  # stops inside the second packed job (of 3 seeds)
        run_sweep(cfg, db, workers=1, progress=False, on_record=stop_after_four)
    assert all(r.packed == 3 for r in done)
    with RunStore(db) as store:
        assert len(store) == 4
    again = run_sweep(cfg, db, workers=1, progress=False)
    assert again.skipped_runs == 4 and again.new_runs == 8 and len(again.records) == 12
    packs = {(r.config.norm, r.config.batch_size, r.config.seed): r.packed for r in again.records}
    assert sorted(set(packs.values())) == [2, 3]  # the interrupted cell: 2 seeds left, packed
    plain = run_sweep(
        SweepConfig(norms=("bn", "sn"), batch_sizes=(2, 4), pack=False, **kw),
        tmp_path / "plain.db",
        workers=1,
        progress=False,
    )
    assert {r.packed for r in plain.records} == {1}
    packed_err = {r.key: r.final_error for r in again.records}
    assert {r.key: r.final_error for r in plain.records} == packed_err


def test_merge_shards_of_old_shard_files(tmp_path, tiny_kwargs):
    """Shard stores ``DB.rank<r>`` that earlier torchrun sweeps wrote merge into ``DB``;
    a sweep then resumes from the merged store (tests/lab/test_torchrun.py: no shards)."""
    cfg = SweepConfig(norms=("bn", "gn"), batch_sizes=(2, 4), **tiny_kwargs)
    db = tmp_path / "runs.db"
    runs = cfg.runs()
    for r in range(2):
        with RunStore(tmp_path / f"runs.db.rank{r}") as shard:
            assert shard.add_many(train_run(run) for run in runs[r::2]) == 2
    assert merge_shards(db, 2) == 4
    assert merge_shards(db, 2) == 0  # merging again adds nothing
    again = run_sweep(cfg, db, workers=1, progress=False)
    assert again.new_runs == 0 and again.skipped_runs == 4 and len(again.records) == 4


def test_default_norms_and_all():
    assert default_norms() == ["bn", "gn", "frn", "sn", "mabn", "brn", "cbn"]
    assert expand_norms(["all"]) == ["bn", "gn", "frn", "sn", "mabn", "brn", "cbn"]
    assert expand_norms(["gn", "all", "bn+recal"]) == [
        "gn",
        "bn",
        "frn",
        "sn",
        "mabn",
        "brn",
        "cbn",
        "bn+recal",
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norms=("bn", "nope")), "unknown norm 'nope'"),
        (dict(batch_sizes=(0, 4)), "batch size 0"),
        (dict(batch_sizes=(1,)), "batch size 1"),
        (dict(norms=()), "norms is empty"),
        (dict(seeds=()), "seeds is empty"),
        (dict(seeds=(1, 1)), "duplicates"),
        (dict(device="cuda:0"), None),
    ],
)
def test_bad_arguments(kwargs, match):
    import torch

    if "device" in kwargs:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        match = "no CUDA GPU"
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)


def test_batch_larger_than_data(tiny_npz):
    cfg = RunConfig(
        "bn", 64, 0, epochs=1, data=str(tiny_npz), image_size=8, max_train=None, widths=(8,)
    )
    with pytest.raises(ValueError, match="exceeds the"):
        train_run(cfg)


def test_recal_variant_needs_recalibrate(tiny_npz):
    cfg = RunConfig(
        "bn+recal", 4, 0, epochs=1, data=str(tiny_npz), image_size=8, max_train=None, widths=(8,)
    )
    try:
        import normlab.recalibrate  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="normlab.recalibrate"):
            train_run(cfg)
    else:
        assert 0.0 <= train_run(cfg).final_error <= 100.0


def test_in_process_runs_use_one_thread(tmp_path, tiny_kwargs, monkeypatch):
    import torch

    import normlab.lab.sweep.runner as runner

    seen = []
    real = runner.train_runs

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_runs", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = SweepConfig(norms=("bn",), batch_sizes=(2, 4), **tiny_kwargs)
        run_sweep(cfg, tmp_path / "runs.db", workers=1, progress=False)
        assert seen == [1, 1]  # one thread per run, as in the worker processes
        assert torch.get_num_threads() == 2  # and this process's count is restored
    finally:
        torch.set_num_threads(before)
