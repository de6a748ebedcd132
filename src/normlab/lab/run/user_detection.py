"""The user's torchvision-style detector as the model builder of a detection sweep.

``normlab sweep --task detection --model file.py:factory`` builds the factory's detector
(:mod:`normlab.lab.models.user_detector` says which API it must follow) once per run, with
``num_classes=`` the object classes plus the background (torchvision's convention), and
applies the run's treatment to every BatchNorm of the model (a torchvision detector has
them in its backbone; FrozenBatchNorm counts too, since that is how torchvision builds a
pretrained backbone):

* a registry norm (``bn``, ``gn``, ...): the layers become that norm, as ``--model`` does
  for the other tasks (``bn``: trainable BatchNorm that starts from the factory's
  statistics);
* ``frozen_bn``, ``bn_eval``, ``bn+recal``: the factory's statistics frozen (affine too,
  affine trainable, or first re-estimated by precise BN on the first
  :data:`RECAL_IMAGES` training images), as for the lab's detector
  (:mod:`normlab.lab.run.pretrain`). Pretraining is the factory's to do (load its
  weights); a model whose BatchNorm still holds the initial statistics (mean 0, variance
  1 everywhere) has nothing to freeze and is refused.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...kinds import is_batch_norm
from ..defaults import DETECTION_FROZEN
from ..models.user_model import ConversionSummary, ModelFactoryError, UserFactory, build_user_model
from .config import RunConfig
from .pretrain import staleness
from .user_builder import UserModelBuilder

if TYPE_CHECKING:
    from ..data.images import Split

__all__ = ["RECAL_IMAGES", "DetectionSummary", "UserDetectionBuilder"]

#: Training images (in batches of :data:`_RECAL_BATCH`) that ``bn+recal`` re-estimates from.
RECAL_IMAGES = 512
_RECAL_BATCH = 8


@dataclasses.dataclass(frozen=True)
class DetectionSummary(ConversionSummary):
    """A conversion summary with the frozen statistics' staleness per BatchNorm in depth
    order (:func:`normlab.lab.run.pretrain.staleness`; None: not a frozen treatment)."""

    staleness: tuple[float | None, ...] | None = None


def _untrained(model: nn.Module) -> bool:
    """True when every BatchNorm holds the initial statistics (mean 0, variance 1)."""
    layers = [m for m in model.modules() if is_batch_norm(m) and m.running_mean is not None]
    return bool(layers) and all(
        bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in layers
    )


def _image_batches(x: torch.Tensor, count: int) -> list[list[torch.Tensor]]:
    return [list(chunk) for chunk in x[:count].split(_RECAL_BATCH)]


class UserDetectionBuilder(UserModelBuilder):
    """Builds the user's detector for each run with its treatment (module docstring)."""

    def __init__(self, factory: UserFactory) -> None:
        super().__init__(factory, "detection")

    def __reduce__(self) -> tuple[Any, ...]:
        return (UserDetectionBuilder, (self.factory,))

    def summary(
        self, config: RunConfig, split: Split, seed: int | None = None
    ) -> tuple[nn.Module, ConversionSummary]:
        self._check_hash(config)
        treatment = config.norm
        frozen = treatment in DETECTION_FROZEN
        model, summary = build_user_model(
            self.factory,
            "bn" if frozen else treatment,
            num_classes=split.num_classes + 1,
            in_channels=split.in_channels,
            image_size=int(split.x_train.shape[-1]),
            seed=config.seed if seed is None else seed,
            task="detection",
            frozen=True,
        )
        fields = {k: getattr(summary, k) for k in summary.__dataclass_fields__}
        if not frozen:
            return model, DetectionSummary(**fields)
        from ...convert import freeze_bn

        if _untrained(model):
            raise ModelFactoryError(
                f"--norms {treatment} with {self.factory.name}: its BatchNorm layers hold their "
                "initial statistics (mean 0, variance 1 everywhere), so there is no pretrained "
                f"backbone for {treatment} to freeze; load pretrained weights in the factory, "
                "or use bn, gn or another norm that trains its statistics"
            )
        model.eval()
        if treatment == "bn+recal":
            from ...recalibrate import recalibrate

            batches = _image_batches(split.x_train, RECAL_IMAGES)
            recalibrate(model, batches, method="precise", progress=False)
        stale = staleness(model, _image_batches(split.x_train, 256))
        freeze_bn(model, stats_only=treatment == "bn_eval")
        model.train()
        how = {
            "frozen_bn": "statistics and affine frozen (FrozenBatchNorm)",
            "bn_eval": "statistics frozen, affine trained (freeze_bn(stats_only=True))",
            "bn+recal": f"statistics re-estimated by precise BN on {RECAL_IMAGES} training "
            "images, then frozen with the affine (FrozenBatchNorm)",
        }[treatment]
        fields.update(norm=treatment, notes=(*summary.notes, f"{treatment}: the factory's {how}"))
        return model, DetectionSummary(**fields, staleness=tuple(stale))
