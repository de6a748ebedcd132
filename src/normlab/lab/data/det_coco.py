"""COCO-format detection data: read a user's annotations file, write the built-in scenes.

Reading (:func:`load_coco`): ``annotations.json`` holds ``images`` (``id``, ``file_name``,
``width``, ``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` =
``[x, y, w, h]`` in pixels) and ``categories`` (``id``, ``name``), the format every
detection tool exports. Image files are found relative to ``images_dir`` (default: the
folder of the annotations file). Each image is read (grayscale and RGBA become RGB),
resized to ``image_size`` × ``image_size`` (area averaging when shrinking, bilinear when
enlarging) and its boxes scaled with it; the categories, sorted by id, become classes
0 … K−1. Annotations with ``iscrowd`` = 1 are skipped. An image without annotations is
kept: it counts for AP (its detections are false positives).

Refused, each in one line naming the file and the entry, before anything is stored: a
missing file, invalid JSON, a missing list or field, duplicate image or category ids, an
annotation of an unknown image or category, a box with a non-finite or non-positive
size or outside its image, and an image that does not load or whose size is not the
one the file states.

Writing (:func:`export_coco`): the built-in scenes (:mod:`normlab.lab.data.det_scenes`)
as ``DIR/train.json`` and ``DIR/val.json`` with PNGs in ``DIR/images/``, so that
``normlab sweep --task detection --data DIR/train.json --val-data DIR/val.json`` trains
on them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .det_scenes import (
    DEFAULT_DET_TEST,
    DetData,
    DetSplit,
    detection_scenes,
    pad_targets,
    raw_detection_scenes,
)
from .images import ANIMAL_MNIST_CLASSES, read_image, resize
from .prepare import standardize

__all__ = [
    "data_spec",
    "export_coco",
    "load_coco",
    "load_coco_split",
    "load_detection_split",
    "parse_data_spec",
]

_TOLERANCE = 1e-3  # pixels: a box may end at the image edge up to float rounding


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such annotations file; pass a COCO-format .json")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); pass a COCO-format annotations file") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: the top level is not a JSON object; COCO has images, ...")
    for name in ("images", "annotations", "categories"):
        if not isinstance(doc.get(name), list):
            raise DataError(
                f"{path}: no list {name!r}; a COCO annotations file has 'images', "
                "'annotations' and 'categories'"
            )
    return doc


def _field(path: Path, what: str, entry: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: {what} {entry!r:.80} has no valid {name!r}")
    return value


def _categories(path: Path, doc: dict[str, Any]) -> tuple[dict[int, int], tuple[str, ...]]:
    cats = {}
    for c in doc["categories"]:
        cid = _field(path, "category", c, "id", int)
        if cid in cats:
            raise DataError(f"{path}: category id {cid} appears twice")
        cats[cid] = str(c.get("name", cid))
    if not cats:
        raise DataError(f"{path}: 'categories' is empty; name at least one category")
    ids = sorted(cats)
    return {cid: k for k, cid in enumerate(ids)}, tuple(cats[i] for i in ids)


def _box(path: Path, ann: dict[str, Any], width: float, height: float) -> list[float]:
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise DataError(f"{path}: annotation {ann.get('id')} has no bbox [x, y, w, h]")
    x, y, w, h = (float(v) if isinstance(v, (int, float)) else math.nan for v in bbox)
    if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0:
        raise DataError(
            f"{path}: annotation {ann.get('id')} has bbox {bbox}: a box needs finite "
            "numbers and a positive width and height"
        )
    if (
        x < -_TOLERANCE
        or y < -_TOLERANCE
        or x + w > width + _TOLERANCE
        or y + h > height + _TOLERANCE
    ):
        raise DataError(
            f"{path}: annotation {ann.get('id')} has bbox {bbox} outside its image "
            f"({width:g} × {height:g}); boxes must lie inside the image"
        )
    return [x, y, x + w, y + h]


def _read_rgb(file: Path, width: int, height: int, path: Path) -> torch.Tensor:
    if not file.is_file():
        raise DataError(f"{path}: image file {file} does not exist; pass --images DIR")
    img = read_image(file)
    rgb = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
    if rgb.shape[:2] != (height, width):
        raise DataError(
            f"{path}: image {file} is {rgb.shape[1]} × {rgb.shape[0]} but the annotations "
            f"say {width} × {height}"
        )
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0)))


def load_coco(
    path: str | Path, images_dir: str | Path | None = None, image_size: int = 48
) -> DetData:
    """A COCO annotations file and its images, resized, as :class:`DetData` (module doc).

    Raises:
        DataError: the file, an entry or an image cannot be used (module docstring).
    """
    path = Path(path)
    doc = _read_json(path)
    root = path.parent if images_dir is None else Path(images_dir)
    to_class, classes = _categories(path, doc)
    images: dict[int, dict[str, Any]] = {}
    for im in doc["images"]:
        iid = _field(path, "image", im, "id", int)
        if iid in images:
            raise DataError(f"{path}: image id {iid} appears twice")
        _field(path, "image", im, "file_name", str)
        for name in ("width", "height"):
            if _field(path, "image", im, name, int) < 1:
                raise DataError(f"{path}: image {iid} has {name} {im[name]}; it must be >= 1")
        images[iid] = im
    if not images:
        raise DataError(f"{path}: 'images' is empty; a detection set needs images")
    rows: dict[int, list[list[float]]] = {iid: [] for iid in images}
    for ann in doc["annotations"]:
        iid = _field(path, "annotation", ann, "image_id", int)
        cid = _field(path, "annotation", ann, "category_id", int)
        if iid not in images:
            raise DataError(f"{path}: annotation {ann.get('id')} names unknown image {iid}")
        if cid not in to_class:
            raise DataError(
                f"{path}: annotation {ann.get('id')} has unknown category_id {cid}; the "
                f"categories are {sorted(to_class)}"
            )
        if ann.get("iscrowd", 0):
            continue
        im = images[iid]
        box = _box(path, ann, im["width"], im["height"])
        sx, sy = image_size / im["width"], image_size / im["height"]
        rows[iid].append([to_class[cid], box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
    xs, boxes = [], []
    for iid in sorted(images):
        im = images[iid]
        xs.append(
            resize(
                _read_rgb(root / im["file_name"], im["width"], im["height"], path)[None], image_size
            )[0]
        )
        boxes.append(np.asarray(rows[iid], dtype=np.float32).reshape(-1, 5))
    return DetData(torch.stack(xs).float().contiguous(), pad_targets(boxes), classes, path.stem)


def _same_width(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both target tensors padded to the same number of rows M."""
    m = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = torch.full((t.shape[0], m - t.shape[1], 5), -1.0)
        return torch.cat([t, extra], 1)

    return pad(a), pad(b)


