"""The user's own segmentation data: a folder of images and a folder of masks.

Layout: ``ROOT/images/`` and ``ROOT/masks/`` (or any two folders given separately). Each
image ``images/<stem>.<ext>`` (PNG natively; JPEG and others through Pillow) has its mask
``masks/<stem>.<ext>`` with the same stem: a single-channel image (8- or 16-bit
grayscale, palette, or 32-bit integer; a palette PNG's indices are the ids, as in Pascal
VOC) of integer class ids 0 .. K−1, and 255 for "void" pixels that no loss or metric sees.
An optional ``ROOT/classes.txt`` names the classes, one per line, and so fixes K;
without it K = the largest id in the masks + 1 and the classes are named "0", "1", ....

Images are resized to ``image_size`` × ``image_size`` by area averaging (bilinear when
enlarging) and masks by nearest neighbour, which keeps every pixel a valid class id.
Grayscale images become 3 channels when any image has colour.

A mask without its image's size, with ids outside 0 .. K−1 other than 255, with values
that are not integers, or with colour channels is refused with the file and the values;
so is an image without a mask.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .images import IMAGE_SUFFIXES, read_image, resize
from .scenes import (
    DEFAULT_SEG_IMAGE_SIZE,
    DEFAULT_SEG_TRAIN,
    IGNORE_INDEX,
    SegData,
    SegSplit,
    silhouette_scenes,
    split_seg_data,
)

__all__ = ["load_seg_folder", "load_seg_split", "read_mask"]

_INTEGER_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"}


def read_mask(path: Path) -> np.ndarray:
    """A mask file as an int64 ``(H, W)`` array of class ids.

    Raises:
        DataError: unreadable, more than one channel, or non-integer values.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, bands = im.mode, len(im.getbands())
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read this mask ({e}); use PNG files") from e
    if mode in _INTEGER_MODES:
        return arr.astype(np.int64)
    if mode == "F":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            v = arr[bad].flat[0]
            raise DataError(
                f"{path}: the mask holds non-integer values (e.g. {v!r} in {int(bad.sum())} "
                "pixels); a mask holds integer class ids, one per pixel"
            )
        return arr.astype(np.int64)
    raise DataError(
        f"{path}: the mask is a {mode} image ({bands} channels); a mask is a "
        "single-channel image of integer class ids (8-bit grayscale or palette PNG)"
    )


def _files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; it should hold the {what}")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            if f.stem in found:
                raise DataError(
                    f"{folder}: {found[f.stem].name} and {f.name} share the stem {f.stem!r}; "
                    f"the {what} are matched by stem, so keep one"
                )
            found[f.stem] = f
    if not found:
        raise DataError(
            f"{folder}: no {what} found (files ending in {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def _class_names(root: Path | None, num_classes: int | None) -> tuple[str, ...] | None:
    listing = root / "classes.txt" if root is not None else None
    if listing is not None and listing.is_file():
        names = tuple(line.strip() for line in listing.read_text().splitlines() if line.strip())
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"{listing}: names {len(names)} classes but num_classes={num_classes}")
        num_classes = len(names)
        if num_classes < 2:
            raise DataError(f"{listing}: names {num_classes} class(es); segmentation needs >= 2")
        return names
    return None if num_classes is None else tuple(str(i) for i in range(num_classes))


def _check_labels(mask: np.ndarray, path: Path, num_classes: int) -> None:
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if len(bad):
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DataError(
            f"{path}: class id(s) {shown} are outside the class range 0..{num_classes - 1} "
            f"({num_classes} classes; {IGNORE_INDEX} marks void pixels). Fix the mask, or "
            "name every class in classes.txt"
        )


