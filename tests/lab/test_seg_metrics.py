"""Segmentation metrics against a float64 NumPy reference and a hand-computed example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normlab.lab.tasks.seg_metrics import (
    class_iou,
    confusion_matrix,
    evaluate_segmentation,
    mean_iou,
    pixel_error,
    seg_cross_entropy,
    seg_scores,
)


def _reference(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> tuple[float, float]:
    """mIoU (%) and pixel error (%) pixel by pixel, in float64."""
    keep = target != ignore
    p, t = pred[keep], target[keep]
    ious = []
    for c in range(k):
        tp = np.sum((p == c) & (t == c), dtype=np.float64)
        fp = np.sum((p == c) & (t != c), dtype=np.float64)
        fn = np.sum((p != c) & (t == c), dtype=np.float64)
        if tp + fp + fn > 0:
            ious.append(tp / (tp + fp + fn))
    return 100.0 * float(np.mean(ious)), 100.0 * float(np.mean(p != t))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_predictions_match_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    k = 6
    target = rng.integers(0, k - 1, size=(5, 9, 11))  # class k-1 never a target
    target[rng.random(target.shape) < 0.15] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, target.shape))
    pred[pred == 255] = 2
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k)
    assert int(conf.sum()) == int((target != 255).sum())
    miou, err = _reference(pred, target, k, 255)
    assert mean_iou(conf) == pytest.approx(miou, rel=1e-12)
    assert pixel_error(conf) == pytest.approx(err, rel=1e-12)
    assert 0.0 < miou < 100.0 and 0.0 < err < 100.0


def test_hand_computed_example():
    # target  0 0 1 | pred 0 1 1
    #         2 2 V |      2 0 0    (V = void, ignored)
    target = torch.tensor([[0, 0, 1], [2, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    conf = confusion_matrix(pred, target, num_classes=4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # IoU: class 0 = 1/(1+1+1) (TP 1, FP 1 from the 2, FN 1 to class 1); class 1 = 1/2;
    # class 2 = 1/2; class 3 never occurs and is left out of the mean.
    ious = class_iou(conf)
    assert ious[:3] == pytest.approx([1 / 3, 1 / 2, 1 / 2]) and math.isnan(ious[3])
    assert mean_iou(conf) == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert pixel_error(conf) == pytest.approx(100 * 2 / 5)
    scores = seg_scores(conf, loss=0.25)
    assert scores.miou == pytest.approx(mean_iou(conf)) and scores.loss == 0.25


def test_class_only_predicted_counts_in_the_mean():
    target = torch.zeros(4, dtype=torch.int64)
    pred = torch.tensor([0, 0, 0, 1])
    conf = confusion_matrix(pred, target, 3)
    assert mean_iou(conf) == pytest.approx(100 * (3 / 4 + 0.0) / 2)


def test_confusion_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="empty"):
        mean_iou(confusion_matrix(torch.tensor([1]), torch.tensor([255]), 3))


def test_cross_entropy_matches_float64_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.5, 2.0, size=(3, 5, 4, 6))
    target = rng.integers(0, 5, size=(3, 4, 6))
    target[rng.random(target.shape) < 0.3] = 255
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    keep = target != 255
    picked = np.take_along_axis(log_p, np.where(keep, target, 0)[:, None], 1)[:, 0]
    expected = -picked[keep].mean()
    got = seg_cross_entropy(torch.tensor(logits), torch.from_numpy(target))
    assert float(got) == pytest.approx(expected, rel=1e-10)
    total = seg_cross_entropy(torch.tensor(logits), torch.from_numpy(target), reduction="sum")
    assert float(total) == pytest.approx(expected * keep.sum(), rel=1e-10)


def test_cross_entropy_of_an_all_void_batch_is_zero_not_nan():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = seg_cross_entropy(logits, torch.full((2, 4, 4), 255))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_evaluate_pools_pixels_over_batches():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(7, 3, 6, 6)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=(7, 6, 6)))
    y[0, :2] = 255
    model = torch.nn.Conv2d(3, 3, 1)
    scores = evaluate_segmentation(model, x, y, 3, batch_size=3)
    with torch.no_grad():
        logits = model(x)
    conf = confusion_matrix(logits.argmax(1), y, 3)
    assert scores.miou == pytest.approx(mean_iou(conf))
    assert scores.pixel_error == pytest.approx(pixel_error(conf))
    assert scores.loss == pytest.approx(float(seg_cross_entropy(logits, y)), rel=1e-5)
