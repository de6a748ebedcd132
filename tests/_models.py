"""A small ResNet-style model for the model-surgery tests (torchvision is not a dependency).

It has what real models have and converters get wrong: BatchNorm inside nested
Sequentials, a ModuleList of blocks, a ModuleDict head, convs without bias, a
projection shortcut, a Linear + BatchNorm1d pair, and one BatchNorm registered
in two places (the same object used twice in forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Norm = Callable[[int], nn.Module]


class Block(nn.Module):
    """Basic residual block: conv-norm-relu-conv-norm (+ shortcut), relu."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Norm) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            norm(cout),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)),
        )
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=True), norm(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, two stages (ModuleList), a shared-BN refinement, a ModuleDict head.

    Args:
        width: channels of the first stage (the second has ``2 * width``).
        norm2d / norm1d: factories ``norm(C)`` for the conv and the head norms.
        classes: outputs.
    """

    def __init__(
        self,
        width: int = 8,
        norm2d: Norm = nn.BatchNorm2d,
        norm1d: Norm = nn.BatchNorm1d,
        classes: int = 5,
    ) -> None:
        super().__init__()
        w2 = 2 * width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), norm2d(width), nn.ReLU()
        )
        self.stages = nn.ModuleList([Block(width, width, 1, norm2d), Block(width, w2, 2, norm2d)])
        shared = norm2d(w2)
        self.refine = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(w2, w2, 1), shared),
                nn.Sequential(nn.Conv2d(w2, w2, 1), shared),
            ]
        )
        self.head = nn.ModuleDict(
            {
                "pool": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                "fc": nn.Sequential(
                    nn.Linear(w2, w2), norm1d(w2), nn.ReLU(), nn.Linear(w2, classes)
                ),
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.stages:
            x = block(x)
        for r in self.refine:
            x = x + torch.relu(r(x))
        return self.head["fc"](self.head["pool"](x))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN-like layer non-trivial γ, β and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, lo, hi in (
                ("weight", 0.5, 1.5),
                ("bias", -0.5, 0.5),
                ("running_mean", -0.5, 0.5),
                ("running_var", 0.5, 2.0),
            ):
                t = getattr(m, name, None)
                if (
                    isinstance(t, Tensor)
                    and t.dim() == 1
                    and not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                ):
                    r = torch.rand(t.shape, generator=g, dtype=torch.float64)
                    t.copy_(lo + (hi - lo) * r)
    return model


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs) -> TinyResNet:
    """A TinyResNet with random weights and random BN state, in ``dtype``."""
    torch.manual_seed(seed)
    return randomize_bn(TinyResNet(**kwargs), seed).to(dtype)


def inputs(n: int = 4, size: int = 8, dtype: torch.dtype = torch.float64, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)).to(dtype)
