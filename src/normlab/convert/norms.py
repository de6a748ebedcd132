""":func:`convert_norms`: replace every BatchNorm by another norm layer, and report it.

What counts as a BatchNorm (:func:`normlab.kinds.is_batch_norm`): torch's
``_BatchNorm`` subclasses (``SyncBatchNorm``, user subclasses, timm's
``BatchNormAct2d``) and normlab's ``BatchNorm1d/2d/3d``; normlab's other
batch-statistics layers (batch renorm, moving-average BN, ...) have their own
semantics and are left alone. A frozen BatchNorm
(:func:`normlab.kinds.is_frozen_batch_norm`: normlab's, and torchvision's,
detectron2's and timm's layout, recognised without importing them) is converted
only when asked. A norm + activation layer keeps its dropout and activation: the new
norm is followed by them in an ``nn.Sequential(norm=..., drop=..., act=...)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import WORLD, is_sync_layer
from ..kinds import is_batch_norm, is_frozen_batch_norm
from ..registry import get_norm_layer, names_taking, names_with, rank_matched
from .architecture import activation_after, adds_nonlinearity, summarise
from .frozen_stats import asked_training, carry_stats_freeze, is_stats_frozen
from .select import Filter, Selection, select_modules
from .surgery import (
    ConversionReport,
    Replacement,
    Skipped,
    check_custom_forward,
    check_lazy,
    copy_into,
    describe,
    factory_kwargs,
    iter_matches,
    left_out,
    num_channels,
    prebuild,
    rank_of,
    replace,
    type_name,
    with_tail,
)

__all__ = ["convert_norms"]


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _probe(new: nn.Module, rank: int | None, channels: int, path: str, source: str) -> str | None:
    """Refuse a target that cannot take the source's input rank (e.g. a 2-D-only layer on 3-D).

    For a 1-D BatchNorm, which takes (N, C, L) or (N, C), a target that takes only
    (N, C, L) is accepted with a warning (returned): which one the model feeds is
    not known before it runs.
    """
    if rank in (None, 2):
        return None
    probe, kw = copy.deepcopy(new).eval(), factory_kwargs(new)

    def fails(shape: tuple[int, ...]) -> Exception | None:
        try:
            with torch.no_grad():
                probe(torch.randn(shape, **kw) + 0.5)
        except Exception as e:  # any failure means the converted model would fail the same way
            return e
        return None

    shape = (2, channels) + (3,) * rank
    error = fails(shape)
    if error is not None:
        raise ValueError(
            f"convert_norms: {path or '<model>'} is a {source}, which takes {len(shape)}-D "
            f"input, but the target {type(new).__name__} fails on {len(shape)}-D input "
            f"({type(error).__name__}: {error}). Nothing was changed. Pick a target that "
            f"takes it ({_quoted(names_taking(rank, len(shape)))}) or convert only the other "
            "layers."
        ) from error
    if rank == 1 and fails((2, channels)) is not None:
        return (
            f"{path or '<model>'}: the target {type(new).__name__} takes (N, C, L) but not "
            f"(N, C); if this {source} normalizes (N, C) features (after a Linear), the "
            "converted model fails there: convert it with a target that takes (N, C) "
            f"({_quoted(names_taking(1, 2))})."
        )
    return None


def _build_target(
    make: Callable[..., nn.Module], channels: int, kwargs: dict[str, Any], no_bias: bool
) -> nn.Module:
    """``make(channels, **kwargs)``; for a BatchNorm built with ``bias=False``, the target
    without a bias too where its constructor takes ``bias=`` (torch's own convention)."""
    if no_bias and "bias" not in kwargs:
        try:
            return make(channels, bias=False, **kwargs)
        except TypeError:
            pass
    return make(channels, **kwargs)


def convert_norms(
    model: nn.Module,
    to: str | type | Callable[..., nn.Module],
    *,
    sync: bool | Any = False,
    frozen: bool = False,
    include: Filter = None,
    exclude: Filter = None,
    **kwargs: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every BatchNorm in ``model`` by another norm layer, and say what changed.

    The target is a registry name (``"gn"``, ``"frozen_bn"``, ``"frn_linear"``,
    ...), a class, or any callable ``factory(num_features, **kwargs)`` (e.g. a
    ``functools.partial``). For each BatchNorm (see :func:`is_batch_norm`) the new
    layer gets:

    * γ / β copied when the target has ``weight`` / ``bias`` of shape (C,);
    * ``running_mean`` / ``running_var`` / ``num_batches_tracked`` when it has them;
    * ``eps`` when the target keeps a float ``eps`` and ``eps`` is not in ``kwargs``;
    * the old layer's device, dtype, training flag and ``requires_grad`` flags.

    A target class named ``...2d`` (or a partial of one) is swapped for its
    ``...1d`` / ``...3d`` sibling to match a BatchNorm1d / 3d. A target without
    one (EvoNorm, ...) is refused for 1-D / 3-D BatchNorm before anything is
    changed. GroupNorm (``"gn"``) uses 32 groups when 32 divides C, else the
    largest divisor of C below 32.

    A norm + activation layer (timm's ``BatchNormAct2d``) becomes
    ``nn.Sequential(norm=<new>, drop=..., act=...)``: its activation is kept. A
    BatchNorm subclass with a forward of its own is refused.

    Frozen BatchNorm (normlab's, torchvision's, detectron2's, timm's) is converted
    only with ``frozen=True``; otherwise each frozen layer is listed in
    ``report.skipped``, and when nothing else was found a warning names them.

    The report warns about every architectural change: a target that adds a
    nonlinearity (``"frn"``'s TLU, EvoNorm) — naming the layers that had no
    activation after them, e.g. residual-branch ends, when the model can be
    traced —, and GroupNorm / EvoNorm-S0 groups of ≤ 2 channels (close to
    InstanceNorm). ``report.added_nonlinearity`` lists the paths.

    Args:
        model: any module; modified in place (the returned model is the same
            object unless ``model`` itself is a BatchNorm).
        to: registry name, class or factory.
        sync: True (the default group) or a ``torch.distributed.ProcessGroup``:
            the new layers compute their batch statistics over every process
            (``process_group`` set, see :mod:`normlab.distributed`); the target
            must then be a batch-statistics layer (BatchNorm, SwitchableNorm,
            MovingAverageBatchNorm, BatchRenorm, EvoNormB0).
        frozen: also convert frozen BatchNorm layers. Their γ / β become the new
            layer's (trainable) parameters.
        include, exclude: which layers (module-path globs such as
            ``"roi_heads.*"``, or a predicate ``(name, module) -> bool``;
            :func:`normlab.convert.select.select_modules`): e.g. GroupNorm only in a
            detector's head. The layers they leave out are listed in
            ``report.skipped``; a pattern matching no module is an error.
        **kwargs: passed to the factory.

    Returns:
        ``(model, report)``. A model without BatchNorm is returned unchanged with a
        warning in ``report.warnings``.

    Raises:
        ValueError: a target that cannot take a layer's input rank, a BatchNorm
            subclass with its own forward, a lazy module, or ``sync`` with a
            target without batch statistics. Nothing is changed then.

    Example::

        >>> model, report = convert_norms(resnet, "gn")
        >>> print(report)
    """
    factory = _target_factory(model, to)
    check_lazy(model)
    selection = select_modules(
        model, include, exclude, candidates=_any_batch_norm, tool="convert_norms"
    )
    check_custom_forward(model, "convert_norms", selection)
    warnings: list[str] = []

    def match(m: nn.Module) -> bool:
        return selection(m) and (is_batch_norm(m) or (frozen and is_frozen_batch_norm(m)))

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        return _replacement(old, path, factory, kwargs, sync, warnings)

    skipped = left_out(model, _any_batch_norm, selection, "")
    skipped += [] if frozen else _frozen_left(model, selection)
    build_all, built = prebuild(model, match, build)  # every refusal happens here
    act_after = activation_after(model, match) if any("nonlinearity" in d for d in built) else {}
    model, replacements = replace(model, match, build_all)
    report = ConversionReport(replacements, warnings, skipped)
    name = f"{to!r} ({describe(factory)})" if isinstance(to, str) else describe(factory)
    report.warnings.extend(summarise(replacements, act_after, name))
    report.warnings.extend(_found_warnings(replacements, skipped))
    return model, report


def _target_factory(model: Any, to: Any) -> Callable[..., nn.Module]:
    """The factory ``to`` names, after checking that ``model`` is a module (the one place
    a misplaced or misspelled argument is explained)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"convert_norms: model must be an nn.Module (the network whose BatchNorm layers "
            f"are replaced), got {type(model).__name__} {model!r:.60}. The call is "
            "convert_norms(model, to), e.g. convert_norms(model, 'gn')."
        )
    try:
        return get_norm_layer(to)
    except KeyError as e:
        raise KeyError(f"convert_norms: {e.args[0]}") from None
    except TypeError as e:
        raise TypeError(f"convert_norms: to: {e}") from None


def _replacement(
    old: nn.Module,
    path: str,
    factory: Callable[..., nn.Module],
    kwargs: dict[str, Any],
    sync: bool | Any,
    warnings: list[str],
) -> tuple[nn.Module, dict[str, Any]]:
    """The layer that replaces ``old``, and what was carried or chosen (the report's details)."""
    channels, rank = num_channels(old), rank_of(old)
    make = rank_matched(factory, rank)
    no_bias = getattr(old, "weight", None) is not None and getattr(old, "bias", 1) is None
    new = _built(make, old, path, channels, kwargs, no_bias)
    flat_only = _probe(new, rank, channels, path, type(old).__name__)
    if flat_only:
        warnings.append(flat_only)
    details: dict[str, Any] = {}
    if is_frozen_batch_norm(old):
        details["was_frozen"] = True
    _carry_affine(new, old, channels, no_bias, details)
    _carry_statistics(new, old, channels, "eps" in kwargs, details)
    _groups(new, set(kwargs), make, channels, rank, path, old, details, warnings)
    nonlinear = adds_nonlinearity(new)
    if nonlinear:
        details["nonlinearity"] = nonlinear
    if sync is not False:
        _synced(new, sync, details)
    new.train(asked_training(old))
    if is_stats_frozen(old):  # freeze_bn(stats_only=True): kept where the target is a BN
        kept = carry_stats_freeze(new)
        details["running_stats_frozen"] = "kept" if kept else "dropped (the target is no BN)"
    wrapped, kept = with_tail(new, old)
    return wrapped, {**details, **kept}


def _built(
    make: Callable[..., nn.Module],
    old: nn.Module,
    path: str,
    channels: int,
    kwargs: dict[str, Any],
    no_bias: bool,
) -> nn.Module:
    """``make(channels, **kwargs)`` on ``old``'s device and dtype; a failure names the layer."""
    try:
        new = _build_target(make, channels, kwargs, no_bias)
    except Exception as e:  # say which layer, then re-raise with the cause
        raise type(e)(
            f"convert_norms: building the target {describe(make)} for {path or '<model>'} "
            f"({type(old).__name__}, {channels} channels) failed: {e}"
        ) from e
    if not isinstance(new, nn.Module):
        raise TypeError(
            f"convert_norms: the target factory {describe(make)} returned "
            f"{type(new).__name__}, not an nn.Module."
        )
    new.to(**factory_kwargs(old))
    return new


def _carry_affine(
    new: nn.Module, old: nn.Module, channels: int, no_bias: bool, details: dict[str, Any]
) -> None:
    """γ / β and their ``requires_grad`` flags, where the target has them per channel."""
    weight, bias = getattr(old, "weight", None), getattr(old, "bias", None)
    affine = copy_into(new, "weight", weight, channels)
    if no_bias:  # β stays the target's zero, or absent where the target took bias=False
        if isinstance(getattr(new, "bias", None), nn.Parameter):
            details["bias"] = "added, zero (the target takes no bias=False)"
    else:
        affine &= copy_into(new, "bias", bias, channels)
    if weight is not None and not affine:
        details["affine"] = "dropped (target has no per-channel weight/bias)"
    for p, src in (("weight", weight), ("bias", bias)):
        dst = getattr(new, p, None)
        if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
            dst.requires_grad_(src.requires_grad)


def _carry_statistics(
    new: nn.Module, old: nn.Module, channels: int, eps_given: bool, details: dict[str, Any]
) -> None:
    """The running statistics and step count where the target keeps them, and ``old``'s eps."""
    stats = copy_into(new, "running_mean", getattr(old, "running_mean", None), channels)
    stats &= copy_into(new, "running_var", getattr(old, "running_var", None), channels)
    if stats:
        details["running_stats"] = "copied"
        nbt = getattr(new, "num_batches_tracked", None)
        old_nbt = getattr(old, "num_batches_tracked", None)
        if isinstance(nbt, Tensor) and isinstance(old_nbt, Tensor):
            nbt.copy_(old_nbt)
    old_eps = float(getattr(old, "eps", 1e-5))
    if not eps_given and isinstance(getattr(new, "eps", None), float):
        if new.eps != old_eps:
            details["eps"] = old_eps
        new.eps = old_eps  # type: ignore[assignment]


def _synced(new: nn.Module, sync: bool | Any, details: dict[str, Any]) -> None:
    """Give ``new`` the process group; refuse a target without batch statistics."""
    if not is_sync_layer(new):
        raise ValueError(
            f"convert_norms: sync=True asks for cross-process batch statistics, but "
            f"the target {type(new).__name__} does not use batch statistics; drop "
            "sync=True, or pick a batch-statistics target "
            f"({', '.join(map(repr, names_with('syncable')))})."
        )
    group = WORLD if sync is True else sync
    new.process_group = group
    details["sync"] = group if isinstance(group, str) else type(group).__name__


def _any_batch_norm(m: nn.Module) -> bool:
    return is_batch_norm(m) or is_frozen_batch_norm(m)


def _frozen_left(model: nn.Module, selection: Selection) -> list[Skipped]:
    return [
        Skipped(p, type_name(m), "frozen BatchNorm; convert_norms(..., frozen=True) converts it")
        for p, m in iter_matches(model, lambda m: is_frozen_batch_norm(m) and selection(m))
    ]


def _found_warnings(replacements: list[Replacement], skipped: list[Skipped]) -> list[str]:
    """What was not converted: nothing found, or frozen layers left in place."""
    if replacements:
        if not skipped:
            return []
        return [
            f"{len(skipped)} frozen BatchNorm layer(s) were left unchanged (listed under "
            "skipped): pass frozen=True to convert them too."
        ]
    if not skipped:
        return ["no BatchNorm layer found: nothing was converted (the model is unchanged)."]
    names = ", ".join(s.path or "<model>" for s in skipped[:8])
    more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
    return [
        f"no trainable BatchNorm found, but {len(skipped)} frozen BatchNorm layer(s) "
        f"({names}{more}) were left unchanged: pass frozen=True to convert them."
    ]


def _groups(
    new: nn.Module,
    given: set[str],
    make: Callable[..., nn.Module],
    channels: int,
    rank: int | None,
    path: str,
    old: nn.Module,
    details: dict[str, Any],
    warnings: list[str],
) -> None:
    """Record the number of groups and why; warn when a group holds ≤ 2 channels."""
    groups = getattr(new, "num_groups", getattr(new, "groups", None))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return
    details["num_groups"] = groups
    given = given | set(getattr(make, "keywords", None) or {})
    if {"num_groups", "groups"} & given:
        details["groups_reason"] = "as given"
    elif groups == 32:
        details["groups_reason"] = "32 divides C"
    else:
        details["groups_reason"] = f"32 does not divide C={channels}; largest divisor <= 32"
    if channels // groups <= 2:
        details["channels_per_group"] = channels // groups
    if groups == channels and rank == 1:
        warnings.append(
            f"{path or '<model>'}: {type(old).__name__}({channels}) became "
            f"{type(new).__name__} with {groups} groups, 1 channel per group: on (N, C) "
            "input each group holds a single value and the output is the constant β. "
            "Pass num_groups= a smaller divisor (e.g. 1, LayerNorm-like) for these layers."
        )
