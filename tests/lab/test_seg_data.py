"""Built-in silhouette scenes: shapes, labels, determinism, split, standardization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.lab.data.images import ANIMAL_MNIST_CLASSES
from normlab.lab.data.scenes import (
    SegData,
    _compose,
    _silhouettes,
    _source_pools,
    silhouette_scenes,
    split_seg_data,
)
from normlab.lab.data.seg_folder import load_seg_split
from normlab.lab.errors import DataError


@pytest.fixture(scope="module")
def scenes():
    return silhouette_scenes(n_train=96, n_test=24, image_size=32, labels="animals", seed=3)


def test_shapes_types_and_classes(scenes):
    assert scenes.x_train.shape == (96, 3, 32, 32) and scenes.x_train.dtype == torch.float32
    assert scenes.y_train.shape == (96, 32, 32) and scenes.y_train.dtype == torch.int64
    assert scenes.x_test.shape == (24, 3, 32, 32) and scenes.y_test.shape == (24, 32, 32)
    assert scenes.num_classes == 11 and scenes.classes == ("background", *ANIMAL_MNIST_CLASSES)
    assert scenes.in_channels == 3 and scenes.image_size == 32 and scenes.ignore_index == 255
    y = scenes.y_train.numpy()
    assert y.min() == 0 and y.max() <= 10
    assert len(np.unique(y)) >= 8  # most classes appear in 96 scenes
    fg = (y > 0).mean()
    assert 0.05 < fg < 0.4
    assert ((y > 0).reshape(96, -1).any(axis=1)).all()  # every scene shows an animal


def test_standardized_with_the_training_statistics(scenes):
    x = scenes.x_train.double()
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-5
    assert scenes.x_test.double().mean(dim=(0, 2, 3)).abs().max() > 1e-4  # not refitted


def test_deterministic_from_the_seed(scenes):
    again = silhouette_scenes(n_train=96, n_test=24, image_size=32, labels="animals", seed=3)
    assert torch.equal(again.x_train, scenes.x_train) and torch.equal(again.y_test, scenes.y_test)
    other = silhouette_scenes(n_train=96, n_test=24, image_size=32, labels="animals", seed=4)
    assert not torch.equal(other.y_train, scenes.y_train)


def test_test_scenes_do_not_depend_on_the_training_count(scenes):
    more = silhouette_scenes(n_train=40, n_test=24, image_size=32, labels="animals", seed=3)
    assert torch.equal(more.y_test, scenes.y_test)


def test_source_pools_are_disjoint_and_stratified():
    _, labels = _silhouettes()
    train, test = _source_pools(labels, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 10000
    assert np.bincount(labels[test]).tolist() == [200] * 10


def test_objects_are_painted_with_their_colour_over_the_background():
    silhouettes, labels = _silhouettes()
    pool = np.flatnonzero(labels == 7)[:5]
    rng = np.random.default_rng(11)
    x, y = _compose(rng, 6, 32, pool, silhouettes, labels, max_objects=1)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == {0, 8}
    # Inside the mask the object colour dominates: the pixels of one scene's object vary
    # far less than its textured background does.
    for img, tgt in zip(x, y, strict=True):
        inside = img[:, tgt == 8]
        assert inside.std(axis=1).mean() < img[:, tgt == 0].std(axis=1).mean()


def test_foreground_labels():
    fg = silhouette_scenes(n_train=16, n_test=4, image_size=16, seed=3)
    animals = silhouette_scenes(n_train=16, n_test=4, image_size=16, labels="animals", seed=3)
    assert fg.num_classes == 2 and fg.classes == ("background", "animal")
    assert torch.equal(fg.y_train, (animals.y_train > 0).long())
    assert torch.equal(fg.x_train, animals.x_train)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train"),
        ({"image_size": 6}, "image_size"),
        ({"max_objects": 0}, "max_objects"),
        ({"labels": "parts"}, "labels"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        silhouette_scenes(**kwargs)


def test_load_seg_split_builtin_is_cached():
    a = load_seg_split(None, 16, 20)
    assert load_seg_split(None, 16, 20) is a
    assert a.x_train.shape == (20, 3, 16, 16)


def _data(n: int) -> SegData:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0.2, 0.9, size=(n, 3, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=(n, 8, 8)))
    y[:, 0, 0] = 255
    return SegData(x, y, ("a", "b", "c"), "toy")


def test_split_seg_data():
    split = split_seg_data(_data(20), test_fraction=0.25, max_train=10)
    assert len(split.x_train) == 10 and len(split.x_test) == 5
    assert split.classes == ("a", "b", "c") and split.num_classes == 3
    assert (split.y_test[:, 0, 0] == 255).all()
    assert split.x_train.double().mean(dim=(0, 2, 3)).abs().max() < 1e-5
    again = split_seg_data(_data(20), test_fraction=0.25, max_train=10)
    assert torch.equal(again.y_test, split.y_test)


def test_split_errors():
    with pytest.raises(DataError, match="too few"):
        split_seg_data(_data(1))
    with pytest.raises(DataError, match="test_fraction"):
        split_seg_data(_data(5), test_fraction=1.0)
    with pytest.raises(DataError, match="max_train"):
        split_seg_data(_data(5), max_train=0)
