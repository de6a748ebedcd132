"""Object detection data for the lab: built-in detection scenes (boxes and classes).

Detection is where small batches are the rule (large images, a few per GPU) and where a
backbone pretrained on other images is the rule too, so the built-in scenes are a
*different image distribution* from the classification images the backbone is
pretrained on (grayscale 28×28 silhouettes, white on black, one centred animal per
image): RGB, textured backgrounds, several coloured animals of varied sizes anywhere in
the image.

Recipe (:func:`detection_scenes`), all from ``numpy.random.default_rng`` streams seeded
by the dataset ``seed`` (default 0), so the same arguments give the same tensors:

1. Source silhouettes: the embedded Animal-MNIST (10,000 silhouettes, 10 classes). Within
   each class a permutation (stream ``[seed, 10]``) puts 20 % in the test pool and the
   rest in the training pool: test scenes show animals never seen in training.
2. Each scene (training scenes from stream ``[seed, 11]``, test scenes from
   ``[seed, 12]``; the test set does not depend on the number of training scenes) is an
   S × S RGB image (S = ``image_size``, default 48) with values in [0, 1]:

   - background: a colour b ~ U(0.2, 0.8)³ plus three sinusoidal gratings, drawn exactly
     as the segmentation scenes' (:mod:`normlab.lab.data.scenes`), then at half their
     contrast: each pixel moves halfway to the image's mean colour;
   - objects: a number ~ U{1, ..., ``max_objects``} (default 3), each a silhouette drawn
     uniformly from the split's pool, resized (area averaging when shrinking, bilinear
     when enlarging) to a side s ~ U{round(0.3 S), ..., round(0.6 S)} giving an
     intensity m in [0, 1], with a colour c ~ U(0, 1)³. Its top-left corner is uniform
     over the positions that keep it inside the image; up to 10 positions are drawn and
     the first whose box covers at most 30 % of every earlier object's box is taken
     (no such position: the object is left out), so every object stays mostly visible.
     Painting: ``image = (1 - m) · image + m · c`` (the intensity is the opacity);
   - noise: ``clip(image + N(0, 0.04²), 0, 1)`` per pixel and channel.

   An object's box is the tight box of its pixels with m > 0.5, in pixel-edge
   coordinates ``(x1, y1, x2, y2)`` (a box over columns 3..7 is x1 = 3, x2 = 8); its class
   is "animal" (the default, ``labels="object"``) or the silhouette's animal class
   (``labels="animals"``, 10 classes; what the COCO export writes).
3. The images are standardized per channel with the training scenes' mean and std.

Targets (:class:`DetSplit`): float32 ``(N, M, 5)`` rows ``[class, x1, y1, x2, y2]``, M the
most objects of any image, rows of class ``-1`` padding. One tensor per split, so that
the training loop indexes targets as it indexes images. :mod:`normlab.lab.data.det_coco`
reads the same layout from a COCO annotations file and writes these scenes as one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from .images import ANIMAL_MNIST_CLASSES, ImageData, SplitViews, resize
from .prepare import standardize
from .scenes import _backgrounds, _silhouettes, _source_pools

__all__ = [
    "DEFAULT_DET_IMAGE_SIZE",
    "DEFAULT_DET_TEST",
    "DetData",
    "DetSplit",
    "detection_scenes",
    "pad_targets",
    "raw_detection_scenes",
]

#: Side of the built-in detection scenes.
DEFAULT_DET_IMAGE_SIZE = 48
#: Built-in test scenes (the training scenes: ``max_train``).
DEFAULT_DET_TEST = 300
_NOISE_STD = 0.04
_MASK_THRESHOLD = 0.5
_TRIES = 10
#: The gratings' contrast relative to the segmentation scenes', and the objects' sides.
_TEXTURE = 0.5
_SIDES = (0.3, 0.6)
_MAX_COVER = 0.3


@dataclass(frozen=True)
class DetData(ImageData):
    """Unstandardized images ``x`` (float32 ``(N, C, S, S)`` in [0, 1]) and box targets ``y``
    (float32 ``(N, M, 5)``, module docstring), with the class names."""


@dataclass(frozen=True)
class DetSplit(SplitViews):
    """Standardized train and test images with box targets (module docstring)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    name: str


def pad_targets(boxes: list[np.ndarray], rows: int = 1) -> torch.Tensor:
    """Per-image ``(k_i, 5)`` rows ``[class, x1, y1, x2, y2]`` as one ``(N, M, 5)`` tensor,
    padded with class -1; M is the most rows of any image, at least ``rows`` (>= 1, so an
    empty set still has a row; a split pads its training and test targets alike)."""
    m = max([rows, *(len(b) for b in boxes)])
    out = np.full((len(boxes), m, 5), -1.0, dtype=np.float32)
    for i, b in enumerate(boxes):
        if len(b):
            out[i, : len(b)] = b
    return torch.from_numpy(out)


