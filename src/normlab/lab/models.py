"""A small ResNet for the lab, with the norm layer chosen by registry name.

Layout: a 3×3 stem conv, then one stage per entry of ``widths``; the first stage keeps
the resolution and every later one halves it (stride-2 first conv and a 1×1 stride-2
projection shortcut). Each stage holds ``blocks`` basic blocks (conv-norm-ReLU-conv-norm
+ shortcut, ReLU). Global average pooling and a linear classifier close it.

With 16×16 inputs and five stages the last stage runs at 1×1, as real backbones do at
their deepest stage (ResNet-50 ends at 7×7 for ImageNet; at batch 2 that is 98 values
per BN statistic). What governs BN's small-batch penalty is the number of values behind
each batch statistic at the deepest norm layers, N × H × W: :func:`final_spatial_size`
gives H = W so that reports can say it.

Lab names may carry a suffix: ``"bn+recal"`` (BN whose running statistics the trainer
recomputes before evaluation) and ``"<norm>+sync"`` for a batch-statistics layer (``bn``,
``sn``, ``mabn``, ``brn``, ``evonorm_b0``) whose statistics are synchronized over the
default process group (:func:`normlab.distributed.convert_sync`; a no-op on one process).

Norm ``"mabn"`` is meant to follow a weight-centralized conv: when ``normlab.nn`` has
``CenteredConv2d``, the convs that feed a MABN layer use it (otherwise plain convs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..registry import NORM_LAYERS, auto_groups, create_norm

__all__ = ["ResNet", "build_model", "final_spatial_size", "is_synced", "resolve_norm"]

#: Lab-only variants: ``name -> registry layer``. ``bn+recal`` trains exactly like BN;
#: the trainer recalibrates its running statistics before evaluation.
VARIANTS = {"bn+recal": "bn"}
#: Registry names whose layers take ``process_group`` and so have a ``+sync`` variant.
SYNCABLE = ("bn", "sn", "mabn", "brn", "evonorm_b0")


def _known_names() -> list[str]:
    return sorted(set(NORM_LAYERS) | set(VARIANTS) | {f"{n}+sync" for n in SYNCABLE})


def resolve_norm(name: str) -> str:
    """Registry name behind a lab norm name (``"bn+recal"``, ``"bn+sync"`` -> ``"bn"``)."""
    key = name.lower().replace("-", "_")
    base = VARIANTS.get(key, key)
    if base.endswith("+sync"):
        base = base[: -len("+sync")]
        if base not in SYNCABLE:
            raise ValueError(
                f"norm {name!r}: '+sync' applies to layers with batch statistics "
                f"({', '.join(SYNCABLE)}); {base!r} has none to synchronize"
            )
    if base not in NORM_LAYERS:
        raise ValueError(
            f"unknown norm {name!r}: not in normlab.registry.NORM_LAYERS. "
            f"Known names: {', '.join(_known_names())}"
        )
    return base


def is_synced(name: str) -> bool:
    """True for a ``"<norm>+sync"`` lab name."""
    return name.lower().replace("-", "_").endswith("+sync")


def _norm(name: str, channels: int) -> nn.Module:
    if name == "gn":
        # The paper's G = 32, but at least 4 channels per group in the narrow early stages
        # (at 16 channels G = 32 would make GN an InstanceNorm).
        return create_norm("gn", channels, num_groups=auto_groups(channels, min(32, channels // 4)))
    if name == "frn":
        # The FRN paper: on 1×1 maps x/sqrt(x² + ε) is nearly sign(x) unless ε is
        # learned; our last stage is 1×1, so the lab always learns it.
        return create_norm("frn", channels, learnable_eps=True)
    return create_norm(name, channels)


def _conv(norm: str, cin: int, cout: int, k: int, stride: int) -> nn.Module:
    conv_cls: type[nn.Conv2d] = nn.Conv2d
    if norm == "mabn":
        from .. import nn as nnl

        conv_cls = getattr(nnl, "CenteredConv2d", nn.Conv2d)
    return conv_cls(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, norm: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(norm, cin, cout, 3, stride)
        self.norm1 = _norm(norm, cout)
        self.conv2 = _conv(norm, cout, cout, 3, 1)
        self.norm2 = _norm(norm, cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(norm, cin, cout, 1, stride), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet: stem, ``len(widths)`` stages of ``blocks`` basic blocks, linear head."""

    def __init__(
        self,
        norm: str,
        *,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128, 128),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        self.stem = nn.Sequential(
            _conv(norm, in_channels, widths[0], 3, 1), _norm(norm, widths[0]), nn.ReLU(inplace=True)
        )
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers = [
                BasicBlock(norm, cin if j == 0 else w, w, 2 if (i and not j) else 1)
                for j in range(blocks)
            ]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def final_spatial_size(image_size: int, num_stages: int) -> int:
    """H (= W) of the last stage for a square input (each stride-2 conv: ceil(h / 2))."""
    h = image_size
    for _ in range(num_stages - 1):
        h = (h + 1) // 2
    return h


def build_model(
    norm: str,
    *,
    in_channels: int,
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64, 128, 128),
    blocks: int = 1,
) -> ResNet:
    """The lab's ResNet with every norm layer built by ``create_norm(resolve_norm(norm), C)``.

    A ``"+sync"`` name gets its layers synchronized over the default process group.
    """
    model = ResNet(
        resolve_norm(norm),
        in_channels=in_channels,
        num_classes=num_classes,
        widths=widths,
        blocks=blocks,
    )
    if is_synced(norm):
        from ..distributed import convert_sync

        convert_sync(model, "world")
    return model
