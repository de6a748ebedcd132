"""One registry: name -> norm layer class, and one resolver.

Every factory is called as ``factory(num_features, **kwargs)``: GroupNorm-style
layers whose first argument is not the channel count are registered through a
small adapter that picks the number of groups.

Two names differ only in the activation: ``"frn"`` is Filter Response
Normalization with its TLU (``max(y, τ)``, a nonlinearity), ``"frn_linear"`` is
FRN alone, linear like the BatchNorm it usually replaces. EvoNorm B0 / S0 are
nonlinear by design and have no linear variant.

Three public ways in: :func:`create_norm` builds one layer (``create_norm("gn", 64)``),
:func:`norm_layer` turns a name into the ``norm_layer=`` argument that torchvision and
timm model constructors take, and :func:`get_norm_layer` resolves a name, class or
callable to its factory (what :func:`normlab.convert.convert_norms` takes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import nn as nnl
from ._core.checks import divisors_up_to
from .nn.traits import LayerTraits, traits_of

__all__ = [
    "ALIASES",
    "NORM_LAYERS",
    "auto_groups",
    "create_norm",
    "get_norm",
    "get_norm_layer",
    "group_norm_layer",
    "names_taking",
    "names_with",
    "norm_layer",
    "rank_matched",
]


def auto_groups(num_channels: int, preferred: int = 32) -> int:
    """``preferred`` groups if it divides C, else the largest divisor of C below it."""
    return divisors_up_to(num_channels, preferred)[0]


def group_norm_layer(num_features: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    """GroupNorm with ``num_features`` channels; groups default to :func:`auto_groups`."""
    groups = auto_groups(num_features) if num_groups is None else num_groups
    return nnl.GroupNorm(groups, num_features, **kwargs)


def _layer_norm(num_features: int, **kwargs: Any) -> nn.Module:
    """LayerNorm over the channels of (N, C, ...) (LayerNorm2d), or over (C,) for (N, C)."""
    return nnl.LayerNorm2d(num_features, **kwargs)


def _evonorm_s0(num_features: int, groups: int | None = None, **kwargs: Any) -> nn.Module:
    """EvoNormS0_2d with ``num_features`` channels; groups default to :func:`auto_groups`."""
    groups = auto_groups(num_features) if groups is None else groups
    return nnl.EvoNormS0_2d(num_features, groups, **kwargs)


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "bn": nnl.BatchNorm2d,
    "bn1d": nnl.BatchNorm1d,
    "bn3d": nnl.BatchNorm3d,
    "frozen_bn": nnl.FrozenBatchNorm2d,
    "gn": group_norm_layer,
    "ln": _layer_norm,
    "in": functools.partial(nnl.InstanceNorm2d, affine=True),
    "frn": nnl.FilterResponseNorm2d,
    "frn_linear": functools.partial(nnl.FilterResponseNorm2d, tlu=False),
    "sn": nnl.SwitchableNorm2d,
    "mabn": nnl.MovingAverageBatchNorm2d,
    "brn": nnl.BatchRenorm2d,
    "cbn": nnl.CrossIterationBatchNorm2d,
    "evonorm_b0": nnl.EvoNormB0_2d,
    "evonorm_s0": _evonorm_s0,
    "rms": nnl.RMSNorm2d,
}


#: The names other libraries give norms (detectron2's ``get_norm``, timm's ``create_norm``,
#: MONAI's ``Norm``), exact spellings -> (registry name, keywords bound). docs/frameworks.md
#: shows this table; a name of NORM_LAYERS (any case, ``-`` for ``_``) is found first.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    # detectron2 (MODEL.RESNETS.NORM, get_norm(norm, out_channels)); "" is no norm.
    "BN": ("bn", {}),
    "SyncBN": ("bn", {"process_group": "world"}),
    "nnSyncBN": ("bn", {"process_group": "world"}),
    "naiveSyncBN": ("bn", {"process_group": "world"}),
    "FrozenBN": ("frozen_bn", {}),
    "GN": ("gn", {"num_groups": 32}),
    "LN": ("ln", {}),
    # timm (timm.layers.create_norm / get_norm_layer)
    "batchnorm": ("bn", {}),
    "batchnorm1d": ("bn1d", {}),
    "batchnorm2d": ("bn", {}),
    "groupnorm": ("gn", {"num_groups": 32}),
    "groupnorm1": ("gn", {"num_groups": 1}),
    "layernorm2d": ("ln", {}),
    "frozenbatchnorm2d": ("frozen_bn", {}),
    "rmsnorm2d": ("rms", {}),
    # MONAI (monai.networks.layers.Norm names; a ("group", {"num_groups": 8}) tuple
    # passes its keywords, see get_norm)
    "batch": ("bn", {}),
    "instance": ("in", {"affine": False}),
    "group": ("gn", {}),
    "syncbatch": ("bn", {"process_group": "world"}),
}


def get_norm(
    norm: str | tuple[str, dict[str, Any]] | type | Callable[..., nn.Module] | None,
    out_channels: int,
) -> nn.Module | None:
    """detectron2's ``get_norm(norm, out_channels)`` for every name normlab knows.

    ``norm``: None or ``""`` (no norm: None, as detectron2), a registry name or an
    :data:`ALIASES` spelling (``"SyncBN"``, ``"groupnorm"``, ``"batch"``), MONAI's
    ``(name, {keywords})`` tuple, or a class / callable taking the channel count.
    """
    if norm is None or norm == "":
        return None
    if isinstance(norm, tuple):
        if len(norm) != 2 or not isinstance(norm[1], dict):
            raise TypeError(
                f"get_norm: a tuple norm is MONAI's (name, {{keywords}}), got {norm!r}."
            )
        return create_norm(norm[0], out_channels, **norm[1])
    return create_norm(norm, out_channels)


def names_with(trait: str) -> list[str]:
    """Registry names whose layer has ``trait`` (a field of
    :class:`normlab.nn.traits.LayerTraits`, e.g. ``"syncable"``), in registry order."""
    if trait not in {f.name for f in dataclasses.fields(LayerTraits)}:
        raise ValueError(f"names_with: {trait!r} is not a field of normlab.nn.traits.LayerTraits.")
    return [n for n in NORM_LAYERS if getattr(traits_of(create_norm(n, 8)), trait)]


def get_norm_layer(name: str | type | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Resolve a registry name, a class or a callable (e.g. functools.partial)."""
    if isinstance(name, str):
        key = name.lower().replace("-", "_")
        if key in NORM_LAYERS:
            return NORM_LAYERS[key]
        if name in ALIASES:
            target, bound = ALIASES[name]
            return functools.partial(NORM_LAYERS[target], **bound) if bound else NORM_LAYERS[target]
        raise KeyError(
            f"unknown norm {name!r}; known names: {', '.join(sorted(NORM_LAYERS))}, and the "
            f"other libraries' names {', '.join(sorted(ALIASES))}. You can also pass a class "
            "or a functools.partial."
        )
    if isinstance(name, type) or isinstance(name, functools.partial) or callable(name):
        return name
    raise TypeError(f"expected a norm name, class or callable, got {type(name).__name__}")


