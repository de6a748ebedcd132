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

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from . import nn as nnl
from .distributed import WORLD, is_sync_layer
from .nn.batch_norm import _FrozenBatchNorm
from .recalibrate import _feed
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
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


# ----------------------------------------------------------------------------- detection


def is_batch_norm(module: nn.Module) -> bool:
    """True for torch's BatchNorm family (incl. SyncBatchNorm) and normlab's BatchNorm*d."""
    return isinstance(module, _TorchBatchNorm) or type(module) in _NORMLAB_BN


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """True for normlab's FrozenBatchNorm*d and torchvision/detectron2-style frozen BN."""
    if isinstance(module, _FrozenBatchNorm):
        return True
    return "FrozenBatchNorm" in type(module).__name__ and all(
        isinstance(module._buffers.get(b), Tensor) for b in _FROZEN_BUFFERS
    )


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


# ----------------------------------------------------------------------------- fusion

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fold(
    lin: nn.Module, bn: nn.Module, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Folded (weight, bias) of ``bn(lin(x))`` in ``dtype``."""
    w = lin.weight.detach().to(dtype)
    out = w.shape[0]
    b = lin.bias.detach().to(dtype) if lin.bias is not None else w.new_zeros(out)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else w.new_ones(out)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else w.new_zeros(out)
    mean = bn.running_mean.detach().to(dtype)
    var = bn.running_var.detach().to(dtype)
    scale = gamma * torch.rsqrt(var + float(getattr(bn, "eps", 1e-5)))
    return w * scale.reshape(-1, *([1] * (w.dim() - 1))), (b - mean) * scale + beta


def _fused_module(lin: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    fused = copy.deepcopy(lin)
    ref = lin.weight
    with torch.no_grad():
        fused.weight.copy_(weight.to(ref.dtype))
        if fused.bias is None:
            fused.bias = nn.Parameter(ref.new_zeros(ref.shape[0]), requires_grad=ref.requires_grad)
        fused.bias.copy_(bias.to(ref.dtype))
    return fused


def _probe(lin: nn.Module) -> Tensor:
    """A small float64 input that ``lin`` accepts."""
    if isinstance(lin, nn.Linear):
        return torch.randn(2, lin.in_features, dtype=torch.float64)
    sizes = []
    for i in range(len(lin.kernel_size)):
        extent = lin.dilation[i] * (lin.kernel_size[i] - 1) + 1
        pad = lin.padding[i] if isinstance(lin.padding, tuple) else extent
        sizes.append(extent + pad + lin.stride[i])
    return torch.randn(2, lin.in_channels, *sizes, dtype=torch.float64)


def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def _default_tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)


def _mismatch(got: Tensor, want: Tensor, rtol: float, atol: float) -> float | None:
    """Largest violation of ``|got - want| <= atol·max(1, max|want|) + rtol·|want|``."""
    g, w = got.detach().double(), want.detach().double()
    scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
    err = (g - w).abs() - (atol * scale + rtol * w.abs())
    worst = float(err.max()) if err.numel() else 0.0
    return None if worst <= 0 else float((g - w).abs().max())


def fuse_conv_bn(
    model: nn.Module,
    check_inputs: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> nn.Module:
    """Fold eval-mode BatchNorm / frozen BatchNorm into the Conv or Linear before it.

    .. math:: W' = W\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}},\\qquad
              b' = (b - \\mu)\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

    **Scope**: adjacent pairs ``(conv, bn)`` inside ``nn.Sequential`` containers
    (at any depth), where conv is exactly ``nn.Conv1d/2d/3d`` or ``nn.Linear``
    (subclasses such as weight-standardized convs transform their weight in
    forward and cannot be folded) and bn is a BatchNorm (:func:`is_batch_norm`)
    or frozen BatchNorm (:func:`is_frozen_batch_norm`). A conv without bias gets
    one. The conv is replaced by a fused copy and the BN by ``nn.Identity`` (so
    Sequential indices keep their meaning). Pairs wired in a custom ``forward``
    (``self.bn(self.conv(x))``) are not seen; torch.fx graphs are not handled.

    The folded weights are computed in float64 and each pair is checked
    numerically (float64, random probe input) before the model is touched.
    With ``check_inputs`` (a batch as accepted by
    :func:`normlab.recalibrate.recalibrate`), the whole model's outputs before
    and after are compared too, and the model is restored on a mismatch.

    Args:
        model: modified in place and returned. Must not be a bare conv or BN.
        check_inputs: optional example input (tensor, tuple, or dict).
        rtol, atol: tolerance of the ``check_inputs`` comparison (default by
            output dtype: 1e-8 fp64, 1e-4 fp32, 1e-2 otherwise; ``atol`` scales
            with the output's magnitude).

    Raises:
        ValueError: a BatchNorm next to a conv is in training mode or keeps no
            running statistics; the channel counts differ; or the conv is used in
            more than one place (folding would break the weight sharing).
        RuntimeError: the fused outputs do not match.
    """
    slots: dict[int, set[tuple[int, str]]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), set()).add((id(parent), name))
    paths = {id(m): p for p, m in reversed(list(model.named_modules(remove_duplicate=False)))}

    plan: list[tuple[nn.Sequential, str, str, nn.Module, nn.Module]] = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = [k for k, m in seq._modules.items() if m is not None]
        for k_lin, k_bn in zip(keys[:-1], keys[1:], strict=True):
            lin, bn = seq._modules[k_lin], seq._modules[k_bn]
            if type(lin) not in _FOLDABLE:
                continue
            frozen = is_frozen_batch_norm(bn)
            if not (frozen or is_batch_norm(bn)):
                continue
            where = paths.get(id(bn), k_bn) or "<model>"
            if not frozen and bn.training:
                raise ValueError(
                    f"fuse_conv_bn: {where} ({type(bn).__name__}) is in training mode, where it "
                    "normalizes with batch statistics that cannot be folded into weights. "
                    "Call model.eval() before fusing."
                )
            if getattr(bn, "running_mean", None) is None or bn.running_var is None:
                raise ValueError(
                    f"fuse_conv_bn: {where} keeps no running statistics "
                    "(track_running_stats=False) and normalizes with batch statistics even in "
                    "eval, which cannot be folded. Recreate it with track_running_stats=True "
                    "and recalibrate it first."
                )
            if lin.weight.shape[0] != bn.running_mean.shape[0]:
                raise ValueError(
                    f"fuse_conv_bn: {paths.get(id(lin), k_lin)} has {lin.weight.shape[0]} "
                    f"outputs but {where} has {bn.running_mean.shape[0]} channels."
                )
            if len(slots.get(id(lin), ())) > 1:
                raise ValueError(
                    f"fuse_conv_bn: {paths.get(id(lin), k_lin)} ({type(lin).__name__}) is "
                    f"registered in {len(slots[id(lin)])} places; folding {where} into it would "
                    "silently untie the shared weights. Give each use its own module (or "
                    "fuse a copy) first."
                )
            plan.append((seq, k_lin, k_bn, lin, bn))

    fused_modules = []
    for _, _, _, lin, bn in plan:
        w64, b64 = _fold(lin, bn)
        probe = _probe(lin)
        ref = copy.deepcopy(bn).double().eval()(copy.deepcopy(lin).double()(probe))
        got = _fused_module(copy.deepcopy(lin).double(), w64, b64)(probe)
        bad = _mismatch(got, ref, 1e-9, 1e-9)
        if bad is not None:
            raise RuntimeError(
                f"fuse_conv_bn: folding {paths.get(id(bn))} ({type(bn).__name__}) into "
                f"{paths.get(id(lin))} does not reproduce its output (max abs error {bad:.3g} "
                "in float64); this BN variant does not compute "
                "(x - running_mean) / sqrt(running_var + eps) * weight + bias."
            )
        fused_modules.append(_fused_module(lin, w64, b64))

    before = None
    if check_inputs is not None:
        with torch.no_grad():
            before = _flatten(_feed(model, check_inputs, None))

    undo = []
    for (seq, k_lin, k_bn, lin, bn), fused in zip(plan, fused_modules, strict=True):
        undo.append((seq, k_lin, lin, k_bn, bn))
        setattr(seq, k_lin, fused)
        setattr(seq, k_bn, nn.Identity())

    if before is not None:
        with torch.no_grad():
            after = _flatten(_feed(model, check_inputs, None))
        problem = None
        if len(after) != len(before):
            problem = f"{len(before)} output tensors before, {len(after)} after"
        for i, (a, b) in enumerate(zip(after, before, strict=False)):
            tol = _default_tol(b.dtype)
            bad = _mismatch(a, b, tol if rtol is None else rtol, tol if atol is None else atol)
            if bad is not None:
                problem = f"output {i} differs by up to {bad:.3g}"
                break
        if problem is not None:
            for seq, k_lin, lin, k_bn, bn in undo:
                setattr(seq, k_lin, lin)
                setattr(seq, k_bn, bn)
            raise RuntimeError(
                f"fuse_conv_bn: the fused model does not match the original on check_inputs "
                f"({problem}); the model was restored. Common causes: the model is in "
                "training mode (dropout, other batch-statistics layers), or fp16 weights."
            )
    return model
