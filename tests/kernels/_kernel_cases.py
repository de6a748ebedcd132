"""Shared pieces of the kernel tests: device, layouts, activations in float64 NumPy,
running a kernel and its backward, the split and determinism checks.

A case is a frozen dataclass in each test module's table; ids are its label.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from _testing import assert_close, np64, offcenter

# Native CUDA when the interpreter is switched off and there is a GPU; the interpreter
# on CPU otherwise.
DEVICE = (
    "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
)

HALF = (torch.float16, torch.bfloat16)


def requires_kernels() -> None:
    """Skip the calling module without triton or without a place to run the kernels."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'normlab[triton]')")
    from normlab import kernels

    if not kernels.available():
        pytest.skip(f"the kernels cannot run here: {kernels.missing()}", allow_module_level=True)


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` in memory layout ``name``: "nchw" (contiguous) or "cl" (channels_last)."""
    if name == "nchw":
        return x.contiguous()
    if name == "cl":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is None:  # (N, C, L): channels last by a transposed copy
            return x.transpose(1, -1).contiguous().transpose(1, -1)
        return x.contiguous(memory_format=fmt)
    raise ValueError(name)


def make_x(shape, dtype, layout_name="nchw", seed=0, loc=3.0, scale=2.0) -> torch.Tensor:
    x = offcenter(*shape, dtype=torch.float64, seed=seed, loc=loc, scale=scale)
    return layout(x.to(dtype), layout_name).to(DEVICE).requires_grad_()


def make_param(c, dtype, seed, loc=1.0, scale=0.5, grad=True) -> torch.Tensor:
    p = offcenter(c, dtype=torch.float64, seed=seed, loc=loc, scale=scale).to(dtype).to(DEVICE)
    return p.requires_grad_(grad)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters stay fp32 for half activations (mixed precision), else the input dtype."""
    return torch.float32 if dtype in HALF else dtype


def act_forward(z: np.ndarray, act: str | None) -> np.ndarray:
    if act == "silu":
        return z / (1.0 + np.exp(-z))
    if act == "relu":
        return np.maximum(z, 0.0)
    return z


def act_backward(dy: np.ndarray, z: np.ndarray, act: str | None) -> np.ndarray:
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return dy * s * (1.0 + z * (1.0 - s))
    if act == "relu":
        return np.where(z > 0, dy, 0.0)
    return dy


def run(fn, inputs: dict, seed: int = 7):
    """``y = fn(**inputs)``, ``dy`` (random, y's dtype and layout) and the gradients of
    every input that requires one (dict by name)."""
    y = fn(**inputs)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).to(y.device)
    dy = dy.to(memory_format=torch.contiguous_format)  # a layout unlike y's, sometimes
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(y, [inputs[k] for k in names], dy)
    return y, dy, dict(zip(names, grads, strict=True))


def assert_deterministic(fn, inputs: dict, seed: int = 7) -> None:
    """Two runs of ``fn`` on the same inputs give bitwise-equal outputs and gradients
    (no atomics, fixed merge orders)."""
    first = run(fn, inputs, seed)
    second = run(fn, inputs, seed)
    assert torch.equal(first[0], second[0]), "y differs between two runs"
    for name, g in first[2].items():
        assert torch.equal(g, second[2][name]), f"d{name} differs between two runs"


def assert_splits(plan, *, channels: bool = False) -> None:
    """The plan cuts each reduction over several programs (and, with ``channels``,
    the channels of a group too): a case meant to test the split really takes it."""
    assert plan.split > 1, f"the case does not split its reduction ({plan.grid=})"
    assert plan.split_c > 1 or not channels, "the case does not split channels"


def check(actual: torch.Tensor, expected, dtype: torch.dtype, what: str, **tol) -> None:
    assert actual is not None, f"{what}: no gradient"
    assert torch.isfinite(actual.float()).all(), f"{what}: NaN/inf (an unwritten output?)"
    try:
        assert_close(actual, expected, dtype, **tol)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.stride() == b.stride()


__all__ = [
    "DEVICE",
    "HALF",
    "act_backward",
    "act_forward",
    "assert_deterministic",
    "assert_splits",
    "check",
    "layout",
    "make_param",
    "make_x",
    "np64",
    "param_dtype",
    "requires_kernels",
    "run",
    "same_layout",
]
