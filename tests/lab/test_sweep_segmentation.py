"""`normlab sweep --task segmentation`: the task's metrics, the CLI's runs, store, report and
resume, the user's folder, recalibrated BN, and one clear line for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.cli import main
from normlab.lab.run.config import EpochStats, RunConfig, RunRecord
from normlab.lab.run.train import train_run
from normlab.lab.sweep.store import RunStore
from normlab.lab.tasks.seg_metrics import confusion_matrix, mean_iou, pixel_error
from normlab.lab.tasks.segmentation import Segmentation

#: One epoch on a few built-in 16×16 scenes: a second or two per run.
TINY = ["--epochs", "1", "--max-train", "24", "--image-size", "16", "--seeds", "0,1"]


def _sweep(tmp_path: Path, *extra: str, db: str = "seg.db") -> list[str]:
    return [
        "sweep",
        "--task",
        "segmentation",
        *TINY,
        "--db",
        str(tmp_path / db),
        "--out",
        str(tmp_path / "report"),
        "--workers",
        "1",
        "--quiet",
        *extra,
    ]


def _stored(db: Path) -> list[RunRecord]:
    with RunStore(db, create=False) as store:
        return store.records()


def test_task_metrics_pool_pixels_over_batches():
    """mIoU from summed confusion matrices: the pooled mIoU of the set, not a batch mean."""
    gen = torch.Generator().manual_seed(7)
    task = Segmentation(3)
    logits = torch.randn(2, 5, 3, 6, 6, generator=gen) + 0.3  # S=2 networks, B=5
    target = torch.randint(0, 3, (2, 5, 6, 6), generator=gen)
    target[0, 0, 0, :3] = 255  # void pixels count nowhere
    whole = task.tally(logits, target)
    halves = task.tally(logits[:, :2], target[:, :2]) + task.tally(logits[:, 2:], target[:, 2:])
    assert torch.equal(whole, halves)
    for s, got in enumerate(task.errors(whole)):
        conf = confusion_matrix(logits[s].argmax(1), target[s], 3)
        assert got["miou"] == pytest.approx(mean_iou(conf))
        assert got["pixel_error"] == pytest.approx(pixel_error(conf))
        assert got["miou_error"] == pytest.approx(100 - got["miou"])
    batch_means = [
        task.errors(task.tally(logits[:, i : i + 1], target[:, i : i + 1]))[0]["miou"]
        for i in range(5)
    ]
    assert task.errors(whole)[0]["miou"] != pytest.approx(float(np.mean(batch_means)))
    loss = task.loss(logits, target)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_task_is_keyed_and_old_records_load():
    """The task is part of a run's key only when it is not classification; records stored
    before the task and the per-epoch metrics existed load as classification runs."""
    base = dict(norm="bn", batch_size=4, seed=0, epochs=1)
    plain = RunConfig(**base)
    seg = RunConfig(**base, task="segmentation")
    assert plain.key() != seg.key()
    old = plain.to_dict()
    del old["task"]
    assert RunConfig.from_dict(old).key() == plain.key()
    stats = EpochStats(1, 0.5, 10.0, 12.0, 0.1, 3)
    record = RunRecord(plain, [stats], 12.0, 1.0, False, 10, 5, 1)
    d = record.to_dict()
    del d["epochs"][0]["test_metrics"]
    assert RunRecord.from_dict(d).final_metrics == {}
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        RunConfig(**base, task="depth")


def test_recal_uses_segmentation_images():
    """bn+recal trains as BN and recalibrates on the training scenes: the same weights,
    other running statistics, finite mIoU."""
    kw = dict(batch_size=4, seed=3, epochs=1, base_lr=0.05, image_size=16, max_train=16)
    kw |= dict(widths=(8, 16), task="segmentation")
    bn = train_run(RunConfig(norm="bn", **kw))
    recal = train_run(RunConfig(norm="bn+recal", **kw))
    assert set(recal.final_metrics) == {"miou_error", "miou", "pixel_error"}
    assert 0 < recal.final_metrics["miou"] <= 100
    assert bn.epochs[0].train_loss == pytest.approx(recal.epochs[0].train_loss, rel=1e-5)
    assert bn.final_metrics != recal.final_metrics


@pytest.mark.slow
def test_cli_runs_stores_reports_resumes(tmp_path, capsys):
    args = _sweep(tmp_path, "--norms", "bn,gn", "--batch-sizes", "2,8")
    args.remove("--quiet")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Segmentation, test mIoU (%, higher is better)" in out
    assert "Segmentation, test pixel error (%, lower is better)" in out
    assert "8 new run(s), 0 already stored" in out
    records = _stored(tmp_path / "seg.db")
    assert len(records) == 8
    for r in records:
        assert r.config.task == "segmentation" and r.packed == 1
        assert r.config.widths == (16, 32, 64) and r.final_map == 4
        assert r.final_error == pytest.approx(100 - r.final_metrics["miou"])
        assert r.num_train == 24 and r.num_test == 500
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Test mIoU (%, higher is better), mean ± std over seeds" in report
    assert "- Model: U-Net, 3 levels of widths [16, 32, 64]" in report
    assert (tmp_path / "report" / "sweep.png").stat().st_size > 0
    assert main(args) == 0
    assert "0 new run(s), 8 already stored" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "seg.db"), "--out", str(tmp_path / "r2")]) == 0
    assert "test mIoU" in capsys.readouterr().out


def _write_folder(root: Path, *, n: int = 12, size: int = 16, mask_size: int | None = None):
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = rng.uniform(0, 90, size=(size, size, 3))
        mask = np.zeros((size, size), dtype=np.uint8)
        r0, c0 = rng.integers(0, size // 2, size=2)
        mask[r0 : r0 + size // 2, c0 : c0 + size // 2] = 1
        img[mask == 1] += 140  # a bright square on a dark background: class 1
        Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"s{i}.png")
        m = mask if mask_size is None else np.zeros((mask_size, mask_size), np.uint8)
        Image.fromarray(m, mode="L").save(root / "masks" / f"s{i}.png")


def test_user_folder(tmp_path):
    _write_folder(tmp_path / "scenes")
    extra = ["--data", str(tmp_path / "scenes"), "--norms", "gn", "--batch-sizes", "2"]
    assert main(_sweep(tmp_path, *extra, "--json", str(tmp_path / "s.json"))) == 0
    records = _stored(tmp_path / "seg.db")
    assert [r.num_train + r.num_test for r in records] == [12, 12]
    assert all(r.config.data == str(tmp_path / "scenes") for r in records)
    assert json.loads((tmp_path / "s.json").read_text())[0]["norm"] == "gn"


def _refused(tmp_path: Path, capsys, *extra: str) -> str:
    assert main(_sweep(tmp_path, "--norms", "bn", "--batch-sizes", "2", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "seg.db").exists()  # refused before the store or any training
    return err


def test_bad_mask_size(tmp_path, capsys):
    _write_folder(tmp_path / "d", mask_size=8)
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "d"))
    assert "the mask is 8×8 (H×W) but its image" in err


def test_labels_outside_class_range(tmp_path, capsys):
    _write_folder(tmp_path / "d")
    (tmp_path / "d" / "classes.txt").write_text("background\nsquare\n")
    Image.fromarray(np.full((16, 16), 7, np.uint8), mode="L").save(tmp_path / "d/masks/s3.png")
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "d"))
    assert "class id(s) 7 are outside the class range 0..1" in err


def test_classification_data_named(tmp_path, capsys, tiny_npz):
    for cls in ("cat", "dog"):
        (tmp_path / "cls" / cls).mkdir(parents=True)
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "cls"))
    assert "looks like classification data" in err and "images/ and masks/" in err
    err = _refused(tmp_path, capsys, "--data", str(tiny_npz))
    assert "classification data (drop --task segmentation)" in err


def test_unknown_task_and_unsupported_modes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--task", "depth", "--db", str(tmp_path / "x.db")])
    assert e.value.code == 2
    assert "invalid choice: 'depth'" in capsys.readouterr().err
    err = _refused(tmp_path, capsys, "--per-rank-batch")
    assert "--task segmentation with --per-rank-batch is not supported" in err
    err = _refused(tmp_path, capsys, "--norms", "bn1d")
    assert "bn1d" in err
