"""What a lab run is and what it returns: :class:`RunConfig` in, :class:`RunRecord` out.

A :class:`RunConfig` holds every setting that determines one run; its :meth:`~RunConfig.key`
names the run in the store. A :class:`RunRecord` holds the outcome: the config, one
:class:`EpochStats` per evaluation point, the final test error and provenance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
from dataclasses import dataclass, field
from typing import Any

from ..defaults import (
    CLASSIFICATION_TASK,
    DEFAULT_BASE_LR,
    DEFAULT_EPOCHS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_TRAIN,
    DETECTION_TASK,
    TASKS,
)
from ..models.resnet import canonical_norm

__all__ = ["EpochStats", "RunConfig", "RunRecord", "versions"]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run; its :meth:`key` identifies it in the store."""

    norm: str
    batch_size: int
    seed: int
    # The numbers of the defaults, and why, are in defaults.py.
    epochs: int = DEFAULT_EPOCHS
    base_lr: float = DEFAULT_BASE_LR
    warmup_epochs: float = 0.5
    weight_decay: float = 5e-4
    data: str | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    max_train: int | None = DEFAULT_MAX_TRAIN
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 1
    #: Stride of the stem conv: 2 halves 16×16 inputs before the first stage, so four
    #: stages end at 1×1 (8, 4, 2, 1).
    stem_stride: int = 2
    ranks: int = 1
    device: str = "cpu"
    #: Train for exactly this many optimizer steps instead of ``epochs`` passes over the
    #: data (None: fixed epochs), so that large batches are not simply given fewer
    #: steps. The data order still reshuffles at every pass, ``epochs`` still sets the
    #: number of evaluation points (after steps ``⌊k · steps / epochs⌋``, k = 1 … epochs)
    #: and the warm-up stays the same fraction of training, ``warmup_epochs / epochs``.
    steps: int | None = None
    #: The user's network (``normlab sweep --model``): the factory's display name, e.g.
    #: ``"my_model.py:build"`` (None: the lab's ResNet, and ``widths``, ``blocks`` and
    #: ``stem_stride`` describe it; a user model ignores them).
    model: str | None = None
    #: Hash of the factory's source file: an edited file makes new runs, never stale
    #: resumed ones (:attr:`normlab.lab.models.user_factory.UserFactory.source_hash`).
    model_hash: str | None = None
    #: What the run learns (:data:`normlab.lab.defaults.TASKS`): ``"classification"``
    #: (the lab's ResNet, top-1 error) or ``"segmentation"`` (the lab's U-Net, per-pixel
    #: labels; :mod:`normlab.lab.tasks.segmentation`).
    task: str = CLASSIFICATION_TASK
    #: :func:`~normlab.lab.data.prepare.data_hash` of the prepared split the run trains on
    #: (None: not known yet; training fills it in, and refuses a split that differs).
    #: Part of the protocol, not of the key: a store refuses runs of another data variant
    #: instead of storing them beside the old ones.
    data_hash: str | None = None
    #: A detection run's pretraining protocol (:func:`normlab.lab.run.pretrain.spec`):
    #: its backbone starts from the weights that protocol trains. None: from scratch.
    pretrain: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", canonical_norm(self.norm))
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.norm == "bn_eval" and self.task != DETECTION_TASK:
            raise ValueError(
                "norm 'bn_eval' (frozen statistics, trainable affine) fine-tunes a pretrained "
                "backbone: it belongs to --task detection; use bn or frozen_bn here"
            )
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2, got {self.batch_size}: batch statistics need at "
                "least two samples"
            )
        if self.stem_stride < 1:
            raise ValueError(f"stem_stride must be >= 1, got {self.stem_stride}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < self.epochs:
            raise ValueError(
                f"steps must be >= epochs ({self.epochs}), got {self.steps}: with fixed steps, "
                "epochs is the number of evaluation points and each needs at least one step"
            )
        if (self.model is None) != (self.model_hash is None):
            raise ValueError(
                f"model and model_hash go together (got model={self.model!r}, "
                f"model_hash={self.model_hash!r}): a user model's runs are keyed by its source"
            )
        for name in ("base_lr", "warmup_epochs", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("stem_stride", 1)  # stored before the field existed: a stride-1 stem
        if "widths" in kw:
            kw["widths"] = tuple(kw["widths"])
        return cls(**kw)

    def key(self) -> str:
        """Stable identity of the run: a hash of every field except the device and the
        data hash.

        The device does not change what is measured, so a sweep started on CPU resumes
        on GPU without repeating finished runs. The data hash is checked, not keyed: a
        run of the same key on other data bits is refused by the store's protocol check
        (:mod:`normlab.lab.run.protocol`) rather than stored as a second result.
        """
        d = self.to_dict()
        d.pop("device")
        d.pop("data_hash")
        # Fields added later drop out at the value runs had before they existed, so
        # stores written then still resume.
        if d["ranks"] == 1:
            d.pop("ranks")
        if d["stem_stride"] == 1:
            d.pop("stem_stride")
        for name in ("steps", "model", "model_hash", "pretrain"):
            if d[name] is None:
                d.pop(name)
        if d["task"] == CLASSIFICATION_TASK:
            d.pop("task")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class EpochStats:
    """One evaluation point of a run: after epoch ``epoch`` (with ``RunConfig.steps``: after
    the ``epoch``-th of ``epochs`` equal shares of the steps). The train loss and error
    are averages over the steps since the previous point; the test error is in %."""

    epoch: int
    train_loss: float
    train_error: float
    test_error: float
    lr: float
    #: Optimizer steps taken when the point was evaluated (None: stored before it was kept).
    step: int | None = None
    #: Every test metric of a task that reports more than one, in % (segmentation:
    #: ``miou_error``, ``miou``, ``pixel_error``; :mod:`normlab.lab.tasks.segmentation`); empty for
    #: classification, whose one metric is ``test_error``.
    test_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunRecord:
    """The outcome of one run: config, per-epoch curves, final test error (%), provenance."""

    config: RunConfig
    epochs: list[EpochStats]
    final_error: float
    wall_time: float
    diverged: bool
    num_train: int
    num_test: int
    #: Side of the deepest stage's feature map (the lab's ResNet; 0: a user model).
    final_map: int
    versions: dict[str, str] = field(default_factory=dict)
    #: Seeds trained side by side in one packed model with this run (1: alone); a packed
    #: run's ``wall_time`` is its equal share of the job's wall time.
    packed: int = 1
    #: A user model's conversion for this run's norm
    #: (:meth:`normlab.lab.models.user_model.ConversionSummary.to_dict`); None for the lab's ResNet.
    conversion: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return self.config.key()

    @property
    def final_metrics(self) -> dict[str, float]:
        """The task's test metrics at the last evaluation point (empty: classification)."""
        return dict(self.epochs[-1].test_metrics) if self.epochs else {}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        d = dict(d)
        d["config"] = RunConfig.from_dict(d["config"])
        d["epochs"] = [EpochStats(**e) for e in d["epochs"]]
        return cls(**d)


def versions() -> dict[str, str]:
    """Provenance of a run: library versions, Python, platform."""
    import numpy as np
    import torch

    from ... import __version__

    return {
        "normlab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
