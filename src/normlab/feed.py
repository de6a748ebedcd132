"""Run a model on one batch, whatever shape the batch comes in.

Every tool that runs the user's model (recalibration, the doctor, the fusion
check) feeds batches through :func:`feed`, so they all accept the same inputs:

- a ``Tensor``: ``model(x)``;
- a list or tuple whose items are all 3-D tensors (C, H, W), possibly of
  different sizes: a list of images, as torchvision's detectors and
  segmentation wrappers take them: ``model(list(batch))``;
- any other tuple or list: ``model(*batch)`` (e.g. ``(images, targets)`` for a
  detector in training mode, or ``(x,)``);
- a mapping: ``model(**batch)``;
- anything else needs ``forward_fn(model, batch)``, which always wins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["ForwardFn", "feed", "is_image_list"]

ForwardFn = Callable[[nn.Module, Any], Any]


def is_image_list(batch: Any) -> bool:
    """True for a non-empty list/tuple of 3-D tensors (C, H, W): a list of images."""
    return (
        isinstance(batch, (tuple, list))
        and len(batch) > 0
        and all(isinstance(t, Tensor) and t.dim() == 3 for t in batch)
    )


def feed(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """Run ``model`` on ``batch`` as described in the module docstring; returns its output."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if is_image_list(batch):
        return model(list(batch))
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: expected a tensor "
        "(model(x)), a list of (C, H, W) images (model(images)), a tuple/list (model(*batch)) "
        "or a dict (model(**batch)). Pass forward_fn=lambda model, batch: ... to say how to "
        "run it."
    )
