"""Freeze BatchNorm into constant affine layers, and thaw frozen layers back into BatchNorm.

A norm + activation layer (timm's ``BatchNormAct2d``, ``FrozenBatchNormAct2d``,
see :func:`normlab.kinds.is_norm_act`) becomes ``nn.Sequential(norm=<new>,
drop=..., act=...)`` sharing its dropout and activation, so the network keeps
every nonlinearity. A BatchNorm subclass with a forward of its own that is not a
known norm + activation layer is refused (nothing is changed), never replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kinds import is_batch_norm, is_frozen_batch_norm
from .surgery import (
    BATCH_NORM_BY_RANK,
    FROZEN_BY_RANK,
    check_custom_forward,
    check_lazy,
    factory_kwargs,
    iter_matches,
    num_channels,
    prebuild,
    rank_of,
    replace,
    with_tail,
)

__all__ = ["freeze_bn", "unfreeze_bn"]


def freeze_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm by normlab's FrozenBatchNorm of the same rank, exactly.

    γ, β, the running statistics and eps are copied, so the frozen model equals
    the original in eval mode, whatever ``model.train()`` is called afterwards
    (frozen layers hold only buffers and ignore the mode). ``SyncBatchNorm`` (no
    rank in its class) becomes FrozenBatchNorm2d. A non-affine BN gets γ = 1,
    β = 0. Frozen layers already present are left as they are. A norm +
    activation BatchNorm (timm's ``BatchNormAct2d``) becomes
    ``nn.Sequential(norm=FrozenBatchNorm2d, drop=..., act=...)``, keeping its
    dropout and activation modules.

    Raises:
        ValueError: a BatchNorm without running statistics
            (``track_running_stats=False``): it has nothing to freeze; or a
            BatchNorm subclass with its own forward that is not a known norm +
            activation layer. Nothing is changed in either case.
    """
    check_lazy(model)
    check_custom_forward(model, "freeze_bn")
    missing = [
        p or "<model>" for p, m in iter_matches(model, is_batch_norm) if m.running_mean is None
    ]
    if missing:
        raise ValueError(
            f"freeze_bn: {', '.join(missing)} keep no running statistics "
            "(track_running_stats=False), so there is nothing to freeze; they normalize "
            "with batch statistics in every mode. Recreate them with track_running_stats=True "
            "and recalibrate (normlab.recalibrate.recalibrate), or convert them to a "
            "batch-independent norm (convert_norms(model, 'gn'))."
        )

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        rank = rank_of(old)
        cls = FROZEN_BY_RANK[rank or 2]
        new = cls(old.num_features, eps=old.eps, **factory_kwargs(old))
        with torch.no_grad():
            if old.weight is not None:
                new.weight.copy_(old.weight)
            if old.bias is not None:  # BatchNorm(bias=False): β stays 0
                new.bias.copy_(old.bias)
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
        new.train(old.training)
        details = {} if rank else {"rank": "not given by the class; using 2d"}
        wrapped, kept = with_tail(new, old)
        return wrapped, {**details, **kept}

    return replace(model, is_batch_norm, prebuild(model, is_batch_norm, build)[0])[0]


def unfreeze_bn(model: nn.Module, *, momentum: float | None = 0.1) -> nn.Module:
    """Replace every frozen BatchNorm by a trainable normlab BatchNorm of the same rank.

    γ and β become parameters, the running statistics and eps are copied,
    ``num_batches_tracked`` starts at 0, and the training flag is the frozen
    layer's. Accepts normlab's FrozenBatchNorm*d and torchvision / detectron2 /
    timm-style ``FrozenBatchNorm2d`` (see :func:`normlab.kinds.is_frozen_batch_norm`;
    a missing ``eps`` attribute means 1e-5, torchvision's default). timm's
    ``FrozenBatchNormAct2d`` becomes ``nn.Sequential(norm=BatchNorm2d, drop=...,
    act=...)``, keeping its activation.

    Args:
        model: modified in place and returned.
        momentum: momentum of the new BatchNorm layers.
    """

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        rank = rank_of(old)
        cls = BATCH_NORM_BY_RANK[rank or 2]
        new = cls(
            num_channels(old),
            eps=float(getattr(old, "eps", 1e-5)),
            momentum=momentum,
            **factory_kwargs(old),
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
        new.train(old.training)
        return with_tail(new, old)

    return replace(model, is_frozen_batch_norm, build)[0]
