"""Switchable Norm kernels (+ torch mixing) vs the float64 reference: a labelled case
table × dtypes, including the running-statistics update."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _kernel_cases import (
    DEVICE,
    HALF,
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

from normlab.kernels import _common, fused_switchable_norm  # noqa: E402
from normlab.kernels._common import channel_plan  # noqa: E402


@dataclass(frozen=True)
class SNCase:
    label: str
    shape: tuple[int, ...]
    layout: str = "nchw"
    training: bool = True
    using_bn: bool = True
    affine: bool = True
    tile: int | None = None  # interpreter tile override: multi-tile loops and splits
    split: bool = False  # the case must split each (n, c) row over several programs
    loc: float = 3.0
    scale: float = 2.0


CASES = [
    SNCase("train-nonpow2-C-and-HW", (2, 5, 3, 7)),
    SNCase("train-channels_last", (3, 6, 4, 3), "cl"),
    SNCase("eval-running-stats", (2, 5, 4, 3), training=False),
    SNCase("eval-channels_last", (2, 6, 3, 3), "cl", training=False),
    SNCase("no-bn-N=1", (1, 6, 4, 5), using_bn=False),
    SNCase("N=1-train", (1, 5, 3, 3)),
    SNCase("no-affine", (2, 4, 3, 5), affine=False),
    SNCase("(N,C)", (4, 6)),
    SNCase("(N,C)-eval", (3, 5), training=False),
    SNCase("3d-channels_last", (2, 3, 2, 3, 2), "cl"),
    SNCase("multi-tile", (2, 3, 5, 5), tile=16),
    SNCase("multi-tile-channels_last", (2, 6, 5, 3), "cl", tile=16),
    # Each (n, c) row's positions split over several programs.
    SNCase("s-split-train-N=1", (1, 3, 7, 3), tile=16, split=True),
    SNCase("s-split-train-channels_last", (1, 6, 5, 3), "cl", tile=16, split=True),
    SNCase("s-split-eval-cl-N=2", (2, 5, 3, 7), "cl", training=False, tile=8, split=True),
    SNCase("s-split-no-bn-3d", (1, 3, 3, 2, 5), using_bn=False, tile=8, split=True),
    SNCase("s-split-no-affine-(N,C,L)-cl", (1, 6, 11), "cl", affine=False, tile=8, split=True),
    SNCase("s-split-off-center", (1, 3, 6, 5), tile=8, split=True, loc=1e4, scale=1e-2),
    SNCase("(N,C)-N=2-small-tile", (2, 5), tile=4),
]
HALF_CASES = {"train-nonpow2-C-and-HW", "train-channels_last", "s-split-train-channels_last"}
FP64_CASES = {
    "train-nonpow2-C-and-HW", "multi-tile-channels_last", "eval-running-stats",
    "s-split-train-N=1", "s-split-eval-cl-N=2",
}  # fmt: skip

PARAMS = [pytest.param(c, torch.float32, id=f"{c.label}-fp32") for c in CASES]
PARAMS += [
    pytest.param(c, dt, id=f"{c.label}-{str(dt)[6:]}")
    for c in CASES
    for dt in (*HALF, torch.float64)
    if (c.label in HALF_CASES and dt in HALF) or (c.label in FP64_CASES and dt == torch.float64)
]


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_switchable_norm_kernel_matches_reference(case: SNCase, dtype, monkeypatch):
    if case.tile is not None:
        monkeypatch.setattr(_common, "INTERPRET_TILE", case.tile)
    c = case.shape[1]
    k = (3 if len(case.shape) > 2 else 2) - (0 if case.using_bn else 1)
    pdt = param_dtype(dtype)
    x = make_x(case.shape, dtype, case.layout, loc=case.loc, scale=case.scale)
    if case.split:
        _, _, sc, ss = _common.ncs(x)
        assert_splits(channel_plan(x, sc, ss))
    g = torch.Generator().manual_seed(5)
    inputs = dict(
        input=x,
        mean_weight=torch.randn(k, generator=g).to(pdt).to(DEVICE).requires_grad_(),
        var_weight=torch.randn(k, generator=g).to(pdt).to(DEVICE).requires_grad_(),
        training=case.training,
        using_bn=case.using_bn,
        eps=1e-5,
        momentum=0.2,
    )
    if case.affine:
        inputs["weight"] = make_param(c, pdt, seed=1)
        inputs["bias"] = make_param(c, pdt, seed=2, loc=0.0)
    if case.using_bn:
        inputs["running_mean"] = make_param(c, torch.float32, seed=3, loc=3.0, grad=False)
        inputs["running_var"] = make_param(c, torch.float32, seed=4, loc=4.0, grad=False)
    rm0 = np64(inputs.get("running_mean"))
    rv0 = np64(inputs.get("running_var"))

    y, dy, grads = run(fused_switchable_norm, inputs)
    y_ref, cache = R.switchable_norm_forward(
        np64(x),
        np64(inputs["mean_weight"]),
        np64(inputs["var_weight"]),
        np64(inputs.get("weight")),
        np64(inputs.get("bias")),
        running_mean=rm0,
        running_var=rv0,
        training=case.training,
        eps=1e-5,
        using_bn=case.using_bn,
    )
    g_ref = R.switchable_norm_backward(np64(dy), cache)

    pcheck = dtype if dtype in HALF else pdt
    assert y.dtype == dtype and same_layout(y, x)
    check(y, y_ref, dtype, "y")
    check(grads["input"], g_ref["dx"], dtype, "dx")
    check(grads["mean_weight"], g_ref["dmean_weight"], pcheck, "dmean_weight")
    check(grads["var_weight"], g_ref["dvar_weight"], pcheck, "dvar_weight")
    if case.affine:
        check(grads["weight"], g_ref["dweight"], pcheck, "dweight")
        check(grads["bias"], g_ref["dbias"], pcheck, "dbias")
    if case.using_bn and case.training:
        m, v, _ = R.batch_norm_update_running(np64(x), rm0, rv0, momentum=0.2)
        check(inputs["running_mean"], m, torch.float32, "running_mean")
        check(inputs["running_var"], v, torch.float32, "running_var")
    elif case.using_bn:
        assert (np64(inputs["running_mean"]) == rm0).all(), "eval must not update running stats"
    if case.split:  # (training updates the running statistics again; y does not read them)
        assert_deterministic(fused_switchable_norm, inputs)


def test_bn_branch_refuses_one_value_per_channel():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused_switchable_norm(x, torch.zeros(2), torch.zeros(2))


def test_logits_shape_is_checked():
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        fused_switchable_norm(torch.randn(2, 4, 3), torch.zeros(2), torch.zeros(3))
