"""The detection task of a user's torchvision-style detector (``--task detection --model``).

Such a detector computes its own losses inside ``forward`` from the targets
(:mod:`normlab.lab.models.user_detector`), so this task runs the model itself
(:meth:`DetectorAPI.forward`, which the loop calls instead of ``model(x)``; see
:func:`normlab.lab.tasks.task.run_model`): in training the output is the sum of the
model's losses, one value per network (S = 1); in eval mode it is the model's detections
as rows ``[score, class, x1, y1, x2, y2]``, (S, B, top_k, 6). Scoring is the lab
detector's (:class:`normlab.lab.tasks.detection.Detection`): the same COCO AP by
pycocotools over every test image, the same metrics. A training batch gives losses and
no detections, so such a run's train AP is not measured (NaN).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.user_detector import API_TOP_K, to_rows, to_targets
from .detection import Detection

__all__ = ["DetectorAPI"]


class DetectorAPI(Detection):
    """Detection with a torchvision-style detector: its losses, its detections, COCO AP."""

    def __init__(self, num_classes: int, rows: int, top_k: int = API_TOP_K) -> None:
        super().__init__(num_classes, rows, top_k)

    def forward(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The output (S, ...) of ``model`` on images ``x`` (B, C, H, W) with target rows
        ``target`` (S, B, M, 5): the summed losses (1, 1) in training, else the detection
        rows (1, B, top_k, 6) (module docstring)."""
        if target.shape[0] != 1:
            raise ValueError("a torchvision-style detector trains one seed per model")
        images = list(x)
        if model.training:
            targets = [{k: v.to(x.device) for k, v in t.items()} for t in to_targets(target[0])]
            losses = model(images, targets)
            return torch.stack([v.reshape(()) for v in losses.values()]).sum().reshape(1, 1)
        return to_rows(model(images), self.top_k).to(x.device).unsqueeze(0)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output[:, 0]

    def tally(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() == 2:  # training: losses, no detections to score
            return output.new_zeros(output.shape[0], 0, dtype=torch.float32)
        rows = torch.cat([output.flatten(2), target.flatten(2).to(output.dtype)], 2)
        return rows.float().reshape(output.shape[0], -1)
