"""Tiny data and configs so that the lab tests train in well under a second per run."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def tiny_npz(tmp_path):
    """48 images of 8×8 in 2 classes: bright top half vs bright bottom half, plus noise."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.3, size=(48, 8, 8)).astype(np.float32)
    y = np.arange(48) % 2
    x[y == 0, :4] += 0.7
    x[y == 1, 4:] += 0.7
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def tiny_kwargs(tiny_npz):
    """SweepConfig keywords for a 1-epoch run of a 2-stage net on 8×8 images."""
    return dict(
        seeds=(0,), epochs=1, data=str(tiny_npz), image_size=8, max_train=None, widths=(8, 8)
    )
