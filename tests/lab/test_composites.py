"""The benchmark's composite baselines compute the same function as normlab's layers."""

from __future__ import annotations

import pytest
import torch

from normlab.lab.bench.composites import COMPOSITES
from normlab.registry import create_norm


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_matches_normlab(name):
    torch.manual_seed(0)
    x = (3.0 + 2.0 * torch.randn(4, 64, 5, 3, dtype=torch.float64)).requires_grad_(True)
    ours = create_norm(name, 64).to(torch.float64)
    kwargs = {"r_max": 1.0, "d_max": 0.0} if name == "brn" else {}  # BRN's warm-up: plain BN
    comp = COMPOSITES[name](64, **kwargs).to(torch.float64)
    y1, y2 = ours(x), comp(x)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    g1 = torch.autograd.grad(y1.square().sum(), x)[0]
    g2 = torch.autograd.grad(y2.square().sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)
