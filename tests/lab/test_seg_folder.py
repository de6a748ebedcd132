"""User segmentation folders: images + masks, resizing, and clear errors for bad masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.lab.data.seg_folder import load_seg_folder, load_seg_split, read_mask
from normlab.lab.errors import DataError


def _write(root, stems=("a", "b", "c", "d"), size=(12, 16), classes=3, seed=0):
    """RGB images and L-mode masks: class = horizontal band, one void pixel per mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = size
    for stem in stems:
        img = rng.integers(30, 220, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        mask = np.repeat(np.arange(h) * classes // h, w).reshape(h, w).astype(np.uint8)
        mask[0, 0] = 255
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{stem}.png")
    return root


def test_loads_images_and_masks(tmp_path):
    _write(tmp_path)
    (tmp_path / "masks" / "extra.png").write_bytes(b"")  # a mask without image is unused
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    data = load_seg_folder(tmp_path, image_size=8)
    assert data.x.shape == (4, 3, 8, 8) and data.x.dtype == torch.float32
    assert data.y.shape == (4, 8, 8) and data.y.dtype == torch.int64
    assert data.classes == ("0", "1", "2") and data.name == tmp_path.name
    assert 0.1 < float(data.x.min()) and float(data.x.max()) < 0.9
    # Nearest neighbour keeps ids valid: the bands survive, in order, and no mixed value.
    col = data.y[0, :, 4].tolist()
    assert col == sorted(col) and set(col) == {0, 1, 2}
    assert set(torch.unique(data.y).tolist()) <= {0, 1, 2, 255}


def test_image_is_area_averaged(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:, ::2] = 200  # stripes one pixel wide average to 100 at half size
    Image.fromarray(img, mode="L").save(tmp_path / "images" / "s.png")
    Image.fromarray((np.arange(64).reshape(8, 8) % 2).astype(np.uint8)).save(
        tmp_path / "masks" / "s.png"
    )
    data = load_seg_folder(tmp_path, image_size=4)
    assert data.x.shape == (1, 1, 4, 4)
    assert torch.allclose(data.x, torch.full_like(data.x, 100 / 255), atol=1e-6)


def test_classes_txt_and_separate_folders(tmp_path):
    _write(tmp_path / "set", classes=2)
    (tmp_path / "set" / "classes.txt").write_text("sky\nroad\ncar\n")
    data = load_seg_folder(tmp_path / "set", image_size=8)
    assert data.classes == ("sky", "road", "car")
    plain = load_seg_folder(images=tmp_path / "set" / "images", masks=tmp_path / "set" / "masks")
    assert plain.classes == ("0", "1") and plain.x.shape[-1] == 32


def test_palette_and_16_bit_masks(tmp_path):
    _write(tmp_path, stems=("p", "q"))
    mask = np.repeat(np.arange(12) % 3, 16).reshape(12, 16).astype(np.uint8)
    pal = Image.fromarray(mask, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "masks" / "p.png")
    Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "masks" / "q.png")
    assert np.array_equal(read_mask(tmp_path / "masks" / "p.png"), mask)
    assert np.array_equal(read_mask(tmp_path / "masks" / "q.png"), mask)
    data = load_seg_folder(tmp_path, image_size=12, num_classes=3)
    assert data.y[:, :, 0].tolist() == [(np.arange(12) % 3).tolist()] * 2


def test_missing_mask_is_named(tmp_path):
    _write(tmp_path)
    (tmp_path / "masks" / "c.png").unlink()
    with pytest.raises(DataError, match=r"c\.png: no mask"):
        load_seg_folder(tmp_path)


def test_mask_of_another_size(tmp_path):
    _write(tmp_path)
    Image.fromarray(np.zeros((12, 15), dtype=np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(DataError, match=r"b\.png: the mask is 12×15 .* is 12×16"):
        load_seg_folder(tmp_path)


def test_labels_out_of_range(tmp_path):
    _write(tmp_path)
    bad = np.zeros((12, 16), dtype=np.uint8)
    bad[3, 3], bad[4, 4] = 7, 9
    Image.fromarray(bad).save(tmp_path / "masks" / "d.png")
    with pytest.raises(DataError, match=r"d\.png: class id\(s\) 7, 9 are outside .*0\.\.2"):
        load_seg_folder(tmp_path, num_classes=3)


def test_non_integer_and_colour_masks(tmp_path):
    _write(tmp_path)
    frac = np.zeros((12, 16), dtype=np.float32)
    frac[2, 2] = 0.5
    Image.fromarray(frac, mode="F").save(tmp_path / "masks" / "a.tif")
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(DataError, match="non-integer"):
        load_seg_folder(tmp_path)
    (tmp_path / "masks" / "a.tif").unlink()
    Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DataError, match="RGB image"):
        load_seg_folder(tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_seg_folder(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_seg_folder(tmp_path)
    _write(tmp_path)
    for f in (tmp_path / "masks").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no masks found"):
        load_seg_folder(tmp_path)


def test_only_background_is_refused(tmp_path):
    _write(tmp_path, classes=1)
    with pytest.raises(DataError, match="at least 2 classes"):
        load_seg_folder(tmp_path)


def test_load_seg_split_of_a_folder(tmp_path):
    _write(tmp_path, stems=tuple("abcdefghij"))
    split = load_seg_split(str(tmp_path), 8, None)
    assert len(split.x_train) == 8 and len(split.x_test) == 2
    assert split.num_classes == 3 and split.in_channels == 3
