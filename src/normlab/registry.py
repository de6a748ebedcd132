"""One registry: name -> norm layer class, and one resolver.

Every factory is called as ``factory(num_features, **kwargs)``: GroupNorm-style
layers whose first argument is not the channel count are registered through a
small adapter that picks the number of groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from . import nn as nnl
from .functional._checks import divisors_up_to

__all__ = ["NORM_LAYERS", "create_norm", "get_norm_layer", "group_norm", "auto_groups"]


def auto_groups(num_channels: int, preferred: int = 32) -> int:
    """``preferred`` groups if it divides C, else the largest divisor of C below it."""
    return divisors_up_to(num_channels, preferred)[0]


def group_norm(num_features: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    """GroupNorm with ``num_features`` channels; groups default to :func:`auto_groups`."""
    groups = auto_groups(num_features) if num_groups is None else num_groups
    return nnl.GroupNorm(groups, num_features, **kwargs)


def _layer_norm(num_features: int, **kwargs: Any) -> nn.Module:
    """LayerNorm over the channels of (N, C, ...) (LayerNorm2d), or over (C,) for (N, C)."""
    return nnl.LayerNorm2d(num_features, **kwargs)


def _instance_norm(num_features: int, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("affine", True)
    return nnl.InstanceNorm2d(num_features, **kwargs)


def _evonorm_s0(num_features: int, groups: int | None = None, **kwargs: Any) -> nn.Module:
    """EvoNormS0_2d with ``num_features`` channels; groups default to :func:`auto_groups`."""
    groups = auto_groups(num_features) if groups is None else groups
    return nnl.EvoNormS0_2d(num_features, groups, **kwargs)


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "bn": nnl.BatchNorm2d,
    "bn1d": nnl.BatchNorm1d,
    "bn3d": nnl.BatchNorm3d,
    "frozen_bn": nnl.FrozenBatchNorm2d,
    "gn": group_norm,
    "ln": _layer_norm,
    "in": _instance_norm,
    "frn": nnl.FilterResponseNorm2d,
    "brn": nnl.BatchRenorm2d,
    "evonorm_b0": nnl.EvoNormB0_2d,
    "evonorm_s0": _evonorm_s0,
    "sn": nnl.SwitchableNorm2d,
    "mabn": nnl.MovingAverageBatchNorm2d,
}


def get_norm_layer(name: str | type | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Resolve a registry name, a class or a callable (e.g. functools.partial)."""
    if isinstance(name, str):
        key = name.lower().replace("-", "_")
        if key not in NORM_LAYERS:
            raise KeyError(
                f"unknown norm {name!r}; known names: {', '.join(sorted(NORM_LAYERS))}. "
                "You can also pass a class or a functools.partial."
            )
        return NORM_LAYERS[key]
    if isinstance(name, type) or isinstance(name, functools.partial) or callable(name):
        return name
    raise TypeError(f"expected a norm name, class or callable, got {type(name).__name__}")


def create_norm(
    name: str | type | Callable[..., nn.Module], num_features: int, **kwargs: Any
) -> nn.Module:
    """Build a norm layer for ``num_features`` channels: ``create_norm("gn", 64)``."""
    return get_norm_layer(name)(num_features, **kwargs)
