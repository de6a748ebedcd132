"""Image classification data for the lab: the embedded Animal-MNIST set, or the user's own.

Three sources, one result (:class:`ImageData`, images as float32 ``(N, C, H, W)``):

- ``None`` (default): Animal-MNIST, 10,000 grayscale 28×28 animal silhouettes in 10
  balanced classes, shipped inside the package (MIT licence, see
  ``datasets/animal_mnist/LICENSE``). Never downloaded at run time.
- a ``.npz`` file with arrays ``x`` (``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)``
  with C in 1, 3, 4) and ``y`` (N labels of any hashable kind);
- a folder with one sub-folder per class holding image files (PNG natively; JPEG and
  others through Pillow, which matplotlib already depends on).

Every image is resized to ``image_size`` × ``image_size`` (area-averaged when
shrinking), scaled to [0, 1], then standardized per channel with the training split's
mean and std (:func:`standardize`: the same bits whatever torch's thread count, so a run
trained in a worker process and one trained in the parent see the same data; a split's
:func:`data_hash` names those bits in every run's protocol). The train/test split is
fixed (``split_seed``), stratified per class, and the same for every run of a sweep:
seeds vary initialization and batch order only.

Data is refused at load time, with what is wrong and where, when it would train but
mean nothing: non-finite values (the runs would only "diverge"), a class with fewer
than two images (it could not be both learned and tested), or, in a sweep, fewer
training images than the largest batch size (:func:`check_batch_size`). A ``.npz`` is
read with ``allow_pickle=False``, always: loading data never runs code from the file.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .prepare import data_hash, standardize

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "DataError",
    "ImageData",
    "Split",
    "check_batch_size",
    "SplitViews",
    "data_hash",
    "load_images",
    "load_split",
    "split_data",
    "standardize",
]

#: Class names of the embedded data, in label order (from the dataset's description).
ANIMAL_MNIST_CLASSES = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageData:
    """Images ``x`` (float32, ``(N, C, H, W)``, values in [0, 1]) and labels ``y`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class SplitViews:
    """What every task's split (classification, segmentation, detection) derives from its
    ``x_train``: channels, side, and the :func:`data_hash` of its tensors."""

    x_train: torch.Tensor

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @functools.cached_property
    def data_hash(self) -> str:
        """:func:`data_hash` of this split."""
        return data_hash(self)


@dataclass(frozen=True)
class Split(SplitViews):
    """Standardized train and test tensors of one dataset."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to a square ``image_size``; area-average when shrinking."""
    if x.shape[-2:] == (image_size, image_size):
        return x
    if x.shape[-2] >= image_size and x.shape[-1] >= image_size:
        return F.adaptive_avg_pool2d(x, image_size)
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        return np.moveaxis(x[..., :3] if x.shape[-1] == 4 else x, -1, 1)
    raise DataError(
        f"{source}: images of shape {tuple(x.shape)} are not understood; expected (N, H, W), "
        "(N, C, H, W) or (N, H, W, C) with 1 or 3 channels (4 = RGBA, alpha dropped)"
    )


def _check_finite(x: np.ndarray, source: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        images = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))
        shown = ", ".join(str(i) for i in images[:5]) + (", ..." if len(images) > 5 else "")
        raise DataError(
            f"{source}: {int(bad.sum())} non-finite value(s) (NaN or inf) in {len(images)} "
            f"image(s), at index {shown}; training on them would only diverge. Fix or drop "
            "those images"
        )


def _as_unit_float(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: image values must be numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.inexact):
        _check_finite(x, source)
    x = x.astype(np.float32)
    if x.size and float(x.max()) > 1.0:
        x = x / 255.0
    return x


def _labels(y: np.ndarray, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if y.ndim != 1:
        raise DataError(f"{source}: labels y must be 1-D, got shape {tuple(y.shape)}")
    if np.issubdtype(y.dtype, np.inexact) and not np.isfinite(y).all():
        bad = np.flatnonzero(~np.isfinite(y))
        raise DataError(
            f"{source}: {len(bad)} non-finite label(s) (NaN or inf), first at index {bad[0]}"
        )
    names, index, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(names) < 2:
        raise DataError(f"{source}: found {len(names)} class(es); classification needs >= 2")
    if counts.min() < 2:
        few = [str(n) for n, c in zip(names, counts, strict=True) if c < 2]
        raise DataError(
            f"{source}: class(es) {', '.join(few[:5])} have a single image; every class needs "
            "at least 2 (one to train on, one to test on)"
        )
    return index.reshape(-1).astype(np.int64), tuple(str(n) for n in names)


def _finish(x: np.ndarray, y: np.ndarray, source: str, name: str, image_size: int) -> ImageData:
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise DataError(
            f"{source}: the images x have shape {tuple(x.shape)} ({x.ndim}-D); expected one "
            "image per entry of the first axis: (N, H, W), (N, C, H, W) or (N, H, W, C). "
            "Reshape x (e.g. x.reshape(N, H, W)) before saving"
        )
    if len(x) == 0:
        raise DataError(f"{source}: the dataset is empty (0 images); add images or pick another")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels; they must match")
    labels, classes = _labels(np.asarray(y), source)
    xt = torch.from_numpy(
        np.ascontiguousarray(_as_unit_float(_to_nchw(np.asarray(x), source), source))
    )
    return ImageData(resize(xt, image_size), torch.from_numpy(labels), classes, name)


def load_default(image_size: int) -> ImageData:
    ref = resources.files("normlab.lab.data") / "datasets" / "animal_mnist" / "animal_mnist.npz"
    with resources.as_file(ref) as path, np.load(path) as f:
        x, y = f["x"], f["y"]
    data = _finish(x, y, "embedded Animal-MNIST", "animal-mnist", image_size)
    return ImageData(data.x, data.y, ANIMAL_MNIST_CLASSES, data.name)


_NPZ_EXPECTED = (
    "a .npz is a zip of arrays as numpy.savez writes it, with x (images, numbers) and y "
    "(labels, numbers or strings)"
)


def _load_npz(path: Path, image_size: int) -> ImageData:
    # np.load would read a non-zip file as a single array or, failing that, as a pickle
    # (and then say so); check the format first so the message names the real problem.
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a .npz archive; {_NPZ_EXPECTED}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(
                    f"{path}: the .npz has arrays {sorted(f.files)} but needs 'x' (images) and "
                    f"'y' (labels); missing {sorted(missing)}"
                )
            arrays = {}
            for name in ("x", "y"):
                try:
                    arrays[name] = f[name]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise DataError(
                        f"{path}: array {name!r} holds Python objects (dtype object), which "
                        f"normlab never unpickles; {_NPZ_EXPECTED}"
                    ) from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({e}); {_NPZ_EXPECTED}") from e
    x, y = arrays["x"], arrays["y"]
    return _finish(x, y, str(path), path.stem, image_size)


def read_image(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    try:
        img = np.asarray(mpimg.imread(path))
    except Exception as e:  # any decoder failure is reported the same way
        raise DataError(f"{path}: cannot read this image ({e}); use PNG or JPEG files") from e
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    img = img.astype(np.float32)
    if img.ndim == 3:
        img = img[..., :3]
        if img.shape[-1] == 1:
            img = img[..., 0]
    return img


def _load_folder(root: Path, image_size: int) -> ImageData:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{root}: no class sub-folders found; the layout is ROOT/<class name>/<image files>"
        )
    images: list[torch.Tensor] = []
    labels: list[str] = []
    for d in class_dirs:
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            img = read_image(f)
            t = torch.from_numpy(img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0))
            images.append(resize(t[None], image_size)[0])
            labels.append(d.name)
    if not images:
        raise DataError(
            f"{root}: the class folders hold no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    channels = max(int(t.shape[0]) for t in images)
    x = torch.stack([t.expand(channels, -1, -1) if t.shape[0] == 1 else t for t in images])
    return _finish(x.numpy(), np.asarray(labels), str(root), root.name, image_size)


def load_images(path: str | Path | None = None, *, image_size: int = 16) -> ImageData:
    """Load the embedded Animal-MNIST (``path=None``), a ``.npz`` or an image folder.

    Raises:
        DataError: the path is missing, empty, or of a format that is not understood.
    """
    if image_size < 4:
        raise DataError(f"image_size must be >= 4, got {image_size}")
    if path is None:
        return load_default(image_size)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; pass a .npz file or an image folder")
    if p.is_dir():
        return _load_folder(p, image_size)
    if p.suffix.lower() == ".npz":
        return _load_npz(p, image_size)
    raise DataError(
        f"{p}: unknown data format {p.suffix or '(no suffix)'!r}; pass a .npz with arrays x, y "
        "or a folder with one sub-folder of images per class"
    )


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Round robin over classes, so that every prefix of the order is balanced."""
    width = max(len(p) for p in parts)
    grid = np.full((len(parts), width), -1)
    for i, p in enumerate(parts):
        grid[i, : len(p)] = p
    order = grid.T.reshape(-1)
    return order[order >= 0]


def split_data(
    data: ImageData,
    *,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    split_seed: int = 0,
) -> Split:
    """Stratified, seeded train/test split; optional training subset; standardization.

    The test set is ``test_fraction`` of each class (at least one image per class);
    ``max_train`` keeps the first images of a class-interleaved order so that a subset
    stays balanced.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train must be >= 1, got {max_train}")
    rng = np.random.default_rng(split_seed)
    y = data.y.numpy()
    train_parts, test_parts = [], []
    for c in range(data.num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train_idx = _interleave(train_parts)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    test_idx = _interleave(test_parts)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(
            f"{data.name}: {len(data.y)} images are too few for a train/test split; "
            "each class needs at least 2 images"
        )
    x_train, x_test = standardize(data.x[train_idx], data.x[test_idx])
    return Split(
        x_train,
        data.y[train_idx].clone(),
        x_test,
        data.y[test_idx].clone(),
        data.num_classes,
        data.name,
    )


@functools.lru_cache(maxsize=4)
def load_split(
    path: str | None, image_size: int, max_train: int | None, test_fraction: float = 0.2
) -> Split:
    """Cached :func:`load_images` + :func:`split_data` (each worker process loads once)."""
    return split_data(
        load_images(path, image_size=image_size), test_fraction=test_fraction, max_train=max_train
    )


def check_batch_size(split: Split, batch_size: int) -> None:
    """Refuse a training split smaller than ``batch_size`` (the largest of a sweep).

    An epoch drops its last incomplete batch, so such a split trains no step at all at
    that batch size; its "result" would be the untrained network's error.
    """
    n = len(split.x_train)
    if n < batch_size:
        raise DataError(
            f"{split.name}: the training split holds {n} images, fewer than the batch size "
            f"{batch_size}, so no full batch exists and nothing would train; use more data "
            "(or a larger --max-train) or smaller --batch-sizes"
        )
