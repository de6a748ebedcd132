"""Semantic segmentation data for the lab: built-in silhouette scenes, or the user's own.

A dense-prediction task shows BN's small-batch problem in its usual setting: each image
is large enough that only a few fit in a batch, and the pixels of one image are
strongly correlated, so a batch of 2 gives noisy statistics however many pixels it has.

Built-in data: *silhouette scenes* (:func:`silhouette_scenes`), made at run time from the
10,000 embedded Animal-MNIST silhouettes (28×28, white animal on black, 10 classes), never
downloaded. Everything is drawn from ``numpy.random.default_rng`` streams seeded by the
dataset ``seed`` (default 0), so the same arguments give the same tensors:

1. Source silhouettes: within each class, a permutation (stream ``[seed, 0]``) puts the
   first 20 % (200 per class) in the test pool and the other 800 in the training pool,
   so test scenes show animals never seen in training.
2. Each scene (training scenes from stream ``[seed, 1]``, test scenes from ``[seed, 2]``;
   the test set does not depend on the number of training scenes) is an S × S RGB image
   (S = ``image_size``, default 32) with values in [0, 1]:

   - background: a colour b ~ U(0.2, 0.8)³ plus three sinusoidal gratings k = 1..3,
     ``bg_c(y, x) = b_c + Σ_k a_kc · sin(2π f_k (x cos θ_k + y sin θ_k) / S + φ_k)`` with
     orientation θ_k ~ U(0, π), frequency f_k ~ U(1, 6) cycles per image side, phase
     φ_k ~ U(0, 2π) and per-channel amplitude a_kc ~ U(0, 0.2);
   - objects: a number ~ U{1, ..., ``max_objects``} (default 2), painted in order, each a
     silhouette drawn uniformly from the split's pool, resized to a side s ~
     U{round(0.4 S), ..., round(0.8 S)} pixels (area averaging when shrinking, bilinear
     when enlarging) giving an intensity m in [0, 1], placed at a uniform top-left
     corner that keeps it inside the image, with a colour c ~ U(0, 1)³: the image
     becomes ``(1 - m) · image + m · c`` (the intensity is the object's opacity);
   - noise: ``clip(image + N(0, 0.04²), 0, 1)`` per pixel and channel.

   The target of a pixel is 1 (animal) where m > 0.5 for some object and 0
   (background) elsewhere: 2 classes, the default (``labels="foreground"``). With
   ``labels="animals"`` it is 1 + the animal's class instead (11 classes, the
   last-painted object winning where two overlap). Telling ten animals apart pixel by
   pixel takes a small U-Net many more epochs than a lab sweep affords; the 2-class
   task is learned in a few, and BN's small-batch penalty shows on it.
3. The images are standardized per channel with the training scenes' mean and std.

User data: a folder holding ``images/`` and ``masks/`` (see :mod:`normlab.lab.data.seg_folder`,
whose :func:`~normlab.lab.data.seg_folder.load_seg_split` loads either, cached).

Targets are int64 class ids; :data:`IGNORE_INDEX` (255) marks "void" pixels that the loss
and the metrics skip (:mod:`normlab.lab.tasks.seg_metrics`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..defaults import SEGMENTATION_DEFAULTS
from ..errors import DataError
from .images import (
    ANIMAL_MNIST_CLASSES,
    ImageData,
    SplitViews,
    load_default,
    resize,
    standardize,
)

__all__ = [
    "DEFAULT_SEG_IMAGE_SIZE",
    "DEFAULT_SEG_TEST",
    "DEFAULT_SEG_TRAIN",
    "IGNORE_INDEX",
    "SegData",
    "SegSplit",
    "silhouette_scenes",
    "split_seg_data",
    "standardize",
]

#: Target value of "void" pixels: no class, skipped by the loss and the metrics.
IGNORE_INDEX = 255
#: Side of the built-in scenes.
DEFAULT_SEG_IMAGE_SIZE = SEGMENTATION_DEFAULTS.image_size
#: Built-in training and test scenes.
DEFAULT_SEG_TRAIN = 2000
DEFAULT_SEG_TEST = 500
_TEST_POOL_FRACTION = 0.2
_GRATINGS = 3
_NOISE_STD = 0.04
_MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class SegData(ImageData):
    """Images ``x`` (float32 ``(N, C, S, S)`` in [0, 1]) and targets ``y`` (int64 ``(N, S, S)``)."""


@dataclass(frozen=True)
class SegSplit(SplitViews):
    """Standardized train and test images with per-pixel targets (:data:`IGNORE_INDEX` = void).

    ``x_*``: float32 ``(N, C, S, S)``; ``y_*``: int64 ``(N, S, S)`` with values in
    ``[0, num_classes)`` or ``ignore_index``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    name: str
    ignore_index: int = IGNORE_INDEX


def _source_pools(labels: np.ndarray, seed: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and test silhouettes, 20 % of each class for testing,
    permuted by stream ``[seed, stream]`` (the detection scenes': ``[seed, 10]``)."""
    rng = np.random.default_rng([seed, stream])
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * _TEST_POOL_FRACTION)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    base = rng.uniform(0.2, 0.8, size=(n, 3, 1, 1))
    theta = rng.uniform(0.0, np.pi, size=(n, _GRATINGS))
    freq = rng.uniform(1.0, 6.0, size=(n, _GRATINGS))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, _GRATINGS))
    amp = rng.uniform(0.0, 0.2, size=(n, _GRATINGS, 3))
    coords = np.arange(size, dtype=np.float64) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    images = np.repeat(base, size, axis=2).repeat(size, axis=3)
    for k in range(_GRATINGS):  # one grating at a time: memory stays O(n · S²)
        c, s = (f[:, k, None, None] for f in (np.cos(theta), np.sin(theta)))
        wave = np.sin(
            2 * np.pi * freq[:, k, None, None] * (c * xx + s * yy) + phase[:, k, None, None]
        )
        images += amp[:, k, :, None, None] * wave[:, None]
    return images


