"""Frozen / eval-mode BatchNorm (+ activation) kernel vs the float64 reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _kernel_cases import (
    HALF,
    act_backward,
    act_forward,
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

from normlab.kernels import _common, fused_frozen_batch_norm  # noqa: E402
from normlab.kernels._common import channel_plan as plan  # noqa: E402


@dataclass(frozen=True)
class FBNCase:
    label: str
    shape: tuple[int, ...]
    layout: str = "nchw"
    act: str | None = None
    param_grads: bool = True  # eval-mode BN (γ, β learnable) vs frozen (buffers)
    affine: bool = True
    tile: int | None = None
    split: bool = False


CASES = [
    FBNCase("nonpow2-C-and-HW", (2, 5, 3, 7)),
    FBNCase("channels_last-silu", (2, 6, 5, 3), "cl", act="silu"),
    FBNCase("relu-frozen", (2, 5, 4, 3), act="relu", param_grads=False),
    FBNCase("frozen-channels_last", (2, 6, 3, 3), "cl", param_grads=False),
    FBNCase("no-affine", (2, 4, 3, 3), affine=False),
    FBNCase("(N,C)-relu", (5, 6), act="relu"),
    FBNCase("3d-channels_last", (2, 3, 2, 3, 2), "cl"),
    FBNCase("N=1-hw-split", (1, 3, 7, 5), tile=16, split=True),
    FBNCase("hw-split-channels_last-silu", (1, 4, 5, 7), "cl", act="silu", tile=8, split=True),
]
HALF_CASES = {"nonpow2-C-and-HW", "channels_last-silu"}
FP64_CASES = {"nonpow2-C-and-HW", "N=1-hw-split"}

PARAMS = [pytest.param(c, torch.float32, id=f"{c.label}-fp32") for c in CASES]
PARAMS += [
    pytest.param(c, dt, id=f"{c.label}-{str(dt)[6:]}")
    for c in CASES
    for dt in (*HALF, torch.float64)
    if (c.label in HALF_CASES and dt in HALF) or (c.label in FP64_CASES and dt == torch.float64)
]


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_frozen_bn_kernel_matches_reference(case: FBNCase, dtype, monkeypatch):
    if case.tile is not None:
        monkeypatch.setattr(_common, "INTERPRET_TILE", case.tile)
    c = case.shape[1]
    pdt = param_dtype(dtype)
    x = make_x(case.shape, dtype, case.layout)
    grad = case.param_grads
    inputs = dict(
        input=x,
        weight=make_param(c, pdt, seed=1, grad=grad) if case.affine else None,
        bias=make_param(c, pdt, seed=2, loc=0.0, grad=grad) if case.affine else None,
        running_mean=make_param(c, pdt, seed=3, loc=3.0, grad=False),
        running_var=make_param(c, pdt, seed=4, loc=4.0, grad=False),
        eps=1e-5,
        act=case.act,
    )
    if case.split:
        _, _, sc, ss = _common.ncs(x)
        assert plan(x, sc, ss).split > 1, "the case does not split H·W"

    y, dy, grads = run(fused_frozen_batch_norm, inputs)
    z, cache = R.batch_norm_forward(
        np64(x),
        np64(inputs["weight"]),
        np64(inputs["bias"]),
        running_mean=np64(inputs["running_mean"]),
        running_var=np64(inputs["running_var"]),
        training=False,
        eps=1e-5,
    )
    g_ref = R.batch_norm_backward(act_backward(np64(dy), z, case.act), cache)

    pcheck = dtype if dtype in HALF else pdt
    assert y.dtype == dtype and same_layout(y, x)
    check(y, act_forward(z, case.act), dtype, "y")
    check(grads["input"], g_ref["dx"], dtype, "dx")
    if case.affine and grad:
        check(grads["weight"], g_ref["dweight"], pcheck, "dweight")
        check(grads["bias"], g_ref["dbias"], pcheck, "dbias")
    else:
        assert set(grads) == {"input"}


def test_gradients_reach_the_running_statistics():
    """Autograd carries dμ and ds from the kernel to running_mean / running_var."""
    x = make_x((2, 3, 4, 2), torch.float64, "cl")
    rm = make_param(3, torch.float64, seed=3, loc=3.0)
    rv = make_param(3, torch.float64, seed=4, loc=4.0)
    w = make_param(3, torch.float64, seed=1)

    def f(x, rm, rv, w):
        return fused_frozen_batch_norm(x, w, None, rm, rv, 1e-5, act="silu")

    def g(x, rm, rv, w):
        y = (x - rm.reshape(1, 3, 1, 1)) * (w / torch.sqrt(rv + 1e-5)).reshape(1, 3, 1, 1)
        return torch.nn.functional.silu(y)

    dy = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad(f(x, rm, rv, w), (x, rm, rv, w), dy)
    want = torch.autograd.grad(g(x, rm, rv, w), (x, rm, rv, w), dy)
    for a, b, name in zip(
        got, want, ("dx", "drunning_mean", "drunning_var", "dweight"), strict=True
    ):
        check(a, b, torch.float64, name)


def test_running_stats_updated_before_backward():
    """As on the torch path, an in-place update of the statistics between forward and
    backward (a shared BN in train mode, say) does not break the backward."""
    x = make_x((2, 3, 4, 2), torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = make_param(3, torch.float32, seed=1)
    b = make_param(3, torch.float32, seed=2)
    y = fused_frozen_batch_norm(x, w, b, rm, rv)
    rm.add_(1.0)
    rv.mul_(2.0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
