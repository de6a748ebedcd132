"""Freeze BatchNorm into constant affine layers, and thaw frozen layers back into BatchNorm.

``stats_only=True`` fixes only the running statistics and keeps γ/β trainable
(:mod:`normlab.convert.frozen_stats`: the same module, state_dict and parameters).
``include=`` / ``exclude=`` pick the layers (:mod:`normlab.convert.select`).

A norm + activation layer (timm's ``BatchNormAct2d``, ``FrozenBatchNormAct2d``,
see :func:`normlab.kinds.is_norm_act`) becomes ``nn.Sequential(norm=<new>,
drop=..., act=...)`` sharing its dropout and activation, so the network keeps
every nonlinearity. A BatchNorm subclass with a forward of its own that is not a
known norm + activation layer is refused (nothing is changed), never replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn

from ..kinds import is_batch_norm, is_frozen_batch_norm
from .frozen_stats import asked_training, freeze_stats, is_stats_frozen, thaw_stats
from .select import Filter, Filters, select_modules
from .surgery import (
    BATCH_NORM_BY_RANK,
    FROZEN_BY_RANK,
    ConversionReport,
    check_custom_forward,
    check_lazy,
    factory_kwargs,
    iter_matches,
    left_out,
    num_channels,
    prebuild,
    rank_of,
    replace,
    with_tail,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["freeze_bn", "unfreeze_bn"]


def _trainable_bn(m: nn.Module) -> bool:
    return is_batch_norm(m) and not is_stats_frozen(m)


class _FreezeOptions(Filters, total=False):
    stats_only: bool


@overload
def freeze_bn(
    model: nn.Module, *, return_report: Literal[False] = ..., **options: Unpack[_FreezeOptions]
) -> nn.Module: ...
@overload
def freeze_bn(
    model: nn.Module, *, return_report: Literal[True], **options: Unpack[_FreezeOptions]
) -> tuple[nn.Module, ConversionReport]: ...
def freeze_bn(
    model: nn.Module,
    *,
    stats_only: bool = False,
    include: Filter = None,
    exclude: Filter = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Freeze every BatchNorm: into normlab's FrozenBatchNorm, or only its statistics.

    Default (``stats_only=False``): each BatchNorm becomes normlab's FrozenBatchNorm
    of the same rank, exactly. γ, β, the running statistics and eps are copied, so
    the frozen model equals the original in eval mode, whatever ``model.train()`` is
    called afterwards (frozen layers hold only buffers and ignore the mode).
    ``SyncBatchNorm`` (no rank in its class) becomes FrozenBatchNorm2d. A non-affine
    BN gets γ = 1, β = 0. A norm + activation BatchNorm (timm's ``BatchNormAct2d``)
    becomes ``nn.Sequential(norm=FrozenBatchNorm2d, drop=..., act=...)``, keeping
    its dropout and activation modules.

    ``stats_only=True`` (mmdet's ``norm_eval``, fine-tuning): each BatchNorm stays
    the same module with the same parameters, buffers and state_dict keys, but
    normalizes with its running statistics and never updates them, in
    ``model.train()`` too; γ and β stay Parameters with their ``requires_grad``
    flags, so they train (the gradients are those of the BN in eval mode).
    :func:`unfreeze_bn` undoes it. See :mod:`normlab.convert.frozen_stats`.

    Frozen layers (of either kind) already present are left as they are.

    Args:
        model: modified in place and returned (a new object only when ``model``
            itself is a BatchNorm and ``stats_only`` is False).
        stats_only: fix the statistics only (γ/β train) instead of the whole layer.
        include, exclude: which layers (module-path globs or a predicate
            ``(name, module) -> bool``; :func:`normlab.convert.select.select_modules`).
            ``freeze_bn(model, include=["conv1", "bn1", "layer1"])`` is detectron2's
            ``FREEZE_AT=2`` on a torchvision ResNet.
        return_report: return ``(model, ConversionReport)``: the layers frozen
            (``replacements``) and those the filters left out (``skipped``).

    Raises:
        ValueError: a BatchNorm without running statistics
            (``track_running_stats=False``): it has nothing to freeze; a BatchNorm
            subclass with its own forward that is not a known norm + activation
            layer; a filter pattern that matches no module. Nothing is changed in
            any of these cases.
    """
    check_lazy(model)
    candidates = _trainable_bn if stats_only else is_batch_norm
    selection = select_modules(model, include, exclude, candidates=candidates, tool="freeze_bn")
    # the layers, fixed before any is built (a stats-only build changes its layer's class)
    targets = {id(m) for _, m in iter_matches(model, selection.match(candidates))}

    def match(m: nn.Module) -> bool:
        return id(m) in targets

    check_custom_forward(model, "freeze_bn", selection)
    missing = [p or "<model>" for p, m in iter_matches(model, match) if m.running_mean is None]
    if missing:
        raise ValueError(
            f"freeze_bn: {', '.join(missing)} keep no running statistics "
            "(track_running_stats=False), so there is nothing to freeze; they normalize "
            "with batch statistics in every mode. Recreate them with track_running_stats=True "
            "and recalibrate (normlab.recalibrate.recalibrate), or convert them to a "
            "batch-independent norm (convert_norms(model, 'gn'))."
        )

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        if stats_only:
            return freeze_stats(old), {"running_stats": "fixed; weight and bias train"}
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
        new.train(asked_training(old))
        details = {} if rank else {"rank": "not given by the class; using 2d"}
        wrapped, kept = with_tail(new, old)
        return wrapped, {**details, **kept}

    # a stats-only freeze refuses nothing past this point: no need to build ahead
    lookup = build if stats_only else prebuild(model, match, build)[0]
    model, done = replace(model, match, lookup)
    if not return_report:
        return model
    return model, ConversionReport(done, [], left_out(model, candidates, selection, "not frozen"))


