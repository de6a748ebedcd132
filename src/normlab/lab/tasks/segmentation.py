"""The segmentation task of a lab run: its loss and metrics, its default model, its data.

``RunConfig.task = "segmentation"`` (``normlab sweep --task segmentation``) trains the
lab's U-Net (:func:`normlab.lab.models.unet.build_segmentation_model`, the run's norm in
every norm layer) on per-pixel labels: the built-in silhouette scenes
(:mod:`normlab.lab.data.scenes`) or the user's folder of ``images/`` and ``masks/``
(:mod:`normlab.lab.data.seg_folder`).

Metrics (:class:`Segmentation`), in %, all from one confusion matrix per network summed
over the whole evaluated set, so that mean IoU is the pooled-pixel mIoU of the set, not a
mean of per-batch values:

* ``miou_error`` = 100 − mean IoU: the *headline* error (``EpochStats.test_error``,
  ``RunRecord.final_error``). It is "lower is better" like the classification error, so
  the report's statistics (means, CIs, Welch tests, resolvable differences) apply
  unchanged, and a difference in it is exactly the difference in mIoU points;
* ``miou``: mean IoU over the classes present in the targets or the predictions;
* ``pixel_error``: the share of scored pixels whose predicted class is wrong.

Pixels whose target is the ignore index (255) count in neither the loss nor the metrics.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.det_coco import load_detection_split
from ..data.images import load_split
from ..data.seg_folder import load_seg_split
from ..defaults import DETECTION_TASK, SEGMENTATION_TASK
from ..models.unet import build_segmentation_model
from .seg_metrics import confusion_matrix, mean_iou, pixel_error, seg_cross_entropy

if TYPE_CHECKING:
    from ..data.images import Split
    from ..data.scenes import SegSplit
    from ..run.config import RunConfig

__all__ = ["SEGMENTATION_METRICS", "Segmentation", "load_task_split", "segmentation_model"]

#: What :class:`Segmentation` reports, headline first.
SEGMENTATION_METRICS = ("miou_error", "miou", "pixel_error")


class Segmentation:
    """Per-pixel cross-entropy; mIoU error, mIoU and pixel error (module docstring).

    ``output``: logits (S, B, K, H, W); ``target``: class ids (S, B, H, W), with
    ``ignore_index`` for void pixels. Tally per network: the K × K confusion matrix
    (rows: target class, columns: predicted class), flattened.
    """

    metrics: tuple[str, ...] = SEGMENTATION_METRICS

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 2:
            raise ValueError(f"segmentation needs >= 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Each network's own mean over its scored pixels: no loss mixes networks.
        return torch.stack(
            [
                seg_cross_entropy(o, t, self.ignore_index)
                for o, t in zip(output, target, strict=True)
            ]
        )

    def tally(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = output.argmax(2)
        return torch.stack(
            [
                confusion_matrix(p, t, self.num_classes, self.ignore_index).flatten()
                for p, t in zip(pred, target, strict=True)
            ]
        )

    def errors(self, tally: torch.Tensor) -> list[dict[str, float]]:
        out = []
        k = self.num_classes
        for counts in tally:
            conf = counts.view(k, k)
            if int(conf.sum()) == 0:  # no scored pixel: no metric
                out.append(dict.fromkeys(self.metrics, math.nan))
                continue
            miou = mean_iou(conf)
            out.append({"miou_error": 100.0 - miou, "miou": miou, "pixel_error": pixel_error(conf)})
        return out


def segmentation_model(config: RunConfig, split: SegSplit, packs: int = 1) -> nn.Module:
    """The default model builder of a segmentation run: the lab's U-Net with the run's
    norm, levels of ``config.widths`` channels. One network per run (unpacked)."""
    if packs != 1:
        raise ValueError(
            f"the segmentation U-Net trains one seed per model; it cannot be packed {packs} "
            "seeds side by side (sweep with pack=False)"
        )
    return build_segmentation_model(
        config.norm,
        num_classes=split.num_classes,
        in_channels=split.in_channels,
        widths=config.widths,
    )


def load_task_split(
    task: str, data: str | None, image_size: int, max_train: int | None
) -> Split | SegSplit:
    """The (cached) data of a run of ``task``: classification images, segmentation scenes
    or detection scenes (:func:`~normlab.lab.data.det_coco.load_detection_split`).

    Raises:
        DataError: the data cannot be loaded for this task (e.g. a classification folder
            for segmentation, or masks that do not fit their images).
    """
    if task == SEGMENTATION_TASK:
        return load_seg_split(data, image_size, max_train)
    if task == DETECTION_TASK:
        return load_detection_split(data, image_size, max_train)
    return load_split(data, image_size, max_train)
