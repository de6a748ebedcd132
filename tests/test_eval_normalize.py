"""Normalization with stored statistics: every implementation branch, one formula.

``affine_normalize`` picks torch ops by what autograd needs (no gradient, input only,
γ/β, mean/var); each must compute ``(x − μ)·γ/σ + β`` as accurately as the float64
reference on off-center data (where the folded ``x·a + b`` loses every digit), with the
same gradients, in both memory formats.
"""

from __future__ import annotations

import pytest
import torch

from normlab._core.normalize import affine_normalize

C = 6


def _case(center: float, std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = center + std * torch.randn(3, C, 5, 4, generator=g, dtype=torch.float64)
    return {
        "x": x,
        "mean": center + std * 0.1 * torch.randn(C, generator=g, dtype=torch.float64),
        "var": std**2 * (0.5 + torch.rand(C, generator=g, dtype=torch.float64)),
        "weight": 1 + 0.2 * torch.randn(C, generator=g, dtype=torch.float64),
        "bias": 0.3 * torch.randn(C, generator=g, dtype=torch.float64),
    }


def _reference(t: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    shape = (1, C, 1, 1)
    scale = (t["weight"] / torch.sqrt(t["var"] + eps)).reshape(shape)
    return (t["x"] - t["mean"].reshape(shape)) * scale + t["bias"].reshape(shape)


#: which tensors ask for a gradient: no graph, input only, γ/β, mean/var
BRANCHES = {
    "no_grad": (),
    "input_only": ("x",),
    "affine": ("x", "weight", "bias"),
    "statistics": ("x", "mean", "var"),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("center,std", [(0.0, 1.0), (1e4, 1e-2)], ids=["centered", "off_center"])
def test_every_branch_matches_the_float64_reference(branch, channels_last, center, std):
    eps = 1e-5
    # The reference on the fp32-rounded values: what fp32 can represent of them.
    t64 = {k: v.float().double() for k, v in _case(center, std).items()}
    ref = _reference(t64, eps)
    t = {k: v.float() for k, v in t64.items()}
    if channels_last:
        t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    for k in BRANCHES[branch]:
        t[k].requires_grad_(True)
    y = affine_normalize(t["x"], t["mean"], t["var"], t["weight"], t["bias"], eps)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    # fp32 rounding of (x − μ)·s + β relative to the output's size: a few ulp.
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    if not BRANCHES[branch]:
        return
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    y.backward(dy.float())
    for k in BRANCHES[branch]:
        r = {n: v.clone().requires_grad_(n == k) for n, v in t64.items()}
        (expected,) = torch.autograd.grad(_reference(r, eps), r[k], dy)
        got = t[k].grad
        assert got is not None, k
        scale = float(expected.abs().max()) + 1e-30
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4 * scale)


def test_half_input_is_normalized_in_float32_and_returned_in_its_dtype():
    t64 = {k: v.float().double() for k, v in _case(100.0, 0.5, seed=2).items()}
    x = t64["x"].bfloat16()
    stats = {k: t64[k].float() for k in ("mean", "var", "weight", "bias")}
    y = affine_normalize(x, stats["mean"], stats["var"], stats["weight"], stats["bias"], 1e-5)
    assert y.dtype == torch.bfloat16
    r = dict(t64, x=x.double())  # the reference on the bf16-rounded input
    torch.testing.assert_close(y.double(), _reference(r, 1e-5), rtol=1e-2, atol=1e-2)


def test_the_one_pass_fold_runs_only_where_it_is_accurate():
    from normlab._core.normalize import FOLD_MAX_RATIO, _fold_is_accurate

    x = torch.randn(2, 3, 4, 4)
    var = torch.ones(3)
    assert _fold_is_accurate(x, torch.full((3,), FOLD_MAX_RATIO * 0.99), var, 0.0)
    assert not _fold_is_accurate(x, torch.tensor([0.0, FOLD_MAX_RATIO * 1.01, 0.0]), var, 0.0)
    assert not _fold_is_accurate(x, torch.full((3,), float("nan")), var, 0.0)
    assert not _fold_is_accurate(x.half(), torch.zeros(3), var, 1e-5)  # half: centered
    assert not _fold_is_accurate(x, torch.zeros(3, requires_grad=True), var, 1e-5)


@pytest.mark.parametrize("branch", ["no_grad", "input_only", "affine"])
def test_the_fold_at_its_bound_loses_at_most_three_bits(branch):
    """|μ|/σ just under the bound: the fold's error stays within 8 ulps of |γ| + |y|'s own."""
    from normlab._core.normalize import FOLD_MAX_RATIO

    g = torch.Generator().manual_seed(3)
    std = 0.37
    mean = torch.full((C,), 0.999 * FOLD_MAX_RATIO * std, dtype=torch.float64)
    x = mean.reshape(1, C, 1, 1) + std * torch.randn(4, C, 9, 7, generator=g, dtype=torch.float64)
    t64 = {
        "x": x.float().double(),
        "mean": mean.float().double(),
        "var": torch.full((C,), std**2, dtype=torch.float64).float().double(),
        "weight": (1 + 0.2 * torch.randn(C, generator=g, dtype=torch.float64)).float().double(),
        "bias": (0.3 * torch.randn(C, generator=g, dtype=torch.float64)).float().double(),
    }
    ref = _reference(t64, 0.0)
    t = {k: v.float().requires_grad_(k in BRANCHES[branch]) for k, v in t64.items()}
    y = affine_normalize(t["x"], t["mean"], t["var"], t["weight"], t["bias"], 0.0)
    ulp = torch.finfo(torch.float32).eps
    bound = ulp * (8 * t64["weight"].abs().reshape(1, C, 1, 1) + 2 * ref.abs())
    assert ((y.double() - ref).abs() <= bound).all()
