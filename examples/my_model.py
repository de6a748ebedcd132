"""Your own network in the normlab lab: a small plain-torch CNN that ``normlab sweep`` can train.

Sweep it over norms, batch sizes and seeds on the lab's built-in data (Animal-MNIST
resized to 16×16: 10 classes, 1 channel)::

    normlab sweep --model examples/my_model.py:build --norms bn,gn --batch-sizes 2,8 --seeds 2

``--model`` takes ``path/to/file.py:factory`` or ``package.module:factory``. The lab calls
the factory with the keywords it names among ``num_classes=``, ``in_channels=`` and
``norm_layer=``, then swaps every ``nn.BatchNorm2d`` for the norm of each run (``gn``,
``frn``, ``sn``, ...) with :func:`normlab.convert.convert_norms`. Write the model with
BatchNorm and the lab does the rest; a factory that also takes ``norm_layer=`` gets the
run's norm layer directly. Editing this file makes new runs (the file's hash keys them).

Run it (``python examples/my_model.py``) to see what the lab does to it for two norms
and a few training steps on random data.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    """conv 3×3 (no bias: the norm's β replaces it), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (16×16 -> 8×8 -> 4×4), global average pooling, a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width, 1),
            _block(width, 2 * width, 2),
            _block(2 * width, 2 * width, 1),
            _block(2 * width, 4 * width, 2),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The factory ``--model examples/my_model.py:build`` names: a fresh, untrained SmallCNN."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


if __name__ == "__main__":
    from normlab.lab.user_model import build_user_model, load_factory

    factory = load_factory(f"{__file__}:build")
    print(f"{factory.name} (source hash {factory.source_hash})")
    x = 0.5 + 0.3 * torch.randn(64, 1, 16, 16)  # off-center, as images are
    y = torch.randint(0, 10, (64,))
    for norm in ("bn", "gn"):
        model, summary = build_user_model(
            factory, norm, num_classes=10, in_channels=1, image_size=16, seed=0
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(20):
            i = torch.randint(0, 64, (8,))
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(
            f"{norm}: {summary.converted} layers -> {summary.new_types}, "
            f"{summary.num_parameters} parameters, loss after 20 steps {loss.item():.3f}"
        )
