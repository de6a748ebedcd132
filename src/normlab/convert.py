"""Model surgery: swap BatchNorm for another norm, freeze / unfreeze it, fold it into convs.

Every function here walks a model and returns it (STYLE.md §8): modules are
*replaced* in their parent, never patched. A module registered in several places
(the same object under two names) is replaced by **one** new module, registered
in all those places, so weight sharing survives. Only references held through
``nn.Module`` children are seen: a plain Python list of layers is not.

What counts as a BatchNorm (:func:`is_batch_norm`): torch's ``_BatchNorm``
subclasses (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, user subclasses) and
normlab's ``BatchNorm1d/2d/3d``. normlab's other batch-statistics layers (batch
renorm, moving-average BN, ...) have their own semantics and are left alone.

What counts as a frozen BatchNorm (:func:`is_frozen_batch_norm`): normlab's
``FrozenBatchNorm1d/2d/3d`` and any module whose class name contains
``FrozenBatchNorm`` and that holds the buffers ``weight``, ``bias``,
``running_mean``, ``running_var`` (torchvision's and detectron2's layout),
recognised without importing them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import nn as nnl
from .distributed import WORLD, is_sync_layer
from .fuse import fuse_conv_bn
from .kinds import is_batch_norm, is_frozen_batch_norm
from .registry import get_norm_layer

__all__ = [
    "ConversionReport",
    "Replacement",
    "convert_norms",
    "freeze_bn",
    "unfreeze_bn",
    "fuse_conv_bn",
    "is_batch_norm",
    "is_frozen_batch_norm",
]

_NORMLAB_BN = (nnl.BatchNorm1d, nnl.BatchNorm2d, nnl.BatchNorm3d)
_FROZEN_BY_RANK = {1: nnl.FrozenBatchNorm1d, 2: nnl.FrozenBatchNorm2d, 3: nnl.FrozenBatchNorm3d}
_BN_BY_RANK = {1: nnl.BatchNorm1d, 2: nnl.BatchNorm2d, 3: nnl.BatchNorm3d}


def _rank(module: nn.Module) -> int | None:
    """Spatial rank (1, 2, 3) from the class, or None when the class does not say (SyncBN)."""
    for rank, classes in (
        (1, (nn.BatchNorm1d, nnl.BatchNorm1d, nnl.FrozenBatchNorm1d)),
        (2, (nn.BatchNorm2d, nnl.BatchNorm2d, nnl.FrozenBatchNorm2d)),
        (3, (nn.BatchNorm3d, nnl.BatchNorm3d, nnl.FrozenBatchNorm3d)),
    ):
        if isinstance(module, classes):
            return rank
    name = type(module).__name__
    for rank in (1, 2, 3):
        if name.endswith(f"{rank}d"):
            return rank
    return None


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """device and dtype of a module's first floating tensor."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Replacement:
    """One replaced module.

    Attributes:
        path: dotted path of its first occurrence ("" for the model itself).
        aliases: the other paths of the same object (a module used twice).
        old_type, new_type: fully qualified class names.
        details: what was carried or chosen (e.g. ``num_groups`` and why).
    """

    path: str
    aliases: tuple[str, ...]
    old_type: str
    new_type: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionReport:
    """Every replacement :func:`convert_norms` made, plus warnings (e.g. nothing found)."""

    replacements: list[Replacement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replacements)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replacements": [
                {
                    "path": r.path,
                    "aliases": list(r.aliases),
                    "old_type": r.old_type,
                    "new_type": r.new_type,
                    "details": dict(r.details),
                }
                for r in self.replacements
            ],
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        lines = [f"{len(self.replacements)} replacement(s)"]
        for r in self.replacements:
            where = r.path or "<model>"
            if r.aliases:
                where += f" (also {', '.join(r.aliases)})"
            extra = ", ".join(f"{k}={v}" for k, v in r.details.items())
            lines.append(
                f"  {where}: {r.old_type} -> {r.new_type}" + (f" [{extra}]" if extra else "")
            )
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- walking


def _iter_matches(
    model: nn.Module, match: Callable[[nn.Module], bool]
) -> Iterator[tuple[str, nn.Module]]:
    """(first path, module) for every distinct matching module, parents before children."""
    seen: set[int] = set()
    for path, m in model.named_modules(remove_duplicate=False):
        if id(m) not in seen and match(m):
            seen.add(id(m))
            yield path, m


