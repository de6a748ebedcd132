"""Heads shared across pyramid levels: a small FPN-style one and torchvision's RetinaNet head.

A detector's head runs once per feature level with the same modules. With BatchNorm
inside, one BN sees every level (what ``bn_shared_across_calls`` reports); one norm per
level, or GroupNorm, does not.
"""

from __future__ import annotations

import importlib

from torch import Tensor, nn

from zoo._zoo import require

LEVELS = 3


class SharedHeadFPN(nn.Module):
    """Three levels (strides 1, 2, 4), one head applied to each.

    ``per_level_norm=True`` keeps the head's convs shared but gives each level its own BN
    (mmdetection's fix); otherwise the head's BN is called once per level.
    """

    def __init__(self, channels: int = 16, per_level_norm: bool = False) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Conv2d(3, channels, 3, stride=2**i, padding=1) for i in range(LEVELS)
        )
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        count = LEVELS if per_level_norm else 1
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(count))
        self.out = nn.Conv2d(channels, 4, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, level in enumerate(self.levels):
            norm = self.norms[i % len(self.norms)]
            outs.append(self.out(norm(self.conv(level(x))).relu()))
        return outs


def retinanet(bn_head: bool) -> nn.Module:
    """torchvision's RetinaNet v2 without weights; ``bn_head``: its head built with
    ``norm_layer=nn.BatchNorm2d`` (torchvision's default is GroupNorm(32))."""
    require("torchvision")
    det = importlib.import_module("torchvision.models.detection")
    rn = importlib.import_module("torchvision.models.detection.retinanet")
    model = det.retinanet_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=5, min_size=64, max_size=64
    )
    if bn_head:
        anchors = model.anchor_generator.num_anchors_per_location()[0]
        model.head = rn.RetinaNetHead(256, anchors, 5, norm_layer=nn.BatchNorm2d)
    return model
