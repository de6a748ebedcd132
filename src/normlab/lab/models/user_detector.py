"""The user's torchvision-style detector in the lab (``--task detection --model file.py:f``).

A torchvision-style detector takes a list of (C, H, W) images. In training mode it also
takes one target dict per image (``boxes`` (m, 4) float as x1, y1, x2, y2 in pixels,
``labels`` (m,) int64) and returns a dict of scalar losses; in eval mode it returns one
dict per image with ``boxes`` (n, 4), ``labels`` (n,) and ``scores`` (n,). torchvision's
classes count the background as label 0, so the lab's class k is label k + 1 and the
factory's ``num_classes=`` is the number of object classes plus one.

:func:`to_targets` and :func:`to_rows` translate between that API and the lab's target
rows ``[class, x1, y1, x2, y2]`` (class -1: padding) and detection rows ``[score, class,
x1, y1, x2, y2]``; :func:`check_detector` runs the API once on two random images before
anything trains, so a model that does not follow it gets one clear line.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .user_factory import ModelFactoryError

__all__ = ["API_TOP_K", "check_detector", "to_rows", "to_targets"]

#: Detections kept per image: COCO's ``maxDets``, the most its AP ever ranks.
API_TOP_K = 100
_API = (
    "a torchvision-style detector (train: model(images, targets) -> dict of losses; eval: "
    "model(images) -> one dict of boxes, labels, scores per image)"
)


def to_targets(target: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One torchvision target dict per image from target rows (B, M, 5); padding dropped."""
    out = []
    for rows in target:
        keep = rows[:, 0] >= 0
        out.append({"boxes": rows[keep, 1:5].float(), "labels": rows[keep, 0].long() + 1})
    return out


def to_rows(outputs: list[Any], top_k: int = API_TOP_K) -> torch.Tensor:
    """Detection rows (B, top_k, 6) ``[score, class, x1, y1, x2, y2]`` from a detector's
    per-image dicts: the ``top_k`` best by score, padded with class -1 and score 0."""
    rows = torch.zeros(len(outputs), top_k, 6)
    rows[..., 1] = -1.0
    for i, out in enumerate(outputs):
        scores = out["scores"].detach().float().cpu()
        order = scores.argsort(descending=True)[:top_k]
        n = len(order)
        rows[i, :n, 0] = scores[order]
        rows[i, :n, 1] = out["labels"].detach().cpu()[order].float() - 1.0
        rows[i, :n, 2:] = out["boxes"].detach().float().cpu()[order]
    return rows


def _fail(name: str, what: str) -> ModelFactoryError:
    return ModelFactoryError(f"{name}: {what}; --task detection needs {_API}.")


def _check_losses(losses: Any, name: str) -> None:
    if not isinstance(losses, Mapping) or not losses:
        shown = type(losses).__name__
        raise _fail(
            name,
            f"in training mode model(images, targets) returned a {shown}, not a dict of losses",
        )
    for key, value in losses.items():
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise _fail(name, f"its training loss {key!r} is not a scalar tensor")
        if not value.requires_grad:
            raise _fail(name, f"its training loss {key!r} does not depend on the weights")
        if not bool(torch.isfinite(value.detach())):
            raise _fail(name, f"its training loss {key!r} is {float(value)} on random images")


def _check_detections(outputs: Any, name: str) -> None:
    if not isinstance(outputs, (list, tuple)) or len(outputs) != 2:
        raise _fail(
            name,
            f"in eval mode model(images) of 2 images returned {type(outputs).__name__}, "
            "not a list of 2 dicts",
        )
    for out in outputs:
        if not isinstance(out, Mapping) or not {"boxes", "labels", "scores"} <= set(out):
            keys = list(out) if isinstance(out, Mapping) else type(out).__name__
            raise _fail(name, f"an image's detections are {keys}, not boxes, labels, scores")
        n = len(out["scores"])
        if tuple(out["boxes"].shape) != (n, 4) or tuple(out["labels"].shape) != (n,):
            raise _fail(
                name,
                f"an image's boxes {tuple(out['boxes'].shape)} and labels "
                f"{tuple(out['labels'].shape)} do not match its {n} scores as (n, 4) and (n,)",
            )


def check_detector(
    model: nn.Module, *, num_classes: int, in_channels: int, image_size: int, name: str
) -> tuple[int, ...]:
    """Train and eval a copy of ``model`` on 2 random off-center images (one box each, of
    the first and the last object class; ``num_classes`` counts the background too);
    the model and torch's RNG are untouched. Returns the detection rows' shape per batch.

    Raises:
        ModelFactoryError: a forward fails, or its result does not follow the API.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.3 * torch.randn(2, in_channels, image_size, image_size, generator=gen)
    images = list(x.to(device))
    lo, hi = image_size / 4, 3 * image_size / 4
    target = torch.tensor([[[0, lo, lo, hi, hi]], [[num_classes - 2, 0, 0, hi, lo]]])
    targets = [{k: v.to(device) for k, v in t.items()} for t in to_targets(target)]
    probe = copy.deepcopy(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for mode in ("training", "eval"):
            try:
                if mode == "training":
                    result = probe.train()(images, targets)
                else:
                    with torch.no_grad():
                        result = probe.eval()(images)
            except Exception as e:
                call = "model(images, targets)" if mode == "training" else "model(images)"
                raise _fail(
                    name,
                    f"in {mode} mode {call} on 2 images of {in_channels}×{image_size}×"
                    f"{image_size} failed with {type(e).__name__}: {e}",
                ) from e
            (_check_losses if mode == "training" else _check_detections)(result, name)
    return (2, API_TOP_K, 6)
