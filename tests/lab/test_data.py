"""Embedded data, user .npz and image folders, and clear errors for bad data."""

from __future__ import annotations

import numpy as np
import pytest

from normlab.lab.data.images import ANIMAL_MNIST_CLASSES, DataError, load_images, split_data


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


def test_garbage_npz_names_the_format(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(DataError, match="not a .npz archive") as info:
        load_images(bad)
    assert "x (images" in str(info.value) and "pickle" not in str(info.value)
    single = tmp_path / "array.npz"  # one .npy array saved under a .npz name
    with single.open("wb") as f:
        np.save(f, np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match="not a .npz archive"):
        load_images(single)


def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    y = np.empty(6, dtype=object)
    y[:] = [{"label": i % 2} for i in range(6)]
    np.savez(path, x=np.zeros((6, 8, 8), np.float32), y=y)
    with pytest.raises(DataError, match="'y' holds Python objects.*never unpickles"):
        load_images(path)


def test_non_finite_images_refused_with_where(tmp_path):
    x = np.random.default_rng(2).uniform(size=(10, 6, 6)).astype(np.float32)
    x[3, 1, 1] = np.nan
    x[7, 0, :2] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"3 non-finite value\(s\).*2 image\(s\), at index 3, 7"):
        load_images(tmp_path / "nan.npz")


def test_class_with_one_image_refused(tmp_path):
    y = np.array([0, 0, 0, 1, 1, 1, 2])
    np.savez(tmp_path / "one.npz", x=np.zeros((7, 6, 6), np.float32), y=y)
    with pytest.raises(DataError, match="class\\(es\\) 2 have a single image"):
        load_images(tmp_path / "one.npz")


def test_training_split_smaller_than_batch(tmp_path):
    from normlab.lab.data.images import check_batch_size

    np.savez(tmp_path / "few.npz", x=np.zeros((10, 6, 6), np.float32), y=np.arange(10) % 2)
    split = split_data(load_images(tmp_path / "few.npz", image_size=6))
    check_batch_size(split, len(split.x_train))
    with pytest.raises(DataError, match=f"holds {len(split.x_train)} images, fewer than"):
        check_batch_size(split, len(split.x_train) + 1)
