"""Which task and default model a run of each ``RunConfig.task`` trains.

Classification is the loop's own default (:data:`~normlab.lab.tasks.task.CLASSIFICATION`
and the lab's ResNet); every other task names its :class:`~normlab.lab.tasks.task.Task`
and its default model builder here, the one place the loop asks. A detection run of the
user's model (``RunConfig.model``) follows the torchvision detection API
(:class:`~normlab.lab.tasks.detection_api.DetectorAPI`); the lab's detector, CenterNet's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..defaults import DETECTION_TASK, SEGMENTATION_TASK
from .detection import Detection, detection_model
from .detection_api import DetectorAPI
from .segmentation import Segmentation, segmentation_model
from .task import Task

if TYPE_CHECKING:
    from ..run.config import RunConfig

__all__ = ["task_defaults"]


def task_defaults(config: RunConfig, split: Any) -> tuple[Task, Callable[..., Any]] | None:
    """``(task, default model builder)`` of ``config.task`` on ``split``; None for
    classification (the loop's defaults)."""
    if config.task == SEGMENTATION_TASK:
        return Segmentation(split.num_classes, getattr(split, "ignore_index", 255)), (
            segmentation_model
        )
    if config.task == DETECTION_TASK:
        kind = Detection if getattr(config, "model", None) is None else DetectorAPI
        return kind(split.num_classes, int(split.y_train.shape[1])), detection_model
    return None
