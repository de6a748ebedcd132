"""BatchNorm with its running statistics fixed and γ/β trainable (``freeze_bn(stats_only=True)``).

mmdetection's ``norm_eval=True`` and most fine-tuning recipes keep a BatchNorm's
statistics as they are while its affine parameters train. A BatchNorm normalizes
with its running statistics, and leaves them alone, exactly when its ``training``
flag is False; so a stats-frozen layer is the same module whose class is swapped for
a subclass of its own class in which ``training`` always reads False. Setting the
flag (``model.train()``, ``model.eval()``, a direct assignment) records the mode
asked for, which :func:`thaw_stats` restores. Nothing else changes: the same
parameters and buffers (an optimizer holding them keeps working), the same
state_dict keys, the same forward, so every tool treats the layer as the BatchNorm
(torch's, normlab's, ``SyncBatchNorm``, timm's ``BatchNormAct2d``, ...) it was.
Dropout and activation submodules of a norm + activation layer follow the model's
mode as before.

The subclasses are made once per base class; a stats-frozen layer pickles and
deep-copies as one (its reduction rebuilds the subclass from the base).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..kinds import is_batch_norm

__all__ = [
    "asked_training",
    "carry_stats_freeze",
    "freeze_stats",
    "is_stats_frozen",
    "stats_frozen_class",
    "thaw_stats",
]

_ASKED = "_stats_frozen_asked_training"
_CLASSES: dict[type, type] = {}


class _StatsFrozen:
    """Mixin placed before the BatchNorm class: ``training`` reads False, writes are recorded."""

    _stats_frozen_base: type

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__[_ASKED] = bool(mode)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild, (self._stats_frozen_base,), self.__getstate__())


def _rebuild(base: type) -> nn.Module:
    cls = stats_frozen_class(base)
    return cls.__new__(cls)


def stats_frozen_class(base: type) -> type:
    """The stats-frozen subclass of the BatchNorm class ``base`` (made once per base)."""
    if issubclass(base, _StatsFrozen):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"FixedStats{base.__name__}"
        cls = type(name, (_StatsFrozen, base), {"_stats_frozen_base": base})
        cls.__module__, cls.__qualname__ = __name__, name
        _CLASSES[base] = cls
    return cls


def is_stats_frozen(module: nn.Module) -> bool:
    """True for a BatchNorm whose statistics :func:`freeze_stats` fixed."""
    return isinstance(module, _StatsFrozen)


def freeze_stats(module: nn.Module) -> nn.Module:
    """Fix ``module``'s running statistics in place (γ/β untouched); returns it."""
    if is_stats_frozen(module):
        return module
    asked = bool(module.__dict__.pop("training", False))
    module.__class__ = stats_frozen_class(type(module))
    module.__dict__[_ASKED] = asked
    return module


def thaw_stats(module: nn.Module) -> nn.Module:
    """Undo :func:`freeze_stats` in place: the base class again, in the mode last asked for."""
    if not is_stats_frozen(module):
        return module
    asked = bool(module.__dict__.pop(_ASKED, False))
    module.__class__ = type(module)._stats_frozen_base
    module.training = asked
    return module


def asked_training(module: nn.Module) -> bool:
    """The mode a stats-frozen layer was last put in (its ``training`` for any other module)."""
    return bool(module.__dict__.get(_ASKED, False)) if is_stats_frozen(module) else module.training


def carry_stats_freeze(new: nn.Module) -> bool:
    """Fix ``new``'s statistics when it is a BatchNorm (a tool replacing a stats-frozen layer
    keeps what it computes); False when it is not, so the caller can say so."""
    if not is_batch_norm(new):
        return False
    freeze_stats(new)
    return True
