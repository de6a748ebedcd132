"""The defects of issue 22 under the interpreter: strided γ/β/τ, S = 0, the device each
launch runs on, double backward, no private triton API."""

from __future__ import annotations

import contextlib
import pathlib
from types import SimpleNamespace

import pytest
import torch
from _kernel_cases import DEVICE, check, make_param, make_x, requires_kernels

import normlab.functional as NF
from normlab import kernels

requires_kernels()

from normlab.kernels import _common  # noqa: E402


def _grads(fn, inputs):
    y = fn()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return (y, *torch.autograd.grad(y, inputs, dy.to(y.device)))


def _agree(make, inputs, what):
    got = _grads(lambda: make("triton"), inputs)
    want = _grads(lambda: make("torch"), inputs)
    for a, e, name in zip(got, want, ["y", *(f"d{i}" for i in range(len(inputs)))], strict=True):
        check(a, e, torch.float32, f"{what} {name}")


def test_issue_repro_strided_weight_and_bias_group_norm():
    """The issue's call: a sliced γ and a column of a matrix as β (off by 5.6 before)."""
    g = torch.Generator().manual_seed(0)
    x = (2 + torch.randn(2, 8, 5, 3, generator=g)).to(DEVICE)
    w = torch.randn(16, generator=g).to(DEVICE)[::2]
    b = torch.randn(8, 2, generator=g).to(DEVICE)[:, 0]
    assert not w.is_contiguous() and not b.is_contiguous()
    got = NF.group_norm(x, 4, w, b, backend="triton")
    torch.testing.assert_close(got, NF.group_norm(x, 4, w, b, backend="torch"))


def _strided(c, seed, loc=1.0):
    base = make_param(2 * c, torch.float32, seed, loc=loc, grad=False)
    return base[::2].detach().requires_grad_()


def test_strided_parameters_of_every_kernel():
    x = make_x((2, 6, 4, 3), torch.float32, "cl")
    w, b, tau = _strided(6, 1), _strided(6, 2, 0.0), _strided(6, 3, -0.2)
    rm, rv = _strided(6, 4, 3.0), _strided(6, 5, 4.0)
    assert not w.is_contiguous()
    _agree(lambda be: NF.group_norm(x, 3, w, b, act="silu", backend=be), [x, w, b], "GN")
    _agree(lambda be: NF.frn_tlu(x, w, b, tau, backend=be), [x, w, b, tau], "FRN")
    _agree(
        lambda be: NF.frozen_batch_norm(x, w, b, rm.detach(), rv.detach(), backend=be),
        [x, w, b],
        "frozen BN",
    )
    mw = make_param(6, torch.float32, 6, loc=0.0, grad=False)[::2].detach().requires_grad_()
    vw = make_param(6, torch.float32, 7, loc=0.0, grad=False)[1::2].detach().requires_grad_()
    _agree(
        lambda be: NF.switchable_norm(x, mw, vw, w, b, training=True, backend=be),
        [x, mw, vw, w, b],
        "SN",
    )


@pytest.mark.parametrize("shape", [(2, 4, 0), (2, 4, 0, 3), (1, 4, 3, 0, 2)])
def test_empty_spatial_dims(shape):
    """S = 0 with N, C > 0: an empty output and zero parameter gradients (the plan once
    divided by zero first)."""
    x = torch.empty(shape, device=DEVICE, requires_grad=True)
    w = torch.ones(4, device=DEVICE, requires_grad=True)
    b = torch.zeros(4, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    calls = {
        "group_norm": lambda: kernels.fused_group_norm(x, 2, w, b),
        "frozen_batch_norm": lambda: kernels.fused_frozen_batch_norm(x, w, b, rm, rv),
        "frn": lambda: kernels.fused_filter_response_norm(x, w, b, tau=b),
    }
    for name, call in calls.items():
        y = call()
        assert y.shape == x.shape, name
        gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b], allow_unused=True)
        assert gx is None or gx.shape == x.shape, name
        for g in (gw, gb):
            assert g is None or (g == 0).all(), name


def test_device_guard_enters_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with _common.device_guard(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.zeros(1)):  # CPU: nothing entered
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_forward_and_backward_launches_under_the_device_guard(monkeypatch):
    seen: list[str] = []

    def guard(t):
        seen.append(t.device.type)
        return contextlib.nullcontext()

    monkeypatch.setattr(_common, "device_guard", guard)
    x = make_x((2, 4, 3, 3), torch.float32)
    w, b = make_param(4, torch.float32, 1), make_param(4, torch.float32, 2, loc=0.0)
    mw, vw = make_param(3, torch.float32, 3, loc=0.0), make_param(3, torch.float32, 4, loc=0.0)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    calls = [
        lambda: kernels.fused_group_norm(x, 2, w, b),
        lambda: kernels.fused_frozen_batch_norm(x, w, b, rm, rv),
        lambda: kernels.fused_filter_response_norm(x, w, b, tau=b),
        lambda: kernels.fused_switchable_norm(x, mw, vw, w, b),
    ]
    for call in calls:
        seen.clear()
        y = call()
        assert seen == [DEVICE]  # the forward
        torch.autograd.grad(y.sum(), [x])
        assert seen == [DEVICE, DEVICE]  # and the backward


def test_double_backward_is_refused_with_the_fix():
    x = make_x((2, 4, 3, 3), torch.float32)
    w, b = make_param(4, torch.float32, 1), make_param(4, torch.float32, 2, loc=0.0)
    mw, vw = make_param(3, torch.float32, 3, loc=0.0), make_param(3, torch.float32, 4, loc=0.0)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    calls = [
        lambda: NF.group_norm(x, 2, w, b, backend="triton"),
        lambda: NF.frozen_batch_norm(x, w, b, rm, rv, act="relu", backend="triton"),
        lambda: NF.frn_tlu(x, w, b, b, backend="triton"),
        lambda: NF.switchable_norm(x, mw, vw, w, b, backend="triton"),
    ]
    for call in calls:
        y = call()
        with pytest.raises(RuntimeError, match=r"first derivative only.*backend='torch'"):
            torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        torch.autograd.grad(call().square().sum(), [x])  # a first derivative still works
    # backend='torch' differentiates twice (what the error recommends).
    y = NF.group_norm(x, 2, w, b, backend="torch")
    (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    torch.autograd.grad(gx.sum(), [w])


def test_no_private_triton_api():
    src = pathlib.Path(kernels.__file__).parent
    for path in src.glob("*.py"):
        text = path.read_text()
        assert "tl.standard._" not in text and "triton.language.standard._" not in text, path