def _thawable(m: nn.Module) -> bool:
    return is_frozen_batch_norm(m) or is_stats_frozen(m)


class _UnfreezeOptions(Filters, total=False):
    momentum: float | None


@overload
def unfreeze_bn(
    model: nn.Module, *, return_report: Literal[False] = ..., **options: Unpack[_UnfreezeOptions]
) -> nn.Module: ...
@overload
def unfreeze_bn(
    model: nn.Module, *, return_report: Literal[True], **options: Unpack[_UnfreezeOptions]
) -> tuple[nn.Module, ConversionReport]: ...
def unfreeze_bn(
    model: nn.Module,
    *,
    momentum: float | None = 0.1,
    include: Filter = None,
    exclude: Filter = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Make every frozen BatchNorm trainable again (the inverse of :func:`freeze_bn`).

    A frozen BatchNorm becomes a trainable normlab BatchNorm of the same rank: γ and
    β become parameters, the running statistics and eps are copied,
    ``num_batches_tracked`` starts at 0, and the training flag is the frozen
    layer's. Accepts normlab's FrozenBatchNorm*d and torchvision / detectron2 /
    timm-style ``FrozenBatchNorm2d`` (see :func:`normlab.kinds.is_frozen_batch_norm`;
    a missing ``eps`` attribute means 1e-5, torchvision's default). timm's
    ``FrozenBatchNormAct2d`` becomes ``nn.Sequential(norm=BatchNorm2d, drop=...,
    act=...)``, keeping its activation.

    A stats-frozen BatchNorm (``freeze_bn(stats_only=True)``) becomes the ordinary
    BatchNorm it was, in place (same module, parameters, buffers and
    ``num_batches_tracked``), in the mode the model last asked for
    (``model.train()`` / ``model.eval()``); ``momentum`` does not apply to it.

    Args:
        model: modified in place and returned.
        momentum: momentum of the new BatchNorm layers.
        include, exclude: which layers (module-path globs or a predicate
            ``(name, module) -> bool``; :func:`normlab.convert.select.select_modules`).
        return_report: return ``(model, ConversionReport)``: the layers thawed
            (``replacements``) and those the filters left out (``skipped``).

    Raises:
        ValueError: a filter pattern that matches no module (nothing is changed).
    """
    selection = select_modules(model, include, exclude, candidates=_thawable, tool="unfreeze_bn")

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        if is_stats_frozen(old):
            return thaw_stats(old), {"running_stats": "updated again in training mode"}
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

    model, done = replace(model, selection.match(_thawable), build)
    if not return_report:
        return model
    skipped = left_out(model, _thawable, selection, "not unfrozen")
    return model, ConversionReport(done, [], skipped)
