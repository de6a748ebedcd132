"""RMSNorm and RMSNorm2d: float64 reference (forward and backward), gradcheck, torch twin."""

from __future__ import annotations

import pytest
import torch

import normlab
import normlab.functional as NF
import normlab.nn as nnl
import normlab.reference as R
from normlab.registry import create_norm

F64 = torch.float64
SHAPES = [((4, 7), (7,)), ((3, 5, 6), (6,)), ((2, 3, 4, 5), (4, 5)), ((2, 8), [2, 8])]


def _x(shape, dtype=F64, center=3.0, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (center + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


@pytest.mark.parametrize("shape, normalized", SHAPES)
@pytest.mark.parametrize("eps", [None, 1e-5, 0.0])
def test_forward_and_backward_match_the_float64_reference(shape, normalized, eps):
    m = nnl.RMSNorm(normalized, eps=eps, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(_x(m.weight.shape, center=1.0, seed=1))
    x = _x(shape).requires_grad_()
    y = m(x)
    dy = _x(shape, center=-0.3, scale=1.0, seed=2)
    y.backward(dy)
    ref_y, cache = R.rms_norm_forward(
        x.detach().numpy(), normalized, m.weight.detach().numpy(), eps
    )
    grads = R.rms_norm_backward(dy.numpy(), cache)
    torch.testing.assert_close(y.detach(), torch.from_numpy(ref_y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.from_numpy(grads["dx"]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        m.weight.grad, torch.from_numpy(grads["dweight"]), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(affine):
    x = _x((3, 4, 5)).requires_grad_()
    w = _x((4, 5), center=1.0, seed=3).requires_grad_() if affine else None
    inputs = (x, w) if affine else (x,)
    assert torch.autograd.gradcheck(lambda x, w=None: NF.rms_norm(x, (4, 5), w, 1e-6), inputs)
    assert torch.autograd.gradgradcheck(lambda x, w=None: NF.rms_norm(x, (4, 5), w, 1e-6), inputs)


@pytest.mark.parametrize(
    "dtype, tol",
    [(F64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
)
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("affine", [True, False])
def test_twin_of_torch_rmsnorm(dtype, tol, eps, affine):
    ours = nnl.RMSNorm([6, 5], eps=eps, elementwise_affine=affine, dtype=dtype)
    theirs = torch.nn.RMSNorm([6, 5], eps=eps, elementwise_affine=affine, dtype=dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    if affine:
        w = _x((6, 5), center=1.0, seed=4).to(dtype)
        ours.load_state_dict({"weight": w})
        theirs.load_state_dict({"weight": w})
    x = _x((3, 4, 6, 5), center=20.0, scale=4.0).to(dtype)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == dtype
    torch.testing.assert_close(yo, yt, rtol=tol, atol=tol)
    dy = _x(x.shape, center=0.1, seed=5).to(dtype)
    yo.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=tol, atol=tol * 10)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=tol, atol=tol * 10)
    for mode in (ours.eval(), theirs.eval()):  # no batch statistics: eval is train
        assert not mode.training
    torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)


def test_half_input_accumulates_in_float32():
    """fp16 values whose squares overflow fp16 (x ~ 300, x² ~ 9e4 > 65504) stay finite."""
    x = _x((2, 64), center=300.0, scale=20.0).to(torch.float16)
    y = NF.rms_norm(x, (64,))
    ref, _ = R.rms_norm_forward(x.double().numpy(), (64,))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), torch.from_numpy(ref), rtol=2e-3, atol=2e-3)


def test_each_sample_on_its_own():
    m = nnl.RMSNorm(5, dtype=F64)
    x = _x((4, 5))
    torch.testing.assert_close(m(x)[1:2], m(x[1:2]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: NF.rms_norm(torch.randn(2, 3), (4,)), r"normalized_shape=\[4\] must equal"),
        (lambda: NF.rms_norm(torch.randn(2, 3), (3,), torch.ones(4)), r"weight has shape"),
        (lambda: NF.rms_norm(torch.randn(2, 3), (3,), eps=-1.0), "eps"),
        (lambda: nnl.RMSNorm(3, eps=float("nan")), "eps"),
        (lambda: NF.rms_norm(torch.ones(2, 3, dtype=torch.int64), (3,)), "floating"),
    ],
)
def test_bad_input_is_refused_clearly(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()
    with pytest.raises(Exception) as info:
        call()
    if "shape" in match:
        assert isinstance(info.value, normlab.NormShapeError)


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 5), (2, 5, 3), (2, 5, 2, 3, 2)])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm2d_matches_the_float64_reference(shape, eps):
    m = nnl.RMSNorm2d(5, eps=eps, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(_x((5,), center=1.0, seed=6))
    x = _x(shape, center=-2.0, seed=7).requires_grad_()
    y = m(x)
    dy = _x(shape, center=0.4, seed=8)
    y.backward(dy)
    ref_y, cache = R.rms_norm2d_forward(x.detach().numpy(), m.weight.detach().numpy(), eps)
    grads = R.rms_norm2d_backward(dy.numpy(), cache)
    torch.testing.assert_close(y.detach(), torch.from_numpy(ref_y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.from_numpy(grads["dx"]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        m.weight.grad, torch.from_numpy(grads["dweight"]), rtol=1e-10, atol=1e-12
    )


def test_rms_norm2d_is_rmsnorm_over_channels_and_keeps_channels_last():
    x = _x((2, 6, 5, 4), center=1.5, seed=9).float()
    w = _x((6,), center=1.0, seed=10).float()
    m = nnl.RMSNorm2d(6)
    with torch.no_grad():
        m.weight.copy_(w)
    twin = torch.nn.RMSNorm(6)
    with torch.no_grad():
        twin.weight.copy_(w)
    expected = twin(x.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(m(x), expected, rtol=2e-6, atol=2e-6)
    cl = x.to(memory_format=torch.channels_last)
    y = m(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 5, 3, 3))


def test_registry_name_builds_the_channel_form():
    layer = create_norm("rms", 8)
    assert isinstance(layer, nnl.RMSNorm2d) and layer.num_channels == 8
    assert repr(layer) == "RMSNorm2d(8, eps=None, affine=True)"
