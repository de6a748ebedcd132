"""Embedded data, user .npz and image folders, and clear errors for bad data."""

from __future__ import annotations

import numpy as np
import pytest

from normlab.lab.data import ANIMAL_MNIST_CLASSES, DataError, load_images, split_data


def test_embedded_animal_mnist():
    data = load_images(image_size=16)
    assert data.x.shape == (10000, 1, 16, 16)
    assert data.classes == ANIMAL_MNIST_CLASSES
    assert np.bincount(data.y.numpy()).tolist() == [1000] * 10
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0
    split = split_data(data, max_train=500)
    assert len(split.x_train) == 500 and len(split.x_test) == 2000
    assert np.bincount(split.y_train.numpy()).tolist() == [50] * 10  # a balanced subset
    assert abs(float(split.x_train.mean())) < 1e-4


def test_npz_nhwc_and_string_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(12, 10, 10, 3), dtype=np.uint8)
    y = np.array(["cat", "dog", "eel"] * 4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_images(tmp_path / "d.npz", image_size=8)
    assert data.x.shape == (12, 3, 8, 8)
    assert data.classes == ("cat", "dog", "eel")
    split = split_data(data)
    assert len(split.x_train) + len(split.x_test) == 12


def test_image_folder(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    for cls in ("circle", "square"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            mpimg.imsave(tmp_path / cls / f"{i}.png", rng.uniform(size=(12, 12)), cmap="gray")
    (tmp_path / "square" / "notes.txt").write_text("ignored")
    data = load_images(tmp_path, image_size=8)
    assert data.x.shape == (6, 3, 8, 8)  # imsave writes RGBA; alpha is dropped
    assert data.classes == ("circle", "square")
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_empty_npz(tmp_path):
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 8, 8)), y=np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        load_images(tmp_path / "e.npz")


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "m.npz", images=np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match="missing"):
        load_images(tmp_path / "m.npz")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_images(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_images(tmp_path)


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown data format"):
        load_images(tmp_path / "d.csv")
    with pytest.raises(DataError, match="no such file"):
        load_images(tmp_path / "nope.npz")


def test_single_class(tmp_path):
    np.savez(tmp_path / "one.npz", x=np.zeros((4, 8, 8)), y=np.zeros(4))
    with pytest.raises(DataError, match="needs >= 2"):
        load_images(tmp_path / "one.npz")
