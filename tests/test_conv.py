"""CenteredConv2d, WSConv2d and the weight transforms against the float64 reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
import normlab.nn as nnl
from _testing import assert_close, np64, offcenter
from normlab import reference as R

CONFIGS = [
    # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode
    (3, 5, 3, 1, 1, 1, 1, True, "zeros"),
    (4, 6, (3, 1), (2, 1), (1, 0), 1, 2, False, "zeros"),
    (4, 4, 3, 1, "same", 2, 4, True, "zeros"),  # depthwise, dilated
    (2, 3, (2, 3), 2, 1, 1, 1, True, "reflect"),
    (3, 2, 1, 1, 0, 1, 1, False, "zeros"),  # 1x1: one weight per (o, i)
    (2, 4, 3, 1, 1, 1, 2, True, "circular"),
]

CONV_CLASSES = [
    (nnl.CenteredConv2d, lambda w, conv: NF.centered_weight(w)),
    (nnl.WSConv2d, lambda w, conv: NF.standardized_weight(w, conv.eps)),
]


def _build(cls, cfg, dtype=torch.float64, **kw):
    cin, cout, k, s, p, d, g, b, mode = cfg
    return cls(cin, cout, k, s, p, d, g, b, mode, dtype=dtype, **kw)


def _expected_weight_np(cls, w, eps=1e-5):
    w = np64(w)
    axes = tuple(range(1, w.ndim))
    mean = w.mean(axis=axes, keepdims=True)
    if cls is nnl.CenteredConv2d:
        return w - mean
    var = ((w - mean) ** 2).mean(axis=axes, keepdims=True)
    return (w - mean) / (var + eps) ** 0.5


@pytest.mark.parametrize("cls,transform", CONV_CLASSES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_conv_matches_plain_conv_with_transformed_weight(cls, transform, cfg):
    conv = _build(cls, cfg)
    plain = _build(torch.nn.Conv2d, cfg)
    with torch.no_grad():
        conv.weight.mul_(2.0).add_(0.5)  # off-center filters
        plain.weight.copy_(torch.from_numpy(_expected_weight_np(cls, conv.weight)))
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    x = offcenter(2, cfg[0], 7, 6, seed=1)
    assert_close(conv(x), plain(x))
    if cfg[8] == "zeros":
        w = transform(conv.weight, conv)
        expected = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert_close(conv(x), expected)


@pytest.mark.parametrize("cls,transform", CONV_CLASSES)
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3]])
def test_conv_gradcheck(cls, transform, cfg):
    # The weight path is ours; the input path is torch's conv, checked once on a tiny x.
    conv = _build(cls, cfg)
    x = offcenter(1, cfg[0], 4, 3, seed=2).requires_grad_()
    params = [p for p in (conv.weight, conv.bias) if p is not None]

    def f(*ps):
        w, b = ps[0], ps[1] if len(ps) > 1 else None
        return conv._conv_forward(x, transform(w, conv), b)

    assert torch.autograd.gradcheck(f, tuple(params))
    # The module's forward gives the gradient of that composition.
    conv(x).square().sum().backward()
    grads = torch.autograd.grad(f(*params).square().sum(), params)
    assert_close(conv.weight.grad, grads[0])
    assert torch.autograd.gradcheck(lambda x: conv(x), (x,))


@pytest.mark.parametrize(
    "shape", [(5, 3, 3, 3), (4, 1, 1, 1), (6, 2, 5, 1), (3, 4), (2, 3, 2, 2, 2)]
)
def test_weight_transforms_match_reference(shape):
    w = offcenter(*shape, seed=3, loc=0.2, scale=0.1).requires_grad_()
    dw_hat = offcenter(*shape, seed=4)
    wc = NF.centered_weight(w)
    ref, cache = R.centered_weight_forward(np64(w))
    assert_close(wc, ref)
    (gc,) = torch.autograd.grad(wc, w, dw_hat)
    assert_close(gc, R.centered_weight_backward(np64(dw_hat), cache)["dweight"])
    ws = NF.standardized_weight(w, 1e-3)
    ref, cache = R.standardized_weight_forward(np64(w), 1e-3)
    assert_close(ws, ref)
    (gs,) = torch.autograd.grad(ws, w, dw_hat)
    assert_close(gs, R.standardized_weight_backward(np64(dw_hat), cache)["dweight"])


def test_weight_transform_gradcheck():
    w = offcenter(3, 2, 2, 2, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(NF.centered_weight, (w,))
    assert torch.autograd.gradcheck(lambda w: NF.standardized_weight(w, 1e-4), (w,))


def test_transformed_filters_have_zero_mean_unit_variance():
    w = offcenter(8, 4, 3, 3, seed=6, loc=100.0, scale=0.01, dtype=torch.float32)
    wc = NF.centered_weight(w)
    ws = NF.standardized_weight(w, 1e-12)
    ref_c, _ = R.centered_weight_forward(np64(w))
    assert_close(wc, ref_c, torch.float32)  # off-center: the pivot keeps the digits
    assert wc.sum(dim=(1, 2, 3)).abs().max() < 1e-4
    torch.testing.assert_close(
        ws.var(dim=(1, 2, 3), unbiased=False), torch.ones(8), rtol=1e-4, atol=1e-4
    )
    assert wc.dtype == ws.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights(dtype):
    w = offcenter(6, 3, 3, 3, seed=7, dtype=dtype)
    for fn in (NF.centered_weight, lambda w: NF.standardized_weight(w, 1e-5)):
        out = fn(w)
        assert out.dtype == dtype
        assert_close(out, fn(w.double()), dtype)


@pytest.mark.parametrize("cls", [nnl.CenteredConv2d, nnl.WSConv2d])
def test_plain_conv2d_state_dict_loads_and_init_matches(cls):
    torch.manual_seed(0)
    ours = cls(4, 6, 3, padding=1, groups=2)
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert torch.equal(ours.weight, plain.weight) and torch.equal(ours.bias, plain.bias)
    fresh = cls(4, 6, 3, padding=1, groups=2)
    fresh.load_state_dict(plain.state_dict())  # strict
    assert set(fresh.state_dict()) == {"weight", "bias"}
    assert torch.equal(fresh.weight, plain.weight)
    assert isinstance(ours, torch.nn.Conv2d)


def test_centered_conv_equals_conv_when_filters_already_centered():
    plain = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.sub_(plain.weight.mean(dim=(1, 2, 3), keepdim=True))
    ours = nnl.CenteredConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    ours.load_state_dict(plain.state_dict())
    x = offcenter(2, 3, 5, 5, seed=8)
    assert_close(ours(x), plain(x))


def test_deepcopy_save_and_repr():
    conv = nnl.WSConv2d(3, 4, 3, eps=1e-4)
    assert "eps=0.0001" in repr(conv)
    clone = copy.deepcopy(conv)
    assert clone.eps == 1e-4 and torch.equal(clone.weight, conv.weight)
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    other = nnl.WSConv2d(3, 4, 3, eps=1e-4)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(other(x), conv(x))


def test_bad_input():
    with pytest.raises(ValueError, match="WSConv2d: eps must be > 0"):
        nnl.WSConv2d(3, 4, 3, eps=0.0)
    with pytest.raises(ValueError, match=r"standardized_weight: eps must be > 0"):
        NF.standardized_weight(torch.randn(2, 3, 3, 3), eps=-1.0)
    with pytest.raises(TypeError, match=r"centered_weight.*floating-point"):
        NF.centered_weight(torch.ones(2, 3, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"at least 2 dims.*\(5,\)"):
        NF.centered_weight(torch.randn(5))
    with pytest.raises(RuntimeError):  # nn.Conv2d's own channel check
        nnl.CenteredConv2d(3, 4, 3)(torch.randn(1, 2, 5, 5))