def load_seg_folder(
    root: str | Path | None = None,
    *,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    image_size: int = 32,
    num_classes: int | None = None,
) -> SegData:
    """Load ``root/images`` + ``root/masks`` (or the ``images`` and ``masks`` folders).

    Raises:
        DataError: missing or empty folders, an image without a mask, a mask of another
            size than its image, class ids out of range, or masks that are not integer ids.
    """
    if image_size < 4:
        raise DataError(f"image_size must be >= 4, got {image_size}")
    base = Path(root) if root is not None else None
    if base is not None and not base.is_dir():
        raise DataError(f"{base}: no such folder; it should hold images/ and masks/")
    img_dir = Path(images) if images is not None else (base / "images" if base else None)
    mask_dir = Path(masks) if masks is not None else (base / "masks" if base else None)
    if img_dir is None or mask_dir is None:
        raise DataError("pass a folder holding images/ and masks/, or both folders")
    if num_classes is not None and not 2 <= num_classes <= IGNORE_INDEX:
        raise DataError(f"num_classes must be in 2..{IGNORE_INDEX}, got {num_classes}")
    names = _class_names(base, num_classes)
    image_files, mask_files = _files(img_dir, "images"), _files(mask_dir, "masks")
    pairs = []
    for stem, img_path in image_files.items():
        if stem not in mask_files:
            raise DataError(
                f"{img_path}: no mask for this image; expected {mask_dir / stem}.png "
                "(masks are matched to images by file name without the extension)"
            )
        img, mask = read_image(img_path), read_mask(mask_files[stem])
        if mask.shape != img.shape[:2]:
            (mh, mw), (ih, iw) = mask.shape, img.shape[:2]
            raise DataError(
                f"{mask_files[stem]}: the mask is {mh}×{mw} (H×W) but its image {img_path} "
                f"is {ih}×{iw}; a mask must have its image's size"
            )
        pairs.append((img, mask, mask_files[stem]))
    if names is None:
        top = max(int(m[m != IGNORE_INDEX].max(initial=0)) for _, m, _ in pairs)
        if not 1 <= top < IGNORE_INDEX:
            raise DataError(
                f"{mask_dir}: the largest class id is {top}; ids must be 0..254 (255 is void) "
                "with at least 2 classes. Name the classes in classes.txt to fix their number"
            )
        names = tuple(str(i) for i in range(top + 1))
    xs, ys = [], []
    for img, mask, path in pairs:
        _check_labels(mask, path, len(names))
        t = torch.from_numpy(img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0).copy())
        xs.append(resize(t[None], image_size)[0])
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        ys.append(F.interpolate(m, size=(image_size, image_size), mode="nearest-exact")[0, 0])
    channels = max(int(t.shape[0]) for t in xs)
    x = torch.stack([t.expand(channels, -1, -1) if t.shape[0] == 1 else t for t in xs])
    name = base.name if base is not None else img_dir.name
    return SegData(x.contiguous(), torch.stack(ys).long(), names, name)


def _check_layout(path: str) -> None:
    """Refuse, with the fix, a path that is not a folder of ``images/`` and ``masks/``."""
    root = Path(path)
    if root.is_file():
        raise DataError(
            f"{root}: segmentation data is a folder holding images/ and masks/ (one mask "
            "per image, same file name), not a file; a .npz of x, y is classification "
            "data (drop --task segmentation)"
        )
    if root.is_dir() and not (root / "images").is_dir() and not (root / "masks").is_dir():
        subs = sorted(d.name for d in root.iterdir() if d.is_dir())
        shown = ", ".join(subs[:4]) + (", ..." if len(subs) > 4 else "")
        raise DataError(
            f"{root}: segmentation data needs the sub-folders images/ and masks/ (one "
            "mask per image, same file name)"
            + (
                f"; found {shown}, which looks like classification data (a folder per "
                "class: drop --task segmentation)"
                if subs
                else ""
            )
        )


@functools.lru_cache(maxsize=4)
def load_seg_split(
    path: str | None,
    image_size: int = DEFAULT_SEG_IMAGE_SIZE,
    max_train: int | None = None,
    test_fraction: float = 0.2,
) -> SegSplit:
    """Cached built-in scenes (``path=None``) or user folder, split and standardized.

    For the built-in scenes ``max_train`` is the number of training scenes (default
    :data:`~normlab.lab.data.scenes.DEFAULT_SEG_TRAIN`) and the test set is always
    :data:`~normlab.lab.data.scenes.DEFAULT_SEG_TEST` scenes; for a folder it caps the
    training images after a ``test_fraction`` split. Cached so that each worker process
    of a sweep builds or reads the data once.

    Raises:
        DataError: ``path`` is not a folder of ``images/`` and ``masks/`` (a classification
            folder or file is named as such), or its masks are invalid.
    """
    if path is None:
        return silhouette_scenes(n_train=max_train or DEFAULT_SEG_TRAIN, image_size=image_size)
    _check_layout(path)
    data = load_seg_folder(path, image_size=image_size)
    return split_seg_data(data, test_fraction=test_fraction, max_train=max_train)
