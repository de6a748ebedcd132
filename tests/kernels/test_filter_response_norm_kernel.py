"""FRN + TLU kernels vs the float64 reference: a labelled case table × dtypes."""

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

from normlab.kernels import _common, fused_filter_response_norm  # noqa: E402
from normlab.kernels._common import channel_plan  # noqa: E402


@dataclass(frozen=True)
class FRNCase:
    label: str
    shape: tuple[int, ...]
    layout: str = "nchw"
    tlu: bool = True
    affine: bool = True
    learnable_eps: bool = True
    eps: float = 1e-2  # large enough that dε is well above rounding
    tile: int | None = None  # interpreter tile override: multi-tile loops and splits
    split: bool = False  # the case must split each (n, c) row over several programs
    loc: float = 0.5  # the data's center (FRN subtracts no mean: large ν²)


CASES = [
    FRNCase("nonpow2-C-and-HW", (2, 5, 3, 7)),
    FRNCase("channels_last", (2, 6, 5, 3), "cl"),
    FRNCase("no-tlu-float-eps", (2, 5, 4, 3), tlu=False, learnable_eps=False),
    FRNCase("no-affine-channels_last", (2, 6, 3, 3), "cl", affine=False),
    FRNCase("N=1", (1, 7, 4, 5)),
    FRNCase("HW=1", (3, 5, 1, 1)),
    FRNCase("negative-learnable-eps", (2, 4, 3, 3), eps=-2e-2),
    FRNCase("(N,C,L)", (2, 5, 9)),
    FRNCase("3d-channels_last", (2, 3, 2, 3, 2), "cl"),
    FRNCase("multi-tile", (2, 5, 6, 5), tile=16),
    FRNCase("multi-tile-channels_last", (2, 6, 5, 3), "cl", tile=16),
    # Each (n, c) row's positions split over several programs.
    FRNCase("s-split-N=1", (1, 3, 7, 3), tile=16, split=True),
    FRNCase("s-split-channels_last", (1, 6, 5, 3), "cl", tile=16, split=True),
    FRNCase("s-split-channels_last-N=2", (2, 5, 3, 7), "cl", tile=8, split=True),
    FRNCase(
        "s-split-no-tlu-float-eps", (1, 3, 5, 5), tlu=False, learnable_eps=False, tile=8, split=True
    ),
    FRNCase("s-split-no-affine-cl", (1, 6, 4, 3), "cl", affine=False, tile=8, split=True),
    FRNCase("s-split-(N,C,L)-cl", (1, 6, 11), "cl", tile=8, split=True),
    FRNCase("s-split-3d", (1, 3, 3, 2, 5), tile=8, split=True),
    FRNCase("s-split-off-center", (1, 3, 6, 5), tile=8, split=True, loc=1e3),
    FRNCase("S=1-N=1-small-tile", (1, 5, 1), tile=4),
]
HALF_CASES = {"nonpow2-C-and-HW", "channels_last", "s-split-channels_last", "s-split-N=1"}
FP64_CASES = {"nonpow2-C-and-HW", "multi-tile-channels_last", "s-split-channels_last-N=2"}

PARAMS = [pytest.param(c, torch.float32, id=f"{c.label}-fp32") for c in CASES]
PARAMS += [
    pytest.param(c, dt, id=f"{c.label}-{str(dt)[6:]}")
    for c in CASES
    for dt in (*HALF, torch.float64)
    if (c.label in HALF_CASES and dt in HALF) or (c.label in FP64_CASES and dt == torch.float64)
]


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_frn_kernel_matches_reference(case: FRNCase, dtype, monkeypatch):
    if case.tile is not None:
        monkeypatch.setattr(_common, "INTERPRET_TILE", case.tile)
    c = case.shape[1]
    pdt = param_dtype(dtype)
    x = make_x(case.shape, dtype, case.layout, loc=case.loc, scale=1.5)
    if case.split:
        _, _, sc, ss = _common.ncs(x)
        assert_splits(channel_plan(x, sc, ss))
    inputs = dict(input=x)
    if case.affine:
        inputs["weight"] = make_param(c, pdt, seed=1)
        inputs["bias"] = make_param(c, pdt, seed=2, loc=0.0)
    if case.tlu:
        # τ around the typical output: some positions above, some below the threshold.
        inputs["tau"] = make_param(c, pdt, seed=3, loc=0.0, scale=0.5)
    if case.learnable_eps:
        inputs["eps"] = torch.tensor(case.eps, dtype=pdt, device=DEVICE, requires_grad=True)
    else:
        inputs["eps"] = case.eps

    y, dy, grads = run(fused_filter_response_norm, inputs)
    y_ref, cache = R.filter_response_norm_forward(
        np64(x),
        np64(inputs.get("weight")),
        np64(inputs.get("bias")),
        eps=float(inputs["eps"].detach()) if case.learnable_eps else case.eps,
        tau=np64(inputs.get("tau")),
    )
    g_ref = R.filter_response_norm_backward(np64(dy), cache)

    pcheck = dtype if dtype in HALF else pdt
    assert y.dtype == dtype and same_layout(y, x)
    check(y, y_ref, dtype, "y")
    check(grads["input"], g_ref["dx"], dtype, "dx")
    assert same_layout(grads["input"], x)
    if case.affine:
        check(grads["weight"], g_ref["dweight"], pcheck, "dweight")
        check(grads["bias"], g_ref["dbias"], pcheck, "dbias")
    if case.tlu:
        check(grads["tau"], g_ref["dtau"], pcheck, "dtau")
    if case.learnable_eps:
        check(grads["eps"], g_ref["deps"], pcheck, "deps")
    if case.split:
        assert_deterministic(fused_filter_response_norm, inputs)


def test_frn_without_spatial_dims_is_refused():
    with pytest.raises(ValueError, match="at least one spatial dim"):
        fused_filter_response_norm(torch.randn(2, 3))
