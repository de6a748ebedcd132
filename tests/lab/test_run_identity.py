"""A run's result depends on its key alone (issue #26): the same data bits in every process
and thread count, the data hash in the protocol, one spelling per norm, finite
hyper-parameters, diverged cells flagged."""

from __future__ import annotations

import dataclasses
import math
import sqlite3

import pytest
import torch

from normlab.lab.analysis.report import markdown_table, summarize, summary_dicts
from normlab.lab.data.images import load_images, split_data
from normlab.lab.data.prepare import data_hash
from normlab.lab.data.scenes import silhouette_scenes
from normlab.lab.errors import DataError
from normlab.lab.models.resnet import canonical_norm
from normlab.lab.run.train import EpochStats, RunConfig, RunRecord, train_run
from normlab.lab.sweep.orchestrate import SweepConfig, run_sweep
from normlab.lab.sweep.store import ProtocolMismatchError, RunStore


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _threads(n: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def test_classification_split_same_bits_on_one_and_two_threads():
    # 400 training images: the size at which torch's two-thread mean rounded differently.
    images = load_images(None, image_size=16)
    one = _threads(1, lambda: split_data(images, max_train=400))
    two = _threads(2, lambda: split_data(images, max_train=400))
    for name in ("x_train", "x_test"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    assert one.data_hash == two.data_hash == data_hash(two)


def test_segmentation_split_same_bits_on_one_and_two_threads():
    one = _threads(1, lambda: silhouette_scenes(n_train=40, n_test=8, image_size=16))
    two = _threads(2, lambda: silhouette_scenes(n_train=40, n_test=8, image_size=16))
    assert torch.equal(one.x_train, two.x_train) and torch.equal(one.x_test, two.x_test)
    assert one.data_hash == two.data_hash


def test_data_hash_sees_one_changed_value():
    split = split_data(load_images(None, image_size=8), max_train=100)
    x = split.x_train.clone()
    x[3, 0, 2, 2] = torch.nextafter(x[3, 0, 2, 2], torch.tensor(math.inf))
    assert data_hash(dataclasses.replace(split, x_train=x)) != split.data_hash


def _outcome(r: RunRecord) -> tuple:
    return (
        r.config,
        r.final_error,
        r.diverged,
        r.num_train,
        [dataclasses.astuple(e) for e in r.epochs],
    )


@pytest.mark.slow
def test_in_process_and_worker_runs_are_identical(tmp_path, two_threads):
    # Two unpacked runs: workers=2 trains them in spawned one-thread workers, workers=1
    # in this two-thread process. 400 embedded images at 16x16: data whose statistics
    # torch rounds differently on two threads.
    config = SweepConfig(
        norms=["bn"],
        batch_sizes=[8],
        seeds=(0, 1),
        epochs=1,
        max_train=400,
        widths=(8, 8),
        pack=False,
    )
    in_workers = run_sweep(config, tmp_path / "w.db", workers=2, progress=False).records
    in_process = run_sweep(config, tmp_path / "p.db", workers=1, progress=False).records
    assert [_outcome(r) for r in in_workers] == [_outcome(r) for r in in_process]
    assert in_process[0].config.data_hash is not None


def _record(seed: int = 0, data_hash: str | None = "aaaa", diverged: bool = False) -> RunRecord:
    cfg = RunConfig(norm="bn", batch_size=4, seed=seed, epochs=1, data_hash=data_hash)
    return RunRecord(cfg, [EpochStats(1, 1.0, 50.0, 40.0, 0.01)], 40.0, 1.5, diverged, 10, 5, 1)


def test_the_key_ignores_the_data_hash_and_is_unchanged():
    # Keys of normlab before the data hash existed, so old stores still resume.
    assert RunConfig(norm="bn", batch_size=4, seed=1, epochs=1).key() == (
        "b9e0d42c76dcd420b582c42cbe2330e8"
    )
    seg = RunConfig(norm="bn+recal-pb", batch_size=2, seed=0, task="segmentation")
    assert seg.key() == "94c9675c7a36ee11b1d8601b1b8c9f55"
    assert _record(data_hash="aaaa").key == _record(data_hash="bbbb").key


def test_store_refuses_runs_of_other_data(tmp_path):
    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        store.add(_record(0, "aaaa"))
        with pytest.raises(ProtocolMismatchError, match=r"data_hash aaaa stored vs bbbb now"):
            store.add(_record(1, "bbbb"))
        assert len(store) == 1


def test_old_store_without_data_hash_opens_and_refuses_clearly(tmp_path):
    db = tmp_path / "old.db"
    with RunStore(db) as store:
        store.add(_record(0, None))
    # An old record has no data_hash key at all.
    con = sqlite3.connect(db)
    (blob,) = con.execute("SELECT record FROM runs").fetchone()
    con.execute("UPDATE runs SET record = ?", (blob.replace(', "data_hash": null', ""),))
    con.commit()
    con.close()
    with RunStore(db, readonly=True) as store:
        (old,) = store.records()
    assert old.config.data_hash is None and summarize([old])[0].n == 1
    with RunStore(db) as store, pytest.raises(ProtocolMismatchError, match="unrecorded stored"):
        store.check_protocol(_record(1, "aaaa").config)


def test_a_run_planned_on_other_data_is_refused(tiny_npz):
    cfg = RunConfig(
        norm="bn",
        batch_size=4,
        seed=0,
        epochs=1,
        data=str(tiny_npz),
        image_size=8,
        max_train=None,
        widths=(8, 8),
        data_hash="0000000000000000",
    )
    with pytest.raises(DataError, match="planned on data with hash 0000000000000000"):
        train_run(cfg)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("BN", "bn"),
        (" Gn ", "gn"),
        ("bn+recal_pb", "bn+recal-pb"),
        ("BN+RECAL-PB", "bn+recal-pb"),
        ("bn+Recal", "bn+recal"),
        ("EvoNorm-B0+Sync", "evonorm_b0+sync"),
        ("frozen-bn", "frozen_bn"),
    ],
)
def test_one_spelling_per_norm(given, canonical):
    assert canonical_norm(given) == canonical
    assert RunConfig(norm=given, batch_size=4, seed=0).key() == (
        RunConfig(norm=canonical, batch_size=4, seed=0).key()
    )


def test_sweep_norms_are_canonical_and_once():
    config = SweepConfig(norms=["BN", "bn", "bn+recal_pb", "bn+recal-pb"], batch_sizes=[4])
    assert list(config.norms) == ["bn", "bn+recal-pb"]
    assert {r.norm for r in config.runs()} == {"bn", "bn+recal-pb"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["base_lr", "warmup_epochs", "weight_decay"])
def test_non_finite_hyper_parameters_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        RunConfig(norm="bn", batch_size=4, seed=0, **{field: value})


def test_diverged_runs_flagged_in_summary_and_table():
    cells = summarize([_record(0), _record(1, diverged=True), _record(2)])
    (entry,) = summary_dicts(cells)
    assert entry["n_diverged"] == 1 and entry["n_seeds"] == 3
    assert "(1 diverged)" in markdown_table(cells)[2]
    (clean,) = summary_dicts(summarize([_record(0), _record(1)]))
    assert "n_diverged" not in clean  # a summary without it had none
