"""The ``act`` and ``backend`` options of the layers with fused kernels, handled alike.

FrozenBatchNorm and GroupNorm take both (an activation fused after the affine map,
and which kernels run); FilterResponseNorm and SwitchableNorm take ``backend`` only.
Each layer checks and stores them here, and its repr shows them the same way: only
where they differ from the defaults (no activation, ``backend="auto"``).
"""

from __future__ import annotations

from torch import nn

from .._core.activation import check_act
from .._core.dispatch import check_backend


def take_backend(module: nn.Module, layer: str, backend: str) -> None:
    """Check ``backend`` (the error names ``layer``) and store it as ``module.backend``."""
    check_backend(layer, backend)
    module.backend = backend


def take_act_backend(module: nn.Module, layer: str, act: str | None, backend: str) -> None:
    """Check ``act`` then ``backend``, and store them as ``module.act`` and ``module.backend``."""
    check_act(layer, act)
    check_backend(layer, backend)
    module.act = act
    module.backend = backend


def options_repr(module: nn.Module) -> str:
    """The repr's tail for these options, e.g. ``", act='silu', backend='torch'"``."""
    s = ""
    act = getattr(module, "act", None)  # the layers that take backend only have no act
    if act is not None:
        s += f", act={act!r}"
    if module.backend != "auto":
        s += f", backend={module.backend!r}"
    return s
