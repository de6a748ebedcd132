"""What kind of normalization layer a module is, recognised without importing foreign libraries.

What counts as a BatchNorm (:func:`is_batch_norm`): torch's ``_BatchNorm``
subclasses (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, user subclasses) and
normlab's ``BatchNorm1d/2d/3d``. normlab's other batch-statistics layers (batch
renorm, moving-average BN, ...) have their own semantics and are not BatchNorms
here.

What counts as a frozen BatchNorm (:func:`is_frozen_batch_norm`): normlab's
``FrozenBatchNorm1d/2d/3d`` and any module whose class name contains
``FrozenBatchNorm`` and that holds the buffers ``weight``, ``bias``,
``running_mean``, ``running_var`` (torchvision's and detectron2's layout).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from . import nn as nnl
from .nn.batch_norm import _FrozenBatchNorm

__all__ = ["is_batch_norm", "is_frozen_batch_norm"]

_NORMLAB_BN = (nnl.BatchNorm1d, nnl.BatchNorm2d, nnl.BatchNorm3d)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


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
