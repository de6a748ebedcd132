"""`--task detection`: COCO AP by pycocotools on a hand-checked case, decoding that inverts
the training targets, detections gathered over batches, a loss that never mixes networks,
and a tiny sweep through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from normlab.cli import main
from normlab.lab.data.det_scenes import detection_scenes
from normlab.lab.sweep.store import RunStore
from normlab.lab.tasks.detection import Detection, _heat_targets, decode
from normlab.lab.tasks.detection_ap import coco_ap
from normlab.lab.tasks.task import CLASSIFICATION, merge_tallies

TOP = 3


def _rows(dets: list[list[float]]) -> np.ndarray:
    out = np.full((TOP, 6), -1.0)
    out[: len(dets)] = dets
    return out


def _hand_case() -> tuple[torch.Tensor, Detection]:
    """Image 1: one box, found with IoU 0.68 (score 0.8); image 2: no object, one false
    positive of score 0.9. Tally rows: detections (TOP · 6) then targets (1 · 5)."""
    det1 = _rows([[0.8, 0, 0, 0, 10, 6.8]])
    det2 = _rows([[0.9, 0, 20, 20, 30, 30]])
    gt1, gt2 = np.array([0, 0, 0, 10, 10.0]), np.full(5, -1.0)
    tally = np.concatenate([det1.ravel(), gt1, det2.ravel(), gt2])[None]
    return torch.from_numpy(tally).float(), Detection(1, rows=1, top_k=TOP)


def test_hand_checked_ap():
    """Worked by hand: the one true positive (IoU 0.68) matches at IoU thresholds 0.50,
    0.55, 0.60, 0.65 and misses at 0.70 … 0.95; ranked behind the false positive its
    precision is 1/2 at recall 1, so AP = 0.5 · 4/10 = 20 %, AP50 = 50 %, AP75 = 0."""
    tally, task = _hand_case()
    [got] = task.errors(tally)
    assert got["ap"] == pytest.approx(20.0) and got["ap_error"] == pytest.approx(80.0)
    assert got["ap50"] == pytest.approx(50.0) and got["ap75"] == pytest.approx(0.0)


def test_task_ap_is_pycocotools_ap(tmp_path):
    """The same case through pycocotools' own file-based API gives the task's numbers."""
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 10, 10],
                "area": 100.0,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dt = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6.8], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.9},
    ]
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    tally, task = _hand_case()
    [got] = task.errors(tally)
    assert [got["ap"], got["ap50"], got["ap75"]] == pytest.approx(list(100 * ev.stats[:3]))


def test_no_ground_truth_has_no_ap_and_no_detections_score_zero():
    assert math.isnan(coco_ap([np.zeros((0, 6))], [np.full((1, 5), -1.0)], 1)["ap"])
    assert coco_ap([np.zeros((0, 6))], [np.array([[0, 1, 1, 5, 5.0]])], 1)["ap"] == 0.0


def _perfect_output(y: torch.Tensor, k: int, side: int) -> torch.Tensor:
    """The output whose decoding is the targets: logit heatmaps, offsets and sizes."""
    heat, cell, offset, size, valid = _heat_targets(y, k, side, side)
    out = torch.zeros(len(y), k + 4, side, side)
    out[:, :k] = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    box = out[:, k:].flatten(2)
    for n, m in valid.nonzero().tolist():
        box[n, :2, cell[n, m]] = offset[n, m]
        box[n, 2:, cell[n, m]] = size[n, m]
    out[:, k:] = box.view(len(y), 4, side, side)
    return out


def test_decoding_inverts_the_targets_and_gathering_equals_one_pass():
    split = detection_scenes(8, 30, 48)
    y = split.y_test
    out = _perfect_output(y, 10, 12)
    task = Detection(10, rows=y.shape[1])
    whole = task.tally(out[None], y[None])
    assert task.errors(whole)[0]["ap"] == pytest.approx(100.0)
    parts = None
    for i in range(0, 30, 7):  # batches of 7 images, the last one short
        parts = merge_tallies(task, parts, task.tally(out[None, i : i + 7], y[None, i : i + 7]))
    assert torch.equal(parts, whole)
    spoiled = out.clone()
    spoiled[:15, 10:12] += 0.6  # half the images' centres off by 0.6 cells: AP drops
    ap = task.errors(task.tally(spoiled[None], y[None]))[0]["ap"]
    assert 20.0 < ap < 95.0
    dets = decode(out, 10)
    assert dets.shape == (30, 20, 6) and bool((dets[..., 2:] >= 0).all())


def test_summed_tallies_are_unchanged():
    a, b = torch.tensor([[1, 4]]), torch.tensor([[2, 4]])
    assert torch.equal(merge_tallies(CLASSIFICATION, a, b), torch.tensor([[3, 8]]))


def test_loss_of_each_network_is_its_own():
    """Packed (S = 2) losses equal each network's alone, and each gradient is its own."""
    split = detection_scenes(8, 4, 32)
    task = Detection(10, rows=split.y_train.shape[1])
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(2, 4, 14, 8, 8, generator=gen, requires_grad=True)
    y = torch.stack([split.y_train[:4], split.y_train[4:]])
    both = task.loss(out, y)
    alone = torch.cat([task.loss(out[i : i + 1], y[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(both, alone)
    both[0].backward()
    assert out.grad[1].abs().sum() == 0 and out.grad[0].abs().sum() > 0


def test_cli_sweep_trains_detection_and_stores_ap(tmp_path):
    argv = [
        "sweep",
        "--task",
        "detection",
        "--no-pretrain",
        "--norms",
        "bn,gn",
        "--batch-sizes",
        "2",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--max-train",
        "12",
        "--image-size",
        "32",
        "--db",
        str(tmp_path / "d.db"),
        "--out",
        str(tmp_path / "rep"),
        "--workers",
        "1",
        "--quiet",
    ]
    assert main(argv) == 0
    with RunStore(tmp_path / "d.db", create=False) as store:
        records = store.records()
    assert len(records) == 2
    for r in records:
        m = r.final_metrics
        assert set(m) == {"ap_error", "ap", "ap50", "ap75"}
        assert r.final_error == pytest.approx(100.0 - m["ap"]) and 0 <= m["ap"] <= 100
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "Test COCO AP@[.5:.95]" in report and "Backbone trained from scratch" in report


def test_exported_coco_trains_through_data(tmp_path):
    """`normlab data export-coco` then `normlab sweep --task detection --data ...`."""
    assert main(["data", "export-coco", str(tmp_path / "c"), "--train", "8", "--val", "4",
                 "--image-size", "32"]) == 0  # fmt: skip
    argv = ["sweep", "--task", "detection", "--no-pretrain", "--norms", "gn",
            "--batch-sizes", "2", "--seeds", "1", "--epochs", "1", "--image-size", "32",
            "--data", str(tmp_path / "c/train.json"), "--val-data", str(tmp_path / "c/val.json"),
            "--db", str(tmp_path / "d.db"), "--out", str(tmp_path / "rep"), "--workers", "1",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    with RunStore(tmp_path / "d.db", create=False) as store:
        [record] = store.records()
    assert record.num_train == 8 and record.num_test == 4
    assert record.config.data.endswith("|val=" + str(tmp_path / "c/val.json"))
    assert set(record.final_metrics) == {"ap_error", "ap", "ap50", "ap75"}
