"""Segmentation metrics from a confusion matrix, and the per-pixel loss.

The confusion matrix ``C`` of a whole test set counts, over every pixel whose target is
not ``ignore_index``, ``C[t, p]`` = pixels of true class t predicted as class p. From it:

- IoU of class c: ``TP / (TP + FP + FN)`` with TP = C[c, c], FP = column sum − TP,
  FN = row sum − TP; a class absent from both the targets and the predictions has a zero
  denominator and no IoU;
- mean IoU (%): the mean of the IoUs that exist, times 100;
- pixel error (%): 100 − 100 · trace(C) / sum(C).

Both are computed over the pooled pixels of the whole set (not averaged per image), the
standard definition for semantic segmentation benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.scenes import IGNORE_INDEX

__all__ = [
    "SegScores",
    "class_iou",
    "confusion_matrix",
    "evaluate_segmentation",
    "mean_iou",
    "pixel_error",
    "seg_cross_entropy",
    "seg_scores",
]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = target class, columns = predicted class.

    Args:
        pred: predicted class ids, any shape (e.g. ``logits.argmax(1)``).
        target: true class ids, the same shape; ``ignore_index`` pixels are skipped.

    Raises:
        ValueError: shapes differ, or a class id outside ``[0, num_classes)``.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    for what, v in (("target", t), ("pred", p)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(
                f"{what} holds class ids from {int(v.min())} to {int(v.max())}, outside "
                f"[0, {num_classes}) (and not the ignore index {ignore_index})"
            )
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def class_iou(conf: torch.Tensor) -> list[float]:
    """IoU of each class (a fraction), NaN where TP + FP + FN = 0 (class never seen)."""
    c = conf.double()
    tp = c.diagonal()
    denom = c.sum(0) + c.sum(1) - tp
    return [float(a / d) if d > 0 else math.nan for a, d in zip(tp, denom, strict=True)]


def mean_iou(conf: torch.Tensor) -> float:
    """Mean IoU in %, over the classes present in the targets or the predictions."""
    ious = [v for v in class_iou(conf) if not math.isnan(v)]
    if not ious:
        raise ValueError("the confusion matrix is empty: no pixel was scored")
    return 100.0 * sum(ious) / len(ious)


def pixel_error(conf: torch.Tensor) -> float:
    """Percentage of scored pixels whose predicted class is wrong."""
    total = int(conf.sum())
    if total == 0:
        raise ValueError("the confusion matrix is empty: no pixel was scored")
    return 100.0 * (total - int(conf.diagonal().sum())) / total


@dataclass(frozen=True)
class SegScores:
    """Scores of one evaluation: mean IoU and pixel error in %, mean loss per pixel."""

    miou: float
    pixel_error: float
    loss: float
    class_iou: tuple[float, ...]


def seg_scores(conf: torch.Tensor, loss: float = math.nan) -> SegScores:
    """:class:`SegScores` of a confusion matrix (``loss`` passed through)."""
    return SegScores(mean_iou(conf), pixel_error(conf), loss, tuple(class_iou(conf)))


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-pixel cross-entropy of ``(N, K, H, W)`` logits against ``(N, H, W)`` class ids.

    ``ignore_index`` pixels add nothing. ``"mean"`` averages over the scored pixels; a
    batch with none scores 0 (with a gradient of zeros), where ``F.cross_entropy`` would
    return NaN and poison the weights.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    scored = int((target != ignore_index).sum())
    return total / max(scored, 1)


@torch.no_grad()
def evaluate_segmentation(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> SegScores:
    """Scores of ``model`` on images ``x`` and targets ``y``, pooled over the whole set.

    Runs the model as it is (call ``model.eval()`` first for test-time statistics).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many targets as images, at least one: {len(x)} vs {len(y)}")
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, scored = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        t = y[i : i + batch_size].to(logits.device)
        loss_sum += float(seg_cross_entropy(logits, t, ignore_index, reduction="sum"))
        scored += int((t != ignore_index).sum())
        conf += confusion_matrix(logits.argmax(1), t, num_classes, ignore_index)
    return seg_scores(conf, loss_sum / max(scored, 1))
