"""The user's network as the training loop's model builder (``normlab sweep --model``).

:class:`UserModelBuilder` is a :data:`normlab.lab.run.loop.ModelBuilder` that builds the
user's model for a run's norm (:func:`normlab.lab.models.user_model.build_user_model`) and
remembers what the conversion did, which the run's record keeps. It pickles as the
factory's spec, so spawned worker processes load the factory again themselves (and
refuse a source file edited since the sweep started).

User models train unpacked, one model per run: packing S seeds side by side needs a
network built to take S·C input channels, which only the lab's ResNet is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..models.user_model import TASKS, ConversionSummary, UserFactory, build_user_model
from .config import RunConfig

if TYPE_CHECKING:
    from ..data.images import Split

__all__ = ["UserModelBuilder"]


class UserModelBuilder:
    """Builds the user's model for each run; ``conversion(config)`` says what changed.

    Args:
        factory: the loaded factory (:func:`normlab.lab.models.user_model.load_factory`).
        task: ``"classification"`` or ``"segmentation"``: what the output must fit
            (detection: :class:`normlab.lab.run.user_detection.UserDetectionBuilder`);
            None: each run's own task (its config's ``task``, else classification).
    """

    def __init__(self, factory: UserFactory, task: str | None = None) -> None:
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
        self.factory = factory
        self.task = task
        self._summaries: dict[str, dict[str, Any]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (UserModelBuilder, (self.factory, self.task))

    def summary(
        self, config: RunConfig, split: Split, seed: int | None = None
    ) -> tuple[nn.Module, ConversionSummary]:
        """The model of ``config`` on ``split`` (seeded with ``seed``, default the run's)."""
        self._check_hash(config)
        return build_user_model(
            self.factory,
            config.norm,
            num_classes=split.num_classes,
            in_channels=split.in_channels,
            image_size=int(split.x_train.shape[-1]),
            seed=config.seed if seed is None else seed,
            task=self.task or getattr(config, "task", None) or "classification",
        )

    def _check_hash(self, config: RunConfig) -> None:
        if config.model_hash not in (None, self.factory.source_hash):
            raise ValueError(
                f"run planned for {config.model} with source hash {config.model_hash}, but "
                f"the builder holds {self.factory.name} with hash {self.factory.source_hash}"
            )

    def __call__(self, config: RunConfig, split: Split, packs: int = 1) -> nn.Module:
        if packs != 1:
            raise ValueError(
                f"{self.factory.name}: a user model trains one seed per model (unpacked); "
                f"it cannot be packed {packs} seeds side by side"
            )
        model, summary = self.summary(config, split)
        self._summaries[config.key()] = summary.to_dict()
        return model

    def conversion(self, config: RunConfig) -> dict[str, Any] | None:
        """The conversion summary of the model last built for ``config`` (None: not built)."""
        return self._summaries.get(config.key())

    def check(self, configs: Sequence[RunConfig], split: Split) -> dict[str, dict[str, Any]]:
        """Build each norm's model once (with its first run's seed) before anything trains.

        Returns:
            norm -> its conversion summary (``ConversionSummary.to_dict()``).

        Raises:
            ModelFactoryError: the factory fails, returns no module, its output does
                not fit the task, or a norm cannot convert it.
        """
        out: dict[str, dict[str, Any]] = {}
        for c in configs:
            if c.norm not in out:
                out[c.norm] = self.summary(c, split)[1].to_dict()
        return out