@functools.lru_cache(maxsize=4)
def load_coco_split(
    data: str,
    images: str | None = None,
    val_data: str | None = None,
    image_size: int = 48,
    max_train: int | None = None,
    test_fraction: float = 0.2,
) -> DetSplit:
    """The user's COCO data split and standardized (cached): ``val_data`` as the test set,
    or a seeded ``test_fraction`` of ``data``'s images; ``max_train`` caps the training
    images. With ``val_data`` both files must name the same categories."""
    train = load_coco(data, images, image_size)
    if val_data is not None:
        test = load_coco(val_data, images, image_size)
        if test.classes != train.classes:
            raise DataError(
                f"{val_data}: its categories {list(test.classes)} are not those of {data} "
                f"({list(train.classes)}); both files must name the same categories"
            )
        x_tr, y_tr, x_te, y_te = train.x, train.y, test.x, test.y
    else:
        n = len(train.x)
        if n < 2:
            raise DataError(f"{data}: {n} image(s) are too few to split; pass --val-data")
        order = torch.from_numpy(np.random.default_rng(0).permutation(n))
        n_test = min(n - 1, max(1, round(n * test_fraction)))
        te, tr = order[:n_test], order[n_test:]
        x_tr, y_tr, x_te, y_te = train.x[tr], train.y[tr], train.x[te], train.y[te]
    if max_train is not None:
        x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
    y_tr, y_te = _same_width(y_tr, y_te)
    xs_tr, xs_te = standardize(x_tr, x_te, torch.float64)
    return DetSplit(xs_tr, y_tr, xs_te, y_te, train.num_classes, train.classes, train.name)


def _write(root: Path, stem: str, x: np.ndarray, boxes: list[np.ndarray]) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    size = int(x.shape[-1])
    doc: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(ANIMAL_MNIST_CLASSES)],
    }
    for i, (img, rows) in enumerate(zip(x, boxes, strict=True)):
        name = f"images/{stem}_{i:05d}.png"
        pixels = np.round(np.moveaxis(img, 0, -1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / name)
        doc["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for c, x1, y1, x2, y2 in rows.tolist():
            doc["annotations"].append(
                {
                    "id": len(doc["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    out = root / f"{stem}.json"
    out.write_text(json.dumps(doc))
    return out


def export_coco(
    root: str | Path, n_train: int = 600, n_val: int = 300, image_size: int = 48, seed: int = 0
) -> tuple[Path, Path]:
    """Write the built-in scenes' training and test streams as COCO (module docstring);
    returns the paths of ``train.json`` and ``val.json``."""
    root = Path(root)
    paths = []
    for stem, n, train in (("train", n_train, True), ("val", n_val, False)):
        x, boxes = raw_detection_scenes(n, train=train, image_size=image_size, seed=seed)
        paths.append(_write(root, stem, x, boxes))
    return paths[0], paths[1]


def data_spec(data: str, images: str | None = None, val_data: str | None = None) -> str:
    """One string naming a COCO run's data (``RunConfig.data``): the annotations file, and
    ``|images=DIR`` and ``|val=FILE`` when given, so the store compares all three."""
    parts = [data]
    if images is not None:
        parts.append(f"images={images}")
    if val_data is not None:
        parts.append(f"val={val_data}")
    return "|".join(parts)


def parse_data_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``(annotations, images, val_data)`` of a :func:`data_spec` string."""
    path, *rest = spec.split("|")
    extra = dict(p.split("=", 1) for p in rest if "=" in p)
    return path, extra.get("images"), extra.get("val")


def load_detection_split(data: str | None, image_size: int, max_train: int | None) -> DetSplit:
    """The (cached) data of a detection run: the built-in scenes (``data=None``;
    ``max_train`` training scenes, default 800) or a :func:`data_spec` of COCO files."""
    if data is None:
        return detection_scenes(max_train or 800, DEFAULT_DET_TEST, image_size)
    path, images, val_data = parse_data_spec(data)
    return load_coco_split(path, images, val_data, image_size, max_train)