def _cover(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> float:
    """Share of ``other``'s area that ``box`` covers."""
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    area = (other[2] - other[0]) * (other[3] - other[1])
    return max(0, w) * max(0, h) / max(1, area)


def _compose(
    rng: np.random.Generator,
    n: int,
    size: int,
    pool: np.ndarray,
    silhouettes: torch.Tensor,
    labels: np.ndarray,
    max_objects: int,
) -> tuple[np.ndarray, list[np.ndarray]]:
    images = _backgrounds(rng, n, size)
    mean = images.mean(axis=(2, 3), keepdims=True)
    images = mean + _TEXTURE * (images - mean)
    lo, hi = round(_SIDES[0] * size), round(_SIDES[1] * size)
    boxes: list[np.ndarray] = []
    for i in range(n):
        count = int(rng.integers(1, max_objects + 1))
        rows: list[list[float]] = []
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            src = int(pool[rng.integers(0, len(pool))])
            side = int(rng.integers(lo, hi + 1))
            colour = rng.uniform(0.0, 1.0, size=3)
            corners = rng.integers(0, size - side + 1, size=(_TRIES, 2))
            m = resize(silhouettes[src : src + 1], side)[0, 0].numpy().astype(np.float64)
            ys, xs = np.nonzero(m > _MASK_THRESHOLD)
            if len(ys) == 0:
                continue
            for top, left in corners.tolist():
                box = (left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1)
                if all(_cover(box, p) <= _MAX_COVER for p in placed):
                    break
            else:
                continue
            region = images[i, :, top : top + side, left : left + side]
            region += m * (colour[:, None, None] - region)
            placed.append(tuple(int(v) for v in box))
            rows.append([float(labels[src]), *map(float, box)])
        boxes.append(np.asarray(rows, dtype=np.float32).reshape(-1, 5))
    images += rng.normal(0.0, _NOISE_STD, size=images.shape)
    return np.clip(images, 0.0, 1.0).astype(np.float32), boxes


def raw_detection_scenes(
    n: int,
    *,
    train: bool,
    image_size: int = DEFAULT_DET_IMAGE_SIZE,
    max_objects: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` unstandardized scenes of the training or test stream (images in [0, 1], and
    per image its ``(k, 5)`` box rows): what :func:`detection_scenes` standardizes and
    :func:`normlab.lab.data.det_coco.export_coco` writes."""
    if n < 1:
        raise DataError(f"the number of detection scenes must be >= 1, got {n}")
    if image_size < 16:
        raise DataError(f"image_size must be >= 16 for detection scenes, got {image_size}")
    if max_objects < 1:
        raise DataError(f"max_objects must be >= 1, got {max_objects}")
    silhouettes, classes = _silhouettes()
    train_pool, test_pool = _source_pools(classes, seed, stream=10)
    rng = np.random.default_rng([seed, 11 if train else 12])
    pool = train_pool if train else test_pool
    return _compose(rng, n, image_size, pool, silhouettes, classes, max_objects)


@functools.lru_cache(maxsize=4)
def detection_scenes(
    n_train: int,
    n_test: int = DEFAULT_DET_TEST,
    image_size: int = DEFAULT_DET_IMAGE_SIZE,
    max_objects: int = 3,
    seed: int = 0,
    labels: str = "object",
) -> DetSplit:
    """The built-in detection set (recipe in the module docstring), standardized; cached
    so that each worker process builds it once.

    ``labels="object"`` (the default): one class, "animal", for every object;
    ``"animals"``: the 10 animal classes. As for the segmentation scenes, telling ten
    small animals apart takes the lab's small detector many more epochs than a sweep
    affords; finding them is learned in a few, and the norms' differences show on it.
    """
    if labels not in ("object", "animals"):
        raise DataError(f"labels must be 'object' or 'animals', got {labels!r}")
    x_train, b_train = raw_detection_scenes(
        n_train, train=True, image_size=image_size, max_objects=max_objects, seed=seed
    )
    x_test, b_test = raw_detection_scenes(
        n_test, train=False, image_size=image_size, max_objects=max_objects, seed=seed
    )
    xs_train, xs_test = standardize(
        torch.from_numpy(x_train), torch.from_numpy(x_test), torch.float64
    )
    rows = max(len(b) for b in (*b_train, *b_test))
    y_train, y_test = pad_targets(b_train, rows), pad_targets(b_test, rows)
    classes: tuple[str, ...] = ANIMAL_MNIST_CLASSES
    if labels == "object":
        classes = ("animal",)
        for y in (y_train, y_test):
            y[..., 0][y[..., 0] >= 0] = 0.0
    return DetSplit(
        xs_train, y_train, xs_test, y_test, len(classes), classes, f"detection-scenes-{labels}"
    )
