"""Detection data: the built-in scenes' recipe, the COCO reader's refusals (one clear line
each), and `normlab data export-coco` read back through the reader box for box."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.cli import main
from normlab.lab.data.det_coco import export_coco, load_coco, load_coco_split
from normlab.lab.data.det_scenes import detection_scenes, raw_detection_scenes
from normlab.lab.data.images import ANIMAL_MNIST_CLASSES
from normlab.lab.errors import DataError


def test_scenes_boxes_are_the_painted_silhouettes():
    """Every box is tight around pixels that differ from the background; classes in 0..9."""
    x, boxes = raw_detection_scenes(12, train=True, image_size=32)
    assert x.shape == (12, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    counts = [len(b) for b in boxes]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) > 1
    for b in boxes:
        c, x1, y1, x2, y2 = b.T
        assert np.all((c >= 0) & (c <= 9) & (x1 >= 0) & (y1 >= 0) & (x2 <= 32) & (y2 <= 32))
        assert np.all((x2 > x1) & (y2 > y1))
        assert np.all(x2 - x1 <= round(0.6 * 32))


def test_scenes_are_seeded_and_test_stream_is_separate():
    a = detection_scenes(8, 4, 32)
    b = detection_scenes.__wrapped__(8, 4, 32)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    longer = detection_scenes.__wrapped__(16, 4, 32)
    assert torch.equal(longer.y_test, a.y_test)  # the test set ignores n_train
    assert not torch.equal(a.y_train[:4], a.y_test)
    mean = a.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert (a.y_train[..., 0] == -1).any()  # padding rows: fewer objects than M somewhere


def test_export_coco_reads_back_box_for_box(tmp_path):
    assert (
        main(
            [
                "data",
                "export-coco",
                str(tmp_path / "c"),
                "--train",
                "6",
                "--val",
                "3",
                "--image-size",
                "32",
            ]
        )
        == 0
    )
    split = load_coco_split(
        str(tmp_path / "c/train.json"), val_data=str(tmp_path / "c/val.json"), image_size=32
    )
    _, train_boxes = raw_detection_scenes(6, train=True, image_size=32)
    _, val_boxes = raw_detection_scenes(3, train=False, image_size=32)
    for got, want in ((split.y_train, train_boxes), (split.y_test, val_boxes)):
        for row, b in zip(got.numpy(), want, strict=True):
            np.testing.assert_array_equal(row[: len(b)], b)
            assert np.all(row[len(b) :, 0] == -1)
    assert split.classes == ANIMAL_MNIST_CLASSES


def _coco(tmp_path: Path, annotations, *, images=None, categories=None) -> Path:
    img = np.random.default_rng(0).integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    doc = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    return path


def test_reader_scales_boxes_and_keeps_empty_images(tmp_path):
    ann = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [3, 2, 12, 10]}]
    images = [
        {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
        {"id": 2, "file_name": "a.png", "width": 30, "height": 20},
    ]
    data = load_coco(_coco(tmp_path, ann, images=images), image_size=60)
    assert data.x.shape == (2, 3, 60, 60) and data.classes == ("cat", "dog")
    np.testing.assert_allclose(data.y[0, 0].numpy(), [1, 6, 6, 30, 36])
    assert data.y[1, 0, 0] == -1  # the image without objects is kept


@pytest.mark.parametrize(
    ("annotations", "images", "message"),
    [
        ([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [25, 2, 10, 5]}], None, "outside"),
        ([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 0, 5]}], None, "positive"),
        ([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, "x", 5]}], None, "finite"),
        (
            [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 5, 5]}],
            None,
            "unknown category",
        ),
        ([{"id": 1, "image_id": 9, "category_id": 3, "bbox": [2, 2, 5, 5]}], None, "unknown image"),
        ([], [{"id": 1, "file_name": "nope.png", "width": 30, "height": 20}], "does not exist"),
        ([], [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}], "annotations say"),
        ([], [{"id": 1, "width": 20, "height": 20}], "file_name"),
    ],
)
def test_reader_refuses_bad_annotations(tmp_path, annotations, images, message):
    with pytest.raises(DataError, match=message):
        load_coco(_coco(tmp_path, annotations, images=images))


def test_reader_refuses_missing_broken_and_unloadable_files(tmp_path):
    with pytest.raises(DataError, match="no such annotations file"):
        load_coco(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco(tmp_path / "bad.json")
    (tmp_path / "half.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no list 'annotations'"):
        load_coco(tmp_path / "half.json")
    path = _coco(tmp_path, [])
    (tmp_path / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read this image"):
        load_coco(path)


def test_export_then_split_without_val(tmp_path):
    train, _ = export_coco(tmp_path, n_train=10, n_val=2, image_size=32)
    split = load_coco_split(str(train), image_size=32)
    assert len(split.x_train) == 8 and len(split.x_test) == 2