def _compose(
    rng: np.random.Generator,
    n: int,
    size: int,
    pool: np.ndarray,
    silhouettes: torch.Tensor,
    labels: np.ndarray,
    max_objects: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of side ``size`` (float32 images, int64 class-id targets)."""
    images = _backgrounds(rng, n, size)
    target = np.zeros((n, size, size), dtype=np.int64)
    count = rng.integers(1, max_objects + 1, size=n)
    lo, hi = round(0.4 * size), round(0.8 * size)
    src = pool[rng.integers(0, len(pool), size=(n, max_objects))]
    side = rng.integers(lo, hi + 1, size=(n, max_objects))
    top = rng.integers(0, size - side + 1)
    left = rng.integers(0, size - side + 1)
    colour = rng.uniform(0.0, 1.0, size=(n, max_objects, 3))
    present = np.arange(max_objects)[None, :] < count[:, None]
    resized: dict[tuple[int, int], np.ndarray] = {}
    for s in np.unique(side[present]):
        where = np.argwhere(present & (side == s))
        masks = resize(silhouettes[src[where[:, 0], where[:, 1]]], int(s))[:, 0].numpy()
        for (i, j), m in zip(where, masks, strict=True):
            resized[(int(i), int(j))] = m.astype(np.float64)
    for j in range(max_objects):  # painter's order: object j + 1 covers object j
        for i in np.flatnonzero(present[:, j]):
            m, t, le, s = resized[(int(i), j)], top[i, j], left[i, j], side[i, j]
            region = images[i, :, t : t + s, le : le + s]
            region += m * (colour[i, j][:, None, None] - region)
            target[i, t : t + s, le : le + s][m > _MASK_THRESHOLD] = labels[src[i, j]] + 1
    images += rng.normal(0.0, _NOISE_STD, size=images.shape)
    return np.clip(images, 0.0, 1.0).astype(np.float32), target


@functools.lru_cache(maxsize=1)
def _silhouettes() -> tuple[torch.Tensor, np.ndarray]:
    data = load_default(28)
    return data.x, data.y.numpy()


def silhouette_scenes(
    *,
    n_train: int = DEFAULT_SEG_TRAIN,
    n_test: int = DEFAULT_SEG_TEST,
    image_size: int = DEFAULT_SEG_IMAGE_SIZE,
    max_objects: int = 2,
    labels: str = "foreground",
    seed: int = 0,
) -> SegSplit:
    """The built-in segmentation set (recipe in the module docstring), standardized.

    Args:
        n_train, n_test: number of training and test scenes.
        image_size: side S of the square scenes (>= 8).
        max_objects: each scene holds 1 to ``max_objects`` animals.
        labels: ``"foreground"`` (background, animal) or ``"animals"`` (background + 10
            classes).
        seed: the dataset seed; it fixes every scene and the train/test split.
    """
    if n_train < 1 or n_test < 1:
        raise DataError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    if image_size < 8:
        raise DataError(f"image_size must be >= 8 for silhouette scenes, got {image_size}")
    if max_objects < 1:
        raise DataError(f"max_objects must be >= 1, got {max_objects}")
    if labels not in ("animals", "foreground"):
        raise DataError(f"labels must be 'animals' or 'foreground', got {labels!r}")
    silhouettes, classes = _silhouettes()
    train_pool, test_pool = _source_pools(classes, seed)
    parts = []
    for stream, n, pool in ((1, n_train, train_pool), (2, n_test, test_pool)):
        rng = np.random.default_rng([seed, stream])
        parts.append(_compose(rng, n, image_size, pool, silhouettes, classes, max_objects))
    (x_train, y_train), (x_test, y_test) = parts
    names: tuple[str, ...] = ("background", *ANIMAL_MNIST_CLASSES)
    if labels == "foreground":
        names = ("background", "animal")
        y_train, y_test = np.minimum(y_train, 1), np.minimum(y_test, 1)
    xs_train, xs_test = standardize(
        torch.from_numpy(x_train), torch.from_numpy(x_test), torch.float64
    )
    return SegSplit(
        xs_train,
        torch.from_numpy(y_train),
        xs_test,
        torch.from_numpy(y_test),
        len(names),
        names,
        f"silhouette-scenes-{labels}",
    )


def split_seg_data(
    data: SegData,
    *,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    split_seed: int = 0,
) -> SegSplit:
    """Seeded random train/test split of whole images, optional training subset, standardization.

    The test set is ``round(test_fraction · N)`` images (at least one); ``max_train``
    keeps the first images of the shuffled training order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train must be >= 1, got {max_train}")
    n = len(data.x)
    if n < 2:
        raise DataError(
            f"{data.name}: {n} image(s) are too few for a train/test split; "
            "at least 2 are needed (one to train on, one to test on)"
        )
    order = np.random.default_rng(split_seed).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    if max_train is not None:
        train_idx = train_idx[:max_train]
    x_train, x_test = standardize(data.x[train_idx], data.x[test_idx], torch.float64)
    return SegSplit(
        x_train,
        data.y[train_idx].clone(),
        x_test,
        data.y[test_idx].clone(),
        data.num_classes,
        data.classes,
        data.name,
    )
