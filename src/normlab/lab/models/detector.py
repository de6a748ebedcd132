"""The lab's detector: a small CenterNet (anchor-free) with norms from the registry.

Layout for ``widths = (w0, w1, w2)`` and ``neck`` channels n:

* backbone (:class:`Backbone`): a 3×3 stride-2 stem conv-norm-activation (w0, stride 2),
  then two of the lab ResNet's basic blocks (:class:`normlab.lab.models.resnet.BasicBlock`),
  each stride 2: w1 at stride 4 and w2 at stride 8;
* neck: an FPN step: 1×1 lateral convs to n channels, the stride-8 map upsampled ×2
  (nearest) and added to the stride-4 one, then a 3×3 conv-norm-activation;
* head: two towers of one 3×3 conv-norm-activation each, then a 1×1 conv (with bias):
  K class heatmap logits (bias −2.19, so every location starts at p ≈ 0.1, as in
  CenterNet) and 4 box channels: the centre's sub-cell offset (x, y) and the box size
  (log w, log h), in units of the stride-4 map's cells.

Output: ``(B, K + 4, S/4, S/4)``. :mod:`normlab.lab.tasks.detection` turns it into a loss
and, by decoding (heatmap peaks by 3×3 max-pool NMS, top-k), into boxes.

Every norm layer of backbone, neck and head is the run's registry layer, built as in the
lab's ResNet (GN's group count, FRN's learned ε and TLU, MABN's centred convs). The
backbone alone is what :mod:`normlab.lab.run.pretrain` pretrains on the classification
images (with :class:`Classifier`'s pooled linear head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import resnet as models
from .resnet import BasicBlock

__all__ = ["STRIDE", "Backbone", "Classifier", "Detector", "build_detector"]

#: Stride of the detector's output map.
STRIDE = 4
_PRIOR_BIAS = -2.19  # log(0.1 / 0.9)


def _cna(norm: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        models._conv(norm, cin, cout, k, stride),
        models._norm(norm, cout),
        models._activation_after(norm),
    )


class Backbone(nn.Module):
    """Stem (stride 2) and two basic blocks (strides 4 and 8); returns both feature maps."""

    def __init__(self, norm: str, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        w0, w1, w2 = widths
        self.widths = (w0, w1, w2)
        self.stem = _cna(norm, in_channels, w0, 3, 2)
        self.stage1 = BasicBlock(norm, w0, w1, 2)
        self.stage2 = BasicBlock(norm, w1, w2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.stage1(self.stem(x))
        return c4, self.stage2(c4)


class Classifier(nn.Module):
    """A backbone with global average pooling and a linear head: what pretraining trains."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)[1].mean(dim=(2, 3)))


class Detector(nn.Module):
    """Backbone, FPN neck and CenterNet head (module docstring)."""

    def __init__(
        self,
        norm: str,
        *,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        neck: int = 32,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = Backbone(norm, in_channels, widths)
        w = self.backbone.widths
        self.lateral4 = nn.Conv2d(w[1], neck, 1)
        self.lateral8 = nn.Conv2d(w[2], neck, 1)
        self.fuse = _cna(norm, neck, neck)
        self.heat_tower = _cna(norm, neck, neck)
        self.box_tower = _cna(norm, neck, neck)
        self.heat = nn.Conv2d(neck, num_classes, 1)
        self.box = nn.Conv2d(neck, 4, 1)
        nn.init.constant_(self.heat.bias, _PRIOR_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c4, c8 = self.backbone(x)
        p = self.lateral4(c4) + F.interpolate(self.lateral8(c8), size=c4.shape[-2:])
        p = self.fuse(p)
        return torch.cat([self.heat(self.heat_tower(p)), self.box(self.box_tower(p))], 1)


def build_detector(
    norm: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    neck: int = 32,
) -> Detector:
    """The lab's detector with registry layer ``norm`` (a registry name, e.g. ``"bn"``)."""
    if len(widths) != 3:
        raise ValueError(
            f"the detector has three backbone widths (stem, stride 4, stride 8), got {list(widths)}"
        )
    return Detector(
        norm, num_classes=num_classes, in_channels=in_channels, widths=widths, neck=neck
    )
