"""What each normalization layer is, in one table: the facts the tools and the lab act on.

:func:`traits_of` answers for a module or a class. The table holds every public
layer class of :mod:`normlab.nn` (its 1d/2d/3d variants share one entry) and
torch's own norms; a subclass inherits its base's entry. The tools read it
(:mod:`normlab.convert`, :mod:`normlab.recalibrate`, :mod:`normlab.doctor`,
:mod:`normlab.distributed`, :mod:`normlab.kinds`), the lab derives which of its
norms can be synced or packed from it, and the tests' case tables derive their
expectations from it; ``tests/test_traits.py`` checks every entry against the
layer's behaviour.

A class outside the table takes part through the public extension protocol of
:mod:`normlab.recalibrate`: ``_recalibrate_kind`` (which statistic its running
buffers hold), ``_step_counter`` (``num_batches_tracked`` drives a schedule) and
``_recalibrate_unbiased``, declared on the user's class. Declared on a subclass
of a table class, they override the inherited entry.

Adding a layer: add its classes to :data:`LAYER_TRAITS` with their traits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from .batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .conv import CenteredConv2d, WSConv2d
from .cross_iteration_batch_norm import CrossIterationBatchNorm2d
from .evonorm import EvoNormB0_2d, EvoNormS0_2d
from .filter_response_norm import (
    TLU,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
)
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, LayerNorm2d
from .local_response_norm import LocalResponseNorm
from .moving_average_batch_norm import (
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)
from .rms_norm import RMSNorm, RMSNorm2d
from .switchable_norm import SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d

__all__ = ["RECALIBRATE_KINDS", "LAYER_TRAITS", "LayerTraits", "traits_of"]

#: The statistics a layer's running buffers can hold (see :mod:`normlab.recalibrate`).
RECALIBRATE_KINDS = ("batch_mean_var", "batch_second_moment", "instance_mean_var")


@dataclass(frozen=True)
class LayerTraits:
    """Facts about one layer class, in its default configuration.

    Attributes:
        batch_statistics: in training, a sample's output depends on the other
            samples of the batch (statistics over N).
        syncable: the constructor takes ``process_group``: the batch statistics
            can be computed over every process (:mod:`normlab.distributed`).
        channel_separable: statistics and parameters are per channel (or per
            group of channels) only, so S layers of C channels side by side are one
            layer of S·C channels (S·G groups): the lab packs seeds that way.
        recalibrate_kind: the statistic the running buffers hold, one of
            :data:`RECALIBRATE_KINDS`, or None (no running statistics).
        step_counter: ``num_batches_tracked`` drives a schedule (a warm-up, a
            ramp), so it changes the training output and recalibration keeps it.
        exact_gradient: the training backward is the derivative of the forward,
            so finite differences agree with it (False where a method stops a
            gradient or uses moving averages by design).
        stateful: a training forward (or backward) updates buffers. For a module,
            only when it holds any (``track_running_stats=False`` leaves none).
        batch_norm: a BatchNorm with torch's semantics: what ``convert_norms``,
            ``freeze_bn`` and ``fuse_conv_bn`` replace or fold.
        frozen_batch_norm: a BatchNorm frozen into a fixed affine map (its
            statistics are fixed by design, never recalibrated).
        recalibrate_unbiased: the running variance is the unbiased estimate
            (torch's convention); False stores the divide-by-n one.
    """

    batch_statistics: bool = False
    syncable: bool = False
    channel_separable: bool = False
    recalibrate_kind: str | None = None
    step_counter: bool = False
    exact_gradient: bool = True
    stateful: bool = False
    batch_norm: bool = False
    frozen_batch_norm: bool = False
    recalibrate_unbiased: bool = True

    def __post_init__(self) -> None:
        if self.recalibrate_kind is not None and self.recalibrate_kind not in RECALIBRATE_KINDS:
            raise ValueError(
                f"recalibrate_kind is {self.recalibrate_kind!r}, which normlab.recalibrate "
                f"does not know; use one of {', '.join(RECALIBRATE_KINDS)} or None (see the "
                "normlab.recalibrate docs)."
            )


_BATCH = LayerTraits(
    batch_statistics=True,
    syncable=True,
    channel_separable=True,
    recalibrate_kind="batch_mean_var",
    stateful=True,
)
_PER_SAMPLE = LayerTraits(channel_separable=True)
_MIXES_CHANNELS = LayerTraits()

_BATCH_NORM = dataclasses.replace(_BATCH, batch_norm=True)
_FROZEN = dataclasses.replace(_PER_SAMPLE, frozen_batch_norm=True)
_SCHEDULED = dataclasses.replace(_BATCH, step_counter=True, exact_gradient=False)
_INSTANCE = dataclasses.replace(_PER_SAMPLE, recalibrate_kind="instance_mean_var", stateful=True)


def _family(traits: LayerTraits, *classes: type) -> dict[type, LayerTraits]:
    return dict.fromkeys(classes, traits)


#: Layer class -> traits. Lookup walks the class's MRO, so subclasses inherit an entry.
LAYER_TRAITS: dict[type, LayerTraits] = {
    **_family(_BATCH_NORM, BatchNorm1d, BatchNorm2d, BatchNorm3d),
    **_family(_FROZEN, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d),
    # BRN: r and d carry no gradient; both run a warm-up / ramp on num_batches_tracked.
    **_family(_SCHEDULED, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
    # MABN: running_var holds the average of χ = E[x²]; its backward uses moving averages.
    **_family(
        dataclasses.replace(_SCHEDULED, recalibrate_kind="batch_second_moment"),
        MovingAverageBatchNorm1d,
        MovingAverageBatchNorm2d,
        MovingAverageBatchNorm3d,
    ),
    # CBN: BN's running statistics and burn-in on num_batches_tracked. Its backward is
    # the derivative with respect to its input, γ and β (the window's statistics are
    # constants); the convolution's weight gets none through the Taylor term, as the
    # authors' code.
    CrossIterationBatchNorm2d: dataclasses.replace(_BATCH, step_counter=True),
    # SN: the running statistics are its BN branch's; the LN branch and the per-layer
    # mixing weights tie channels together.
    **_family(
        dataclasses.replace(_BATCH, channel_separable=False),
        SwitchableNorm1d,
        SwitchableNorm2d,
        SwitchableNorm3d,
    ),
    **_family(_INSTANCE, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d),
    # EvoNorm-B0 keeps running_var only (the batch variance; B0 uses no mean).
    EvoNormB0_2d: _BATCH,
    **_family(_PER_SAMPLE, GroupNorm, EvoNormS0_2d, TLU),
    # FRN's ε is one tensor per layer (a learnable scalar with learnable_eps).
    **_family(_MIXES_CHANNELS, FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d),
    **_family(_MIXES_CHANNELS, LayerNorm, LayerNorm2d, LocalResponseNorm),
    **_family(_MIXES_CHANNELS, RMSNorm, RMSNorm2d),
    **_family(_MIXES_CHANNELS, CenteredConv2d, WSConv2d),
    # torch's own norms: BatchNorm*d, LazyBatchNorm*d and SyncBatchNorm (whose own
    # process_group is torch's, not normlab's: convert_sync replaces it), InstanceNorm*d.
    _TorchBatchNorm: dataclasses.replace(_BATCH_NORM, syncable=False),
    _TorchInstanceNorm: _INSTANCE,
    nn.GroupNorm: _PER_SAMPLE,
    nn.LayerNorm: _MIXES_CHANNELS,
    nn.LocalResponseNorm: _MIXES_CHANNELS,
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    LAYER_TRAITS[nn.RMSNorm] = _MIXES_CHANNELS

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_PROTOCOL = ("_recalibrate_kind", "_step_counter", "_recalibrate_unbiased")


def _looks_frozen(module: nn.Module) -> bool:
    """torchvision's / detectron2's / timm's frozen BatchNorm, recognised without importing
    them: a class name with ``FrozenBatchNorm`` holding the four statistic buffers."""
    return "FrozenBatchNorm" in type(module).__name__ and all(
        isinstance(module._buffers.get(b), Tensor) for b in _FROZEN_BUFFERS
    )


def _class_traits(cls: type) -> LayerTraits | None:
    base = next((LAYER_TRAITS[c] for c in cls.__mro__ if c in LAYER_TRAITS), None)
    declared = {a: getattr(cls, a) for a in _PROTOCOL if hasattr(cls, a)}
    if not declared:
        return base
    kind = declared.get("_recalibrate_kind", base.recalibrate_kind if base else None)
    if kind is not None and kind not in RECALIBRATE_KINDS:
        raise ValueError(
            f"{cls.__name__}._recalibrate_kind is {kind!r}, which normlab.recalibrate does not "
            f"know; use one of {', '.join(RECALIBRATE_KINDS)} (see the normlab.recalibrate docs)."
        )
    changes = {
        "recalibrate_kind": kind,
        "step_counter": bool(declared.get("_step_counter", base and base.step_counter)),
        "recalibrate_unbiased": bool(declared.get("_recalibrate_unbiased", True)),
    }
    if base is not None:
        return dataclasses.replace(base, **changes)
    if kind is None:
        return None
    batch = kind in ("batch_mean_var", "batch_second_moment")
    return LayerTraits(batch_statistics=batch, stateful=True, **changes)


def traits_of(layer: nn.Module | type) -> LayerTraits | None:
    """The traits of a layer (a module or a class), or None for a module that is not a norm.

    For a module, ``stateful`` is False when it holds no buffer to update (e.g.
    ``track_running_stats=False``), and a foreign frozen BatchNorm (torchvision's
    ``FrozenBatchNorm2d``, ...) is recognised by its buffers.

    Raises:
        ValueError: a class declares a ``_recalibrate_kind`` that is not one of
            :data:`RECALIBRATE_KINDS`.
    """
    if isinstance(layer, type):
        return _class_traits(layer)
    traits = _class_traits(type(layer))
    if _looks_frozen(layer):
        return _FROZEN if traits is None else dataclasses.replace(traits, frozen_batch_norm=True)
    if traits is None:
        return None
    if traits.stateful and not any(isinstance(b, Tensor) for b in layer._buffers.values()):
        return dataclasses.replace(traits, stateful=False)
    return traits
