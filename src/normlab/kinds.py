"""What kind of normalization layer a module is, recognised without importing foreign libraries.

Both read the layer traits (:mod:`normlab.nn.traits`). What counts as a
BatchNorm (:func:`is_batch_norm`): torch's ``_BatchNorm`` subclasses
(``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, user subclasses) and normlab's
``BatchNorm1d/2d/3d`` (and their subclasses). normlab's other batch-statistics
layers (batch renorm, moving-average BN, ...) have their own semantics and are
not BatchNorms here.

What counts as a frozen BatchNorm (:func:`is_frozen_batch_norm`): normlab's
``FrozenBatchNorm1d/2d/3d`` and any module whose class name contains
``FrozenBatchNorm`` and that holds the buffers ``weight``, ``bias``,
``running_mean``, ``running_var`` (torchvision's, detectron2's and timm's layout).

Norm + activation layers (:func:`is_norm_act`): timm's ``BatchNormAct2d``,
``SyncBatchNormAct``, ``FrozenBatchNormAct2d``, ``GroupNormAct``,
``GroupNorm1Act``, ``LayerNormAct2d``, ... normalize, then apply a dropout
(``drop``) and an activation (``act``) held as submodules. They are recognised by
structure (a class name with ``Norm`` and ``Act`` and an ``act`` submodule), not
by importing timm. A tool that swaps such a layer for a plain norm must keep what
:func:`activation_tail` returns after it, or the network loses a nonlinearity.

A BatchNorm subclass that overrides ``forward`` and is not a known norm +
activation layer does something the tools cannot see (:func:`overrides_forward`);
they refuse it rather than replace it by a layer that drops that behaviour.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from . import nn as nnl
from .nn.traits import traits_of

__all__ = [
    "activation_tail",
    "holds_running_stats",
    "is_batch_norm",
    "is_frozen_batch_norm",
    "is_norm_act",
    "overrides_forward",
]


def has_trait(module: nn.Module, trait: str) -> bool:
    """Whether ``module``'s traits (:func:`normlab.nn.traits.traits_of`) say ``trait``;
    False for a module whose class has none."""
    traits = traits_of(module)
    return traits is not None and getattr(traits, trait)


def is_batch_norm(module: nn.Module) -> bool:
    """True for torch's BatchNorm family (incl. SyncBatchNorm) and normlab's BatchNorm*d."""
    return has_trait(module, "batch_norm")


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """True for normlab's FrozenBatchNorm*d and torchvision/detectron2-style frozen BN."""
    return has_trait(module, "frozen_batch_norm")


def holds_running_stats(module: nn.Module) -> bool:
    """True for a layer whose buffers a training forward updates (its traits say
    ``stateful``: torch's and normlab's BN, IN with running statistics, BRN, MABN, SN,
    EvoNorm B0, ...) and for any other module that holds a ``running_*`` buffer."""
    if has_trait(module, "stateful"):
        return True
    return any(n.startswith("running_") for n, b in module._buffers.items() if b is not None)


def is_norm_act(module: nn.Module) -> bool:
    """True for a norm + activation layer (timm's ``BatchNormAct2d``, ``GroupNormAct``, ...).

    Recognised by structure: the class name contains ``Norm`` and ``Act`` and the
    module holds an ``act`` submodule (and optionally a ``drop`` submodule).
    """
    name = type(module).__name__
    return (
        "Norm" in name
        and "Act" in name
        and isinstance(module._modules.get("act"), nn.Module)
        and (module._modules.get("drop") is None or isinstance(module._modules["drop"], nn.Module))
    )


def activation_tail(module: nn.Module) -> nn.Module | None:
    """What a norm + activation layer applies after normalizing; None for a plain norm.

    Returns ``nn.Sequential(drop=..., act=...)`` (only the submodules the layer
    has, in the order its forward applies them) that *shares* the layer's own
    submodules, so ``nn.Sequential(plain_norm, activation_tail(layer))`` computes
    what ``layer`` did and its state_dict keeps the names ``drop`` / ``act``.
    """
    if not is_norm_act(module):
        return None
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    drop = module._modules.get("drop")
    if isinstance(drop, nn.Module):
        parts["drop"] = drop
    parts["act"] = module._modules["act"]  # type: ignore[assignment]
    return nn.Sequential(parts)


_KNOWN_FORWARDS = {nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, nnl.BatchNorm2d.forward}


def overrides_forward(module: nn.Module) -> bool:
    """True for a BatchNorm subclass whose ``forward`` is not torch's or normlab's.

    Such a layer (a norm + activation, a custom BN with extra behaviour) cannot be
    replaced by a plain norm without losing what its forward adds; tools check
    :func:`is_norm_act` first (whose tail they can keep) and refuse the rest.
    False for layers that are not BatchNorms.
    """
    if not is_batch_norm(module):
        return False
    return getattr(type(module).forward, "__func__", type(module).forward) not in _KNOWN_FORWARDS