def _replace(
    model: nn.Module,
    match: Callable[[nn.Module], bool],
    build: Callable[[nn.Module, str], tuple[nn.Module, dict[str, Any]]],
) -> tuple[nn.Module, list[Replacement]]:
    """Replace every matching module (not descending into matches); one new module per old one."""
    new_of: dict[int, nn.Module] = {}
    new_ids: dict[int, int] = {}  # id(new) -> index into records
    records: list[dict[str, Any]] = []

    def make(old: nn.Module, path: str) -> nn.Module:
        new, details = build(old, path)
        new_of[id(old)] = new
        new_ids[id(new)] = len(records)
        records.append({"path": path, "aliases": [], "old": old, "new": new, "details": details})
        return new

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            path = _path(prefix, name)
            if id(child) in new_of:  # the same old module, met again under another name
                setattr(module, name, new_of[id(child)])
                records[new_ids[id(new_of[id(child)])]]["aliases"].append(path)
            elif id(child) in new_ids:  # inside a shared container we already converted
                records[new_ids[id(child)]]["aliases"].append(path)
            elif match(child):
                setattr(module, name, make(child, path))
            else:
                visit(child, path)

    if match(model):
        root = make(model, "")
    else:
        root = model
        visit(model, "")
    return root, [
        Replacement(
            r["path"],
            tuple(r["aliases"]),
            _type_name(r["old"]),
            _type_name(r["new"]),
            r["details"],
        )
        for r in records
    ]


# ----------------------------------------------------------------------------- convert_norms


def _rank_matched(factory: Callable[..., nn.Module], rank: int | None) -> Callable[..., nn.Module]:
    """For a class named ``...2d`` (``...1d``/``...3d``), its sibling of the source's rank."""
    if rank is None or not isinstance(factory, type):
        return factory
    name = factory.__name__
    if len(name) > 2 and name[-2] in "123" and name[-1] == "d" and name[-2] != str(rank):
        import sys

        sibling = getattr(sys.modules[factory.__module__], f"{name[:-2]}{rank}d", None)
        if isinstance(sibling, type) and issubclass(sibling, nn.Module):
            return sibling
    return factory


def _copy_into(new: nn.Module, name: str, value: Tensor | None, channels: int) -> bool:
    target = getattr(new, name, None)
    if value is None or not isinstance(target, Tensor) or tuple(target.shape) != (channels,):
        return False
    with torch.no_grad():
        target.copy_(value.to(target.dtype))
    return True


