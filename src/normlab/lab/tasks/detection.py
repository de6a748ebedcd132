"""The detection task of a lab run: CenterNet's loss, decoding, COCO AP by pycocotools.

``RunConfig.task = "detection"`` (``normlab sweep --task detection``) trains the lab's
detector (:mod:`normlab.lab.models.detector`) on the built-in detection scenes
(:mod:`normlab.lab.data.det_scenes`) or a COCO annotations file
(:mod:`normlab.lab.data.det_coco`). Targets are ``(S, B, M, 5)`` rows ``[class, x1, y1,
x2, y2]`` (class −1: padding); the model's output is ``(S, B, K + 4, h, w)`` on the
stride-4 map.

Loss (:class:`Detection`, per network, after CenterNet, Zhou et al. 2019): each object's
centre ``(cx, cy)`` on the map marks the peak cell ``(⌊cx⌋, ⌊cy⌋)`` of a Gaussian of
σ = max(0.5, √(w·h)/6) map cells in its class's heatmap (the maximum where two overlap);
the heatmap's penalty-reduced focal loss (α = 2, β = 4) over all cells, plus, at each
object's peak cell, the L1 loss of the sub-cell offset and of the log of the size in
cells (both weight 1; a log size makes the error relative, as IoU is), all divided by
the network's number of objects (at least 1).

Decoding (:func:`decode`): heatmap probabilities, the local maxima of a 3×3 max-pool
(CenterNet's NMS), the top :data:`TOP_K` over classes and cells; each box from its cell,
offset and size (e to the predicted log size), scaled by the stride and clipped to the image.

Metrics, in %: ``ap_error`` = 100 − AP (the headline, "lower is better" like the other
tasks' errors, so the report's statistics and ``normlab compare`` apply unchanged),
``ap`` (AP@[.5:.95]), ``ap50``, ``ap75``, by :func:`~normlab.lab.tasks.detection_ap.coco_ap`.
AP is not a sum of per-batch counts, so the task *gathers* (:attr:`Detection.gathers`):
its tally holds each image's decoded detections and its targets, concatenated over
batches (and ranks), and scored once at the end.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import DETECTION_FROZEN
from ..models.detector import STRIDE, build_detector
from ..models.resnet import resolve_norm, sync_if_asked
from .detection_ap import coco_ap

if TYPE_CHECKING:
    from ..data.det_scenes import DetSplit
    from ..run.config import RunConfig

__all__ = [
    "DETECTION_METRICS",
    "TOP_K",
    "Detection",
    "decode",
    "detection_model",
]

#: What :class:`Detection` reports, headline first.
DETECTION_METRICS = ("ap_error", "ap", "ap50", "ap75")
#: Detections kept per image.
TOP_K = 20
_SIZE_WEIGHT = 1.0
_MAX_LOG_SIZE = 8.0  # cells: e^8 is far beyond any map, so decoding never overflows


def _heat_targets(target: torch.Tensor, k: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Heatmaps (N, K, h, w), peak cells (N, M) as flat indices, offsets and sizes (N, M, 2),
    and the valid-object mask (N, M), from targets (N, M, 5)."""
    valid = target[..., 0] >= 0
    x1, y1, x2, y2 = (target[..., i] / STRIDE for i in range(1, 5))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    ix, iy = cx.floor().clamp(0, w - 1), cy.floor().clamp(0, h - 1)
    sigma = ((x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)).sqrt().div(6).clamp_min(0.5)
    gy = torch.arange(h, dtype=target.dtype, device=target.device).view(1, 1, h, 1)
    gx = torch.arange(w, dtype=target.dtype, device=target.device).view(1, 1, 1, w)
    d2 = (gx - ix[..., None, None]) ** 2 + (gy - iy[..., None, None]) ** 2
    gauss = torch.exp(-d2 / (2 * sigma[..., None, None] ** 2)) * valid[..., None, None]
    onehot = F.one_hot(target[..., 0].clamp_min(0).long(), k).to(target.dtype)
    heat = (gauss[:, :, None] * onehot[..., None, None]).amax(1)
    cell = (iy * w + ix).long()
    offset = torch.stack([cx - ix, cy - iy], -1)
    size = torch.stack([x2 - x1, y2 - y1], -1).clamp_min(1e-3).log()
    return heat, cell, offset, size, valid


