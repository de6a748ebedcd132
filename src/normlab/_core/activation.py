"""The activations a norm layer can fuse (``act=``): the one list, its check and its
torch path.

The Triton kernels fuse them into the normalization's output pass; on every other
path :func:`activation` applies the same function after the norm, so ``act`` never
changes what a layer computes, only how many passes it takes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "activation", "check_act"]

#: In this order: a Triton kernel receives the index as a constexpr (0 none, 1 SiLU, 2 ReLU).
ACTIVATIONS = (None, "silu", "relu")


def check_act(layer: str, act: str | None) -> None:
    """Refuses an ``act`` the kernels cannot fuse, naming the ones they can."""
    if act not in ACTIVATIONS:
        raise ValueError(
            f"{layer}: act must be one of {ACTIVATIONS} (the activations fused into the "
            f"norm's kernel), got {act!r}; apply any other activation after the layer."
        )


def activation(y: Tensor, act: str | None) -> Tensor:
    """``act(y)`` for an ``act`` that passed :func:`check_act` (torch path)."""
    if act == "silu":
        return F.silu(y)
    if act == "relu":
        return F.relu(y)
    return y