def convert_norms(
    model: nn.Module,
    to: str | type | Callable[..., nn.Module],
    *,
    sync: bool | Any = False,
    **kwargs: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every BatchNorm in ``model`` by another norm layer.

    The target is a registry name (``"gn"``, ``"frozen_bn"``, ...), a class, or any
    callable ``factory(num_features, **kwargs)`` (e.g. a ``functools.partial``).
    For each BatchNorm (see :func:`is_batch_norm`) the new layer gets:

    * γ / β copied when the target has ``weight`` / ``bias`` of shape (C,);
    * ``running_mean`` / ``running_var`` / ``num_batches_tracked`` when it has them;
    * ``eps`` when the target keeps a float ``eps`` and ``eps`` is not in ``kwargs``;
    * the old layer's device, dtype, training flag and ``requires_grad`` flags.

    A target class named ``...2d`` is swapped for its ``...1d`` / ``...3d`` sibling in
    the same module to match a BatchNorm1d / 3d (e.g. ``"frozen_bn"`` on a
    BatchNorm1d gives FrozenBatchNorm1d). GroupNorm (``"gn"``) uses 32 groups when
    32 divides C, else the largest divisor of C below 32; the report says which.

    Args:
        model: any module; modified in place (the returned model is the same
            object unless ``model`` itself is a BatchNorm).
        to: registry name, class or factory.
        sync: True (the default group) or a ``torch.distributed.ProcessGroup``:
            the new layers compute their batch statistics over every process
            (``process_group`` set, see :mod:`normlab.distributed`); the target
            must then be a batch-statistics layer (BatchNorm, SwitchableNorm,
            MovingAverageBatchNorm, BatchRenorm, EvoNormB0).
        **kwargs: passed to the factory.

    Returns:
        ``(model, report)``. A model without BatchNorm is returned unchanged with a
        warning in ``report.warnings``.

    Example::

        >>> model, report = convert_norms(resnet, "gn")
        >>> print(report)
    """
    factory = get_norm_layer(to)
    _check_lazy(model)

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        channels = int(old.num_features)  # type: ignore[arg-type]
        make = _rank_matched(factory, _rank(old))
        try:
            new = make(channels, **kwargs)
        except Exception as e:  # say which layer, then re-raise with the cause
            raise type(e)(
                f"convert_norms: building the target {_describe(make)} for {path or '<model>'} "
                f"({type(old).__name__}, {channels} channels) failed: {e}"
            ) from e
        if not isinstance(new, nn.Module):
            raise TypeError(
                f"convert_norms: the target factory {_describe(make)} returned "
                f"{type(new).__name__}, not an nn.Module."
            )
        new.to(**_factory_kwargs(old))
        details: dict[str, Any] = {}
        affine = _copy_into(new, "weight", old.weight, channels)
        affine &= _copy_into(new, "bias", old.bias, channels)
        if old.weight is not None and not affine:
            details["affine"] = "dropped (target has no per-channel weight/bias)"
        for p in ("weight", "bias"):
            src, dst = getattr(old, p, None), getattr(new, p, None)
            if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
        stats = _copy_into(new, "running_mean", old.running_mean, channels)
        stats &= _copy_into(new, "running_var", old.running_var, channels)
        if stats:
            details["running_stats"] = "copied"
            nbt = getattr(new, "num_batches_tracked", None)
            if isinstance(nbt, Tensor) and old.num_batches_tracked is not None:
                nbt.copy_(old.num_batches_tracked)
        if "eps" not in kwargs and isinstance(getattr(new, "eps", None), float):
            if new.eps != old.eps:
                details["eps"] = old.eps
            new.eps = float(old.eps)  # type: ignore[assignment]
        groups = getattr(new, "num_groups", None)
        if isinstance(groups, int):
            details["num_groups"] = groups
            given = getattr(make, "keywords", None) or {}
            if "num_groups" in kwargs or "num_groups" in given:
                details["groups_reason"] = "as given"
            elif groups == 32:
                details["groups_reason"] = "32 divides C"
            else:
                details["groups_reason"] = f"32 does not divide C={channels}; largest divisor <= 32"
        if isinstance(groups, int) and groups == channels and _rank(old) == 1:
            warnings.append(
                f"{path or '<model>'}: {type(old).__name__}({channels}) became "
                f"{type(new).__name__} with {groups} groups, 1 channel per group: on (N, C) "
                "input each group holds a single value and the output is the constant β. "
                "Pass num_groups= a smaller divisor (e.g. 1, LayerNorm-like) for these layers."
            )
        if sync is not False:
            if not is_sync_layer(new):
                raise ValueError(
                    f"convert_norms: sync=True asks for cross-process batch statistics, but "
                    f"the target {type(new).__name__} does not use batch statistics; drop "
                    "sync=True, or pick a batch-statistics target ('bn', 'sn', 'mabn', "
                    "'brn', 'evonorm_b0')."
                )
            group = WORLD if sync is True else sync
            new.process_group = group
            details["sync"] = group if isinstance(group, str) else type(group).__name__
        new.train(old.training)
        return new, details

    warnings: list[str] = []
    model, replacements = _replace(model, is_batch_norm, build)
    report = ConversionReport(replacements, warnings)
    if not replacements:
        report.warnings.append(
            "no BatchNorm layer found: nothing was converted (the model is unchanged)."
        )
    return model, report


def _describe(f: Callable[..., Any]) -> str:
    if isinstance(f, functools.partial):
        return f"partial({_describe(f.func)}, ...)"
    return getattr(f, "__qualname__", type(f).__name__)


def _check_lazy(model: nn.Module) -> None:
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{path or '<model>'} ({type(m).__name__}) is a lazy module whose size is not "
                "known yet, so it cannot be converted; run one forward pass first."
            )


# ----------------------------------------------------------------------------- freeze


def freeze_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm by normlab's FrozenBatchNorm of the same rank, exactly.

    γ, β, the running statistics and eps are copied, so the frozen model equals
    the original in eval mode bit for bit, whatever ``model.train()`` is called
    afterwards (frozen layers hold only buffers and ignore the mode).
    ``SyncBatchNorm`` (no rank in its class) becomes FrozenBatchNorm2d. A
    non-affine BN gets γ = 1, β = 0. Frozen layers already present are left as
    they are.

    Raises:
        ValueError: a BatchNorm without running statistics
            (``track_running_stats=False``): it has nothing to freeze. Nothing is
            changed in that case.
    """
    _check_lazy(model)
    missing = [
        p or "<model>" for p, m in _iter_matches(model, is_batch_norm) if m.running_mean is None
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
        rank = _rank(old)
        cls = _FROZEN_BY_RANK[rank or 2]
        new = cls(old.num_features, eps=old.eps, **_factory_kwargs(old))
        with torch.no_grad():
            if old.weight is not None:
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
        new.train(old.training)
        return new, {} if rank else {"rank": "not given by the class; using 2d"}

    return _replace(model, is_batch_norm, build)[0]


def unfreeze_bn(model: nn.Module, *, momentum: float | None = 0.1) -> nn.Module:
    """Replace every frozen BatchNorm by a trainable normlab BatchNorm of the same rank.

    γ and β become parameters, the running statistics and eps are copied,
    ``num_batches_tracked`` starts at 0, and the training flag is the frozen
    layer's. Accepts normlab's FrozenBatchNorm*d and torchvision/detectron2-style
    ``FrozenBatchNorm2d`` (see :func:`is_frozen_batch_norm`; a missing ``eps``
    attribute means 1e-5, torchvision's default).

    Args:
        model: modified in place and returned.
        momentum: momentum of the new BatchNorm layers.
    """

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        rank = _rank(old)
        channels = old.running_mean.shape[0]
        cls = _BN_BY_RANK[rank or 2]
        new = cls(
            channels,
            eps=float(getattr(old, "eps", 1e-5)),
            momentum=momentum,
            **_factory_kwargs(old),
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
        new.train(old.training)
        return new, {}

    return _replace(model, is_frozen_batch_norm, build)[0]