def create_norm(
    name: str | type | Callable[..., nn.Module], num_features: int, **kwargs: Any
) -> nn.Module:
    """Build a norm layer for ``num_features`` channels: ``create_norm("gn", 64)``."""
    return get_norm_layer(name)(num_features, **kwargs)


def names_taking(rank: int, dims: int) -> list[str]:
    """Registry names whose layer, matched to ``rank`` spatial dims (``BatchNorm3d`` for
    ``"bn"`` at rank 3), runs on a ``dims``-D input (``(N, C)`` is 2-D), in registry order."""
    names = []
    for name, factory in NORM_LAYERS.items():
        layer = rank_matched(factory, rank)(4).eval()
        try:
            with torch.no_grad():
                layer(torch.randn((2, 4) + (3,) * (dims - 2)) + 0.5)
        except Exception:  # the layer refuses this input: not a candidate
            continue
        names.append(name)
    return names


def rank_matched(factory: Callable[..., nn.Module], rank: int | None) -> Callable[..., nn.Module]:
    """For a class named ``...2d`` (or a partial of one), its ``...1d`` / ``...3d`` sibling.

    The sibling is looked up in the class's own module; a factory without one
    (or a plain function) is returned as it is.
    """
    if isinstance(factory, functools.partial):
        func = rank_matched(factory.func, rank)
        if func is factory.func:
            return factory
        return functools.partial(func, *factory.args, **factory.keywords)
    if rank is None or not isinstance(factory, type):
        return factory
    name = factory.__name__
    if len(name) > 2 and name[-2] in "123" and name[-1] == "d" and name[-2] != str(rank):
        sibling = getattr(sys.modules[factory.__module__], f"{name[:-2]}{rank}d", None)
        if isinstance(sibling, type) and issubclass(sibling, nn.Module):
            return sibling
    return factory


_ACT_KEYS = ("act_layer", "apply_act", "act_kwargs", "inplace", "drop_layer")