def _losses(output: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Each image's loss terms summed, and its number of objects: (N, 2)."""
    n, _, h, w = output.shape
    heat, cell, offset, size, valid = _heat_targets(target, k, h, w)
    logits = output[:, :k]
    pos = heat >= 1.0 - 1e-6
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    focal = torch.where(pos, (1 - p) ** 2 * log_p, (1 - heat) ** 4 * p**2 * log_q)
    box = output[:, k:].flatten(2).gather(2, cell[:, None].expand(-1, 4, -1))  # (N, 4, M)
    box = box.transpose(1, 2)
    mask = valid[..., None].to(output.dtype)
    l1 = ((box[..., :2] - offset).abs() + _SIZE_WEIGHT * (box[..., 2:] - size).abs()) * mask
    total = -focal.flatten(1).sum(1) + l1.flatten(1).sum(1)
    return torch.stack([total, valid.sum(1).to(output.dtype)], 1)


def decode(output: torch.Tensor, num_classes: int, top_k: int = TOP_K) -> torch.Tensor:
    """Detections (N, top_k, 6) ``[score, class, x1, y1, x2, y2]`` in input pixels from
    an output (N, K + 4, h, w) (module docstring)."""
    n, _, h, w = output.shape
    heat = output[:, :num_classes].sigmoid()
    heat = heat * (heat == F.max_pool2d(heat, 3, 1, 1))
    scores, idx = heat.flatten(1).topk(min(top_k, num_classes * h * w), dim=1)
    cls, pix = idx // (h * w), idx % (h * w)
    box = output[:, num_classes:].flatten(2).gather(2, pix[:, None].expand(-1, 4, -1))
    cx = (pix % w).to(output.dtype) + box[:, 0]
    cy = (pix // w).to(output.dtype) + box[:, 1]
    bw, bh = box[:, 2].clamp(max=_MAX_LOG_SIZE).exp(), box[:, 3].clamp(max=_MAX_LOG_SIZE).exp()
    xs = torch.stack([cx - bw / 2, cx + bw / 2], -1).mul(STRIDE).clamp(0, w * STRIDE)
    ys = torch.stack([cy - bh / 2, cy + bh / 2], -1).mul(STRIDE).clamp(0, h * STRIDE)
    return torch.stack(
        [scores, cls.to(output.dtype), xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], -1
    )


class Detection:
    """CenterNet loss; ``ap_error``, ``ap``, ``ap50``, ``ap75`` by pycocotools (module doc).

    Tally per network (float32): for every image, its :func:`decode`'d detections
    (``top_k · 6`` values) and its targets (``M · 5``), one row after the other; tallies
    of batches and ranks are concatenated (:attr:`gathers`), not summed.
    """

    metrics: tuple[str, ...] = DETECTION_METRICS
    #: The loop concatenates this task's tallies instead of summing them.
    gathers = True

    def __init__(self, num_classes: int, rows: int, top_k: int = TOP_K) -> None:
        if num_classes < 1 or rows < 1:
            raise ValueError(
                f"detection needs >= 1 class and >= 1 target row, got {num_classes}, {rows}"
            )
        self.num_classes = num_classes
        #: Target rows per image (M; the same in the training and the test targets).
        self.rows = rows
        self.top_k = top_k

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s, b = output.shape[:2]
        terms = _losses(
            output.flatten(0, 1), target.flatten(0, 1).to(output.dtype), self.num_classes
        )
        per_net = terms.view(s, b, 2).sum(1)
        return per_net[:, 0] / per_net[:, 1].clamp_min(1.0)

    def tally(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s, b = output.shape[:2]
        dets = decode(output.flatten(0, 1), self.num_classes, self.top_k)
        rows = torch.cat([dets.flatten(1), target.flatten(0, 1).flatten(1).to(dets.dtype)], 1)
        return rows.float().reshape(s, -1)

    def recal_variance(self, norm: str) -> None:
        """No recalibration before evaluation: a detection run's ``bn+recal`` re-estimates
        the pretrained statistics once, before fine-tuning (:mod:`normlab.lab.run.pretrain`)."""
        return None

    def errors(self, tally: torch.Tensor) -> list[dict[str, float]]:
        out = []
        width = self.top_k * 6
        for flat in tally:
            values = flat.numpy().astype(np.float64)
            if values.size == 0:
                out.append(dict.fromkeys(self.metrics, math.nan))
                continue
            rows = values.reshape(-1, width + 5 * self.rows)
            dets = [r[:width].reshape(-1, 6) for r in rows]
            gts = [r[width:].reshape(-1, 5) for r in rows]
            ap = coco_ap(dets, gts, self.num_classes)
            out.append({"ap_error": 100.0 - ap["ap"], **ap})
        return out


def detection_model(config: RunConfig, split: DetSplit, packs: int = 1) -> nn.Module:
    """The default model builder of a detection run trained from scratch: the lab's
    detector with the run's norm. One network per run (unpacked). A pretrained run
    (``config.pretrain``) is built by :class:`normlab.lab.run.pretrain.DetectionBuilder`."""
    if config.norm in DETECTION_FROZEN:
        raise ValueError(
            f"norm {config.norm!r} freezes a pretrained backbone's statistics; a detector "
            "trained from scratch has none: pretrain it (normlab.lab.run.pretrain)"
        )
    if config.pretrain is not None:
        raise ValueError(
            f"run {config.norm}@{config.batch_size} fine-tunes a pretrained backbone "
            f"({config.pretrain}); train it with build=normlab.lab.run.pretrain.DetectionBuilder()"
        )
    if packs != 1:
        raise ValueError(
            f"the lab's detector trains one seed per model; it cannot be packed {packs} "
            "seeds side by side (sweep with pack=False)"
        )
    model = build_detector(
        resolve_norm(config.norm),
        num_classes=split.num_classes,
        in_channels=split.in_channels,
        widths=config.widths,
    )
    return sync_if_asked(model, config.norm)
