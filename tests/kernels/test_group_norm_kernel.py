"""GroupNorm kernels vs the float64 reference: a labelled case table × dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _kernel_cases import (
    HALF,
    act_backward,
    act_forward,
    assert_deterministic,
    assert_splits,
    check,
    make_param,
    make_x,
    np64,
    param_dtype,
    requires_kernels,
    run,
    same_layout,
)

import normlab.reference as R

requires_kernels()

from normlab.kernels import _common, fused_group_norm  # noqa: E402
from normlab.kernels.group_norm_forward import plan  # noqa: E402


@dataclass(frozen=True)
class GNCase:
    label: str
    shape: tuple[int, ...]
    groups: int
    layout: str = "nchw"
    act: str | None = None
    weight: bool = True
    bias: bool = True
    tile: int | None = None  # interpreter tile override: multi-tile loops and splits
    split: bool = False  # the case must split the group over several programs
    channel_split: bool = False  # ... and along its channels too
    pack: bool = False  # the case must give a program several groups (channels_last)


CASES = [
    GNCase("nonpow2-C-and-HW", (2, 6, 5, 7), 3),
    GNCase("channels_last", (2, 6, 5, 7), 3, "cl"),
    GNCase("groups=C", (2, 5, 3, 3), 5),
    GNCase("groups=1-channels_last", (2, 6, 4, 5), 1, "cl"),
    GNCase("N=1-silu", (1, 9, 5, 3), 3, act="silu"),
    GNCase("silu-channels_last", (2, 12, 3, 5), 4, "cl", act="silu"),
    GNCase("relu", (2, 6, 5, 7), 2, act="relu"),
    GNCase("no-affine", (2, 6, 4, 4), 2, weight=False, bias=False),
    GNCase("weight-only-relu", (2, 6, 3, 3), 3, act="relu", bias=False),
    GNCase("(N,C)-HW=1", (3, 6), 3),
    GNCase("(N,C,L)-channels_last", (2, 6, 7), 3, "cl"),
    GNCase("3d-channels_last", (2, 4, 3, 2, 3), 2, "cl"),
    GNCase("multi-tile", (2, 4, 5, 5), 2, tile=16),
    GNCase("multi-tile-channels_last", (2, 6, 5, 3), 2, "cl", tile=16),
    GNCase("hw-split", (1, 4, 5, 7), 2, tile=16, split=True),
    GNCase("hw-split-channels_last-silu", (1, 6, 7, 5), 3, "cl", act="silu", tile=16, split=True),
    GNCase("hw-split-groups=1-relu", (2, 3, 5, 5), 1, act="relu", tile=16, split=True),
    # The group's (C/G)·S extent split over channel chunks (and positions).
    GNCase("channel-split", (1, 8, 4, 4), 2, tile=16, split=True, channel_split=True),
    GNCase(
        "channel-split-silu-no-bias",
        (1, 12, 2, 2),
        2,
        act="silu",
        bias=False,
        tile=8,
        split=True,
        channel_split=True,
    ),  # fmt: skip
    GNCase(
        "channel-and-hw-split-cl", (1, 8, 2, 1), 1, "cl", tile=4, split=True, channel_split=True
    ),  # fmt: skip
    GNCase(
        "channel-and-hw-split-3d-relu",
        (1, 6, 2, 3, 3),
        1,
        act="relu",
        tile=4,
        split=True,
        channel_split=True,
    ),  # fmt: skip
    # channels_last, several groups per program (and the split along S with them).
    GNCase("packed-cl", (2, 15, 3, 5), 5, "cl", pack=True),
    GNCase("packed-C/G=10-N=1-silu", (1, 30, 3, 5), 3, "cl", act="silu", pack=True),
    GNCase("packed-ragged-relu-no-bias", (2, 70, 2, 3), 7, "cl", act="relu", bias=False, pack=True),
    GNCase("packed-(N,C)", (3, 15), 5, "cl", pack=True),
    GNCase("packed-s-split", (1, 15, 5, 3), 5, "cl", tile=16, split=True, pack=True),
    GNCase(
        "packed-s-split-3d-no-affine",
        (1, 15, 2, 2, 3),
        5,
        "cl",
        weight=False,
        bias=False,
        tile=16,
        split=True,
        pack=True,
    ),  # fmt: skip
    GNCase(
        "packed-s-split-N=2-silu",
        (2, 15, 3, 3),
        5,
        "cl",
        act="silu",
        tile=16,
        split=True,
        pack=True,
    ),
]
# Labels crossed with the other dtypes (every case runs in fp32).
HALF_CASES = {
    "nonpow2-C-and-HW", "channels_last", "silu-channels_last", "hw-split", "channel-split",
    "packed-C/G=10-N=1-silu", "packed-s-split",
}  # fmt: skip
FP64_CASES = {
    "nonpow2-C-and-HW", "hw-split-channels_last-silu", "groups=1-channels_last",
    "channel-and-hw-split-cl", "packed-cl", "packed-s-split-N=2-silu",
}  # fmt: skip

PARAMS = [pytest.param(c, torch.float32, id=f"{c.label}-fp32") for c in CASES]
PARAMS += [
    pytest.param(c, dt, id=f"{c.label}-{str(dt)[6:]}")
    for c in CASES
    for dt in (*HALF, torch.float64)
    if (c.label in HALF_CASES and dt in HALF) or (c.label in FP64_CASES and dt == torch.float64)
]


def reference(case: GNCase, inputs: dict, dy: torch.Tensor, eps: float):
    w, b = np64(inputs.get("weight")), np64(inputs.get("bias"))
    z, cache = R.group_norm_forward(np64(inputs["input"]), case.groups, w, b, eps)
    grads = R.group_norm_backward(act_backward(np64(dy), z, case.act), cache)
    return act_forward(z, case.act), grads


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_group_norm_kernel_matches_reference(case: GNCase, dtype, monkeypatch):
    if case.tile is not None:
        monkeypatch.setattr(_common, "INTERPRET_TILE", case.tile)
    c = case.shape[1]
    x = make_x(case.shape, dtype, case.layout)
    pdt = param_dtype(dtype)
    inputs = dict(input=x, num_groups=case.groups, eps=1e-5, act=case.act)
    inputs["weight"] = make_param(c, pdt, seed=1) if case.weight else None
    inputs["bias"] = make_param(c, pdt, seed=2, loc=0.0) if case.bias else None
    _, _, sc, ss = _common.ncs(x)
    p = plan(x, case.groups, sc, ss)
    if case.split:
        assert_splits(p, channels=case.channel_split)
    assert (p.pack > 1) == case.pack, f"{p.pack} groups per program"

    y, dy, grads = run(fused_group_norm, inputs)
    y_ref, g_ref = reference(case, inputs, dy, 1e-5)

    assert y.dtype == dtype and same_layout(y, x), "output dtype/layout differ from the input"
    check(y, y_ref, dtype, "y")
    assert same_layout(grads["input"], x)
    check(grads["input"], g_ref["dx"], dtype, "dx")
    if case.weight:
        assert grads["weight"].dtype == pdt
        check(grads["weight"], g_ref["dweight"], pdt if dtype not in HALF else dtype, "dweight")
    if case.bias:
        check(grads["bias"], g_ref["dbias"], pdt if dtype not in HALF else dtype, "dbias")
    if case.split:
        assert_deterministic(fused_group_norm, inputs)


def test_channels_last_is_read_in_place():
    x = make_x((2, 6, 4, 4), torch.float32, "cl").detach()
    assert _common.ncs(x)[0] is x
    x5 = make_x((2, 4, 3, 2, 3), torch.float32, "cl").detach()
    assert _common.ncs(x5)[0] is x5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_off_center_data_keep_their_digits(dtype):
    """mean 1e4, std 1e-2: E[x²] − E[x]² would return garbage in fp32; the pivot and the
    tile-wise Chan merge keep fp32 within its tolerance of the float64 reference."""
    x = make_x((2, 4, 6, 5), dtype, "cl", loc=1e4, scale=1e-2)
    w = make_param(4, dtype, seed=1)
    b = make_param(4, dtype, seed=2, loc=0.0)
    y, dy, grads = run(fused_group_norm, dict(input=x, num_groups=2, weight=w, bias=b))
    y_ref, cache = R.group_norm_forward(np64(x), 2, np64(w), np64(b), 1e-5)
    g_ref = R.group_norm_backward(np64(dy), cache)
    # The reference is taken from the rounded input: only the kernel's own error counts.
    # The data's condition number (mean/std = 1e6) costs fp64 six of its 16 digits, in
    # the reference as in the kernel, hence 1e-8 there.
    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else {}
    check(y, y_ref, dtype, "y", **tol)
    check(grads["input"], g_ref["dx"], dtype, "dx", **tol)
    check(grads["weight"], g_ref["dweight"], dtype, "dweight", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_off_center_data_several_groups_per_program(dtype, monkeypatch):
    """The packed channels_last kernels (each channel's pivot its group's first element),
    split along S, on data of mean 1e4 and std 1e-2."""
    monkeypatch.setattr(_common, "INTERPRET_TILE", 16)
    x = make_x((1, 15, 6, 5), dtype, "cl", loc=1e4, scale=1e-2)
    p = plan(x, 5, *_common.ncs(x)[2:])
    assert p.pack > 1 and p.split > 1
    w = make_param(15, dtype, seed=1)
    b = make_param(15, dtype, seed=2, loc=0.0)
    y, dy, grads = run(fused_group_norm, dict(input=x, num_groups=5, weight=w, bias=b))
    y_ref, cache = R.group_norm_forward(np64(x), 5, np64(w), np64(b), 1e-5)
    g_ref = R.group_norm_backward(np64(dy), cache)
    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else {}
    check(y, y_ref, dtype, "y", **tol)
    check(grads["input"], g_ref["dx"], dtype, "dx", **tol)
    check(grads["weight"], g_ref["dweight"], dtype, "dweight", **tol)
    check(grads["bias"], g_ref["dbias"], dtype, "dbias", **tol)


def test_groups_per_program_fills_the_lanes():
    """C/G = 10 (SD-UNet's 320 channels in 32 groups): 3 groups per program use 30 of
    32 lanes per row instead of 10 of 16; NCHW and a power-of-two C/G keep one group."""
    from normlab.kernels.group_norm_forward import groups_per_program

    assert groups_per_program(10, 32, True, 512) == 3
    assert groups_per_program(20, 32, True, 512) == 3
    assert groups_per_program(40, 16, True, 512) == 3
    assert groups_per_program(16, 32, True, 512) == 1
    assert groups_per_program(10, 32, False, 512) == 1
    assert groups_per_program(3, 5, True, 16) == 5  # 15 of 16 lanes
    assert groups_per_program(3, 5, True, 8) == 1  # the row may not outgrow the tile


def test_constant_group_gives_finite_output():
    """Variance 0 (clamped, never negative): y = β, dx finite."""
    x = torch.full((2, 4, 3, 3), 7.0, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    b = torch.arange(4.0, requires_grad=True)
    y, dy, grads = run(fused_group_norm, dict(input=x, num_groups=2, weight=w, bias=b))
    torch.testing.assert_close(y, b.detach().reshape(1, 4, 1, 1).expand_as(y))
    assert torch.isfinite(grads["input"]).all()


def test_empty_batch():
    x = torch.empty(0, 4, 3, 3, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    y = fused_group_norm(x, 2, w, None)
    assert y.shape == x.shape
    (gw,) = torch.autograd.grad(y.sum(), [w], allow_unused=True)
    assert gw is None or (gw == 0).all()


def test_bad_act_is_refused():
    with pytest.raises(ValueError, match="act must be one of"):
        fused_group_norm(torch.randn(2, 4, 3), 2, act="gelu")
