"""A small U-Net for the lab's segmentation task, with the norm layer chosen by lab name.

Layout for ``widths = (w0, w1, ..., wL)``: an encoder level per width, each two 3×3
conv-norm-activation layers; level 0 keeps the input resolution and every later level
halves it with a stride-2 first conv. The decoder walks back up: a 2×2 stride-2
transposed conv (with bias, no norm) doubles the resolution and maps w_{l+1} to w_l
channels, the encoder's level-l features are concatenated (the skip connection), and two
conv-norm-activation layers fuse the 2·w_l channels into w_l. A 1×1 conv (with bias) maps
w0 channels to per-pixel class logits ``(N, num_classes, S, S)``. The input side must be
divisible by ``2 ** (len(widths) - 1)``.

The norm layers, convs and activations are built exactly as in the lab's ResNet
(:mod:`normlab.lab.models.resnet`): the same lab names (``"bn"``, ``"gn"``, ``"bn+recal"``,
``"bn+sync"``, ...), the same GroupNorm group count and learned FRN ε, FRN's TLU in place
of the ReLU after a norm, and weight-centralized convs in front of MABN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...registry import NORM_LAYERS
from . import resnet as models
from .resnet import SYNCABLE, VARIANTS, resolve_norm, sync_if_asked

__all__ = ["UNet", "build_segmentation_model", "segmentation_norms"]


def _conv_norm_act(norm: str, cin: int, cout: int, stride: int) -> nn.Sequential:
    # The lab's private builders: one place decides a norm's layer, conv and activation.
    return nn.Sequential(
        models._conv(norm, cin, cout, 3, stride),
        models._norm(norm, cout),
        models._activation_after(norm),
    )


def _double(norm: str, cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        _conv_norm_act(norm, cin, cout, stride), _conv_norm_act(norm, cout, cout, 1)
    )


class UNet(nn.Module):
    """Encoder-decoder with skip concatenations and a 1×1 head (layout in the module docstring).

    ``norm`` is a registry name (already resolved, e.g. ``"bn"`` for ``"bn+recal"``).
    """

    def __init__(
        self,
        norm: str,
        *,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be one or more positive channel counts, got {widths}")
        if in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}"
            )
        self.widths = widths
        self.encoder = nn.ModuleList(
            _double(norm, in_channels if i == 0 else widths[i - 1], w, 1 if i == 0 else 2)
            for i, w in enumerate(widths)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in range(len(widths) - 1)
        )
        self.decoder = nn.ModuleList(
            _double(norm, 2 * widths[i], widths[i], 1) for i in range(len(widths) - 1)
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.widths) - 1)
        if x.ndim != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"UNet with {len(self.widths)} levels needs (N, C, H, W) input with H and W "
                f"divisible by {factor}, got shape {tuple(x.shape)}; resize the images"
            )
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


def _check_2d(norm: str, base: str) -> None:
    layer = models._norm(base, 4)
    kind = type(layer).__name__
    if kind.endswith(("1d", "3d")):
        raise ValueError(
            f"norm {norm!r} builds {kind}, which normalizes {kind[-2:].upper()} inputs; the "
            "segmentation net needs a 2-D norm (for example 'bn', 'gn', 'frn')"
        )


def segmentation_norms() -> list[str]:
    """Every lab norm name :func:`build_segmentation_model` accepts (the 2-D ones)."""
    names = sorted(set(NORM_LAYERS) | set(VARIANTS) | {f"{n}+sync" for n in SYNCABLE})
    out = []
    for name in names:
        try:
            _check_2d(name, resolve_norm(name))
        except ValueError:
            continue
        out.append(name)
    return out


def build_segmentation_model(
    norm: str,
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
) -> nn.Module:
    """The lab's U-Net with every norm layer built for the lab name ``norm``.

    A ``"+sync"`` name gets its layers synchronized over the default process group
    (a no-op on one process), as :func:`normlab.lab.models.resnet.build_model` does.

    Raises:
        ValueError: unknown norm name, a norm for 1-D or 3-D inputs, or bad sizes.
    """
    base = resolve_norm(norm)
    _check_2d(norm, base)
    model = UNet(base, in_channels=in_channels, num_classes=num_classes, widths=widths)
    return sync_if_asked(model, norm)