def _build_norm_layer(
    num_features: int,
    *,
    norm: str | type | Callable[..., nn.Module],
    rank: int = 2,
    **kwargs: Any,
) -> nn.Module:
    """Build ``norm`` for ``num_features`` channels: what a :func:`norm_layer` partial calls.

    ``device`` / ``dtype`` given as None (timm passes them always) are dropped.
    With ``act_layer`` bound, the layer is a norm + activation, timm's protocol:
    ``nn.Sequential(norm=..., [drop=...,] act=...)``, the activation built as
    ``act_layer(**act_kwargs, inplace=inplace)`` unless ``apply_act=False``.
    """
    kwargs = {k: v for k, v in kwargs.items() if not (k in ("device", "dtype") and v is None)}
    act = {k: kwargs.pop(k) for k in _ACT_KEYS if k in kwargs}
    if act and act.get("act_layer") is None:
        raise TypeError(
            f"norm_layer({norm!r}) was called as a norm + activation layer (with "
            f"{sorted(act)}), as timm does for models built from BatchNormAct2d "
            "(EfficientNet, MobileNet, ...), but timm does not pass the activation to a "
            "function norm_layer, so the model would lose every activation. Bind it: "
            f"norm_layer({norm!r}, act_layer=torch.nn.SiLU) (the model's own activation)."
        )
    factory = rank_matched(get_norm_layer(norm), rank)
    try:
        layer = factory(int(num_features), **kwargs)
    except TypeError as e:
        raise TypeError(
            f"norm_layer({norm!r}): building it for {num_features} channels with "
            f"{sorted(kwargs)} failed: {e}. The model constructor passed keywords this norm "
            "does not take; bind the ones it does take in norm_layer(...) instead."
        ) from e
    return _with_activation(layer, **act) if act else layer


def _with_activation(
    layer: nn.Module,
    act_layer: Callable[..., nn.Module],
    apply_act: bool = True,
    act_kwargs: dict[str, Any] | None = None,
    inplace: bool = False,
    drop_layer: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """``nn.Sequential(norm=layer, [drop=...,] act=...)``, what timm's norm + act layers compute."""
    parts: dict[str, nn.Module] = {"norm": layer}
    if drop_layer is not None:
        parts["drop"] = drop_layer()
    if not apply_act:
        parts["act"] = nn.Identity()
    else:
        kw = dict(act_kwargs or {})
        try:
            takes_inplace = "inplace" in inspect.signature(act_layer).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_inplace = False
        if takes_inplace:
            kw.setdefault("inplace", inplace)
        parts["act"] = act_layer(**kw)
    return nn.Sequential(OrderedDict(parts))


def norm_layer(
    name: str | type | Callable[..., nn.Module], *, rank: int = 2, **kwargs: Any
) -> Callable[..., nn.Module]:
    """A ``norm_layer`` argument for torchvision / timm models: ``f(num_features, **kw)``.

    torchvision calls ``norm_layer(C)`` positionally; timm calls
    ``norm_layer(C, device=..., dtype=...)`` and only accepts a class, a function
    or a ``functools.partial`` (it unpacks partials and rebinds their keywords),
    so this returns a keyword-only partial of the module's builder (``_build_norm_layer``).

    timm models built from norm + activation layers (EfficientNet, MobileNetV3,
    ...) call it as one (``inplace=``, ``apply_act=``) and expect it to apply the
    activation, which they do not pass: bind ``act_layer`` (e.g.
    ``act_layer=torch.nn.SiLU``), or the call fails with that advice.

    Args:
        name: registry name, class or factory (see :func:`get_norm_layer`).
        rank: spatial rank of the model (3 for video / volumetric models): a
            ``...2d`` class is swapped for its ``...3d`` sibling.
        **kwargs: bound into every layer (e.g. ``num_groups=8``, ``act_layer=``).

    Example::

        >>> model = torchvision.models.resnet50(norm_layer=norm_layer("gn"))
        >>> model = timm.create_model("resnet50", norm_layer=norm_layer("frn_linear"))
        >>> model = timm.create_model(
        ...     "efficientnet_b0", norm_layer=norm_layer("gn", act_layer=torch.nn.SiLU)
        ... )
    """
    get_norm_layer(name)  # fail now on an unknown name, not inside the model constructor
    if rank not in (1, 2, 3):
        raise ValueError(f"norm_layer: rank must be 1, 2 or 3, got {rank!r}.")
    return functools.partial(_build_norm_layer, norm=name, rank=rank, **kwargs)
