"""The zoo itself: every model builds without weights and runs its example batch."""

from __future__ import annotations

import pytest
import torch

from normlab.feed import feed
from zoo._zoo import outputs, zoo_params


@pytest.mark.parametrize("entry", zoo_params())
def test_builds_and_runs(entry):
    model = entry.build().eval()
    with torch.no_grad():
        out = outputs(feed(model, entry.batch(0)))
    assert out and all(torch.isfinite(t).all() for t in out if t.is_floating_point())
