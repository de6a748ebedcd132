"""BatchRenorm1d/2d/3d and batch_renorm against the float64 reference and BatchNorm."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import normlab.functional as NF
from _testing import assert_close, np64, numeric_grad, offcenter
from normlab import nn as nnl
from normlab import reference as R
from normlab.reference._common import standardize
from normlab.registry import create_norm

MODULES = {2: nnl.BatchRenorm1d, 3: nnl.BatchRenorm1d, 4: nnl.BatchRenorm2d, 5: nnl.BatchRenorm3d}
SHAPES = [(4, 3), (2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 2), (3, 3, 1, 1), (2, 3, 2, 3, 2)]
FIXED = dict(warmup_iters=0, r_max_rampup_iters=0, d_max_rampup_iters=0)


def running(c: int, seed: int = 0, spread: float = 1.0):
    """Running stats near the data (3 ± 2): r and d land on both sides of their clips."""
    g = torch.Generator().manual_seed(50 + seed)
    rm = 3.0 + spread * 2.0 * torch.randn(c, generator=g, dtype=torch.float64)
    rv = 4.0 * torch.exp(spread * 1.5 * torch.randn(c, generator=g, dtype=torch.float64))
    return rm, rv


def params(c: int, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    return (
        1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64),
        0.3 * torch.randn(c, generator=g, dtype=torch.float64),
    )


# ----------------------------------------------------------------------------- reference


def test_reference_gradient_holds_r_and_d_constant():
    rng = np.random.default_rng(0)
    x = 3.0 + 2.0 * rng.standard_normal((3, 4, 2, 2))
    w, b = 1.0 + 0.5 * rng.standard_normal(4), 0.3 * rng.standard_normal(4)
    rm, rv = 3.0 + 2.0 * rng.standard_normal(4), 4.0 * np.exp(rng.standard_normal(4))
    eps, r_max, d_max = 1e-3, 1.5, 0.5
    _, cache = R.batch_renorm_forward(
        x, w, b, running_mean=rm, running_var=rv, eps=eps, r_max=r_max, d_max=d_max
    )
    r0, d0 = cache["r"].copy(), cache["d"].copy()
    assert (r0 > 1 / r_max).any() and (r0 < r_max).any()  # some unclipped
    dy = rng.standard_normal(x.shape)

    def loss():  # the forward with r and d frozen at their values: the stopped gradient
        xb, _, _ = standardize(x, (0, 2, 3), eps)
        y = w.reshape(1, -1, 1, 1) * (xb * r0 + d0) + b.reshape(1, -1, 1, 1)
        return float((y * dy).sum())

    g = R.batch_renorm_backward(dy, cache)
    np.testing.assert_allclose(g["dx"], numeric_grad(loss, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g["dweight"], numeric_grad(loss, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g["dbias"], numeric_grad(loss, b), rtol=1e-6, atol=1e-6)


def test_reference_saturated_clips_match_plain_finite_differences():
    """With r and d both clipped the stop-gradient is the true gradient."""
    rng = np.random.default_rng(1)
    x = 3.0 + 2.0 * rng.standard_normal((3, 2, 3))
    w, b = 1.0 + 0.5 * rng.standard_normal(2), 0.3 * rng.standard_normal(2)
    kw = dict(running_mean=np.full(2, -100.0), running_var=np.full(2, 100.0), eps=1e-5)
    dy = rng.standard_normal(x.shape)

    def loss():
        return float((R.batch_renorm_forward(x, w, b, **kw)[0] * dy).sum())

    _, cache = R.batch_renorm_forward(x, w, b, **kw)
    assert np.allclose(cache["r"], 1 / 3) and np.allclose(cache["d"], 5.0)
    g = R.batch_renorm_backward(dy, cache)
    np.testing.assert_allclose(g["dx"], numeric_grad(loss, x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- torch vs reference


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("limits", [(3.0, 5.0), (1.2, 0.3), (1.0, 0.0)], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_training_matches_reference(shape, limits, affine):
    c = shape[1]
    r_max, d_max = limits
    m = MODULES[len(shape)](
        c, affine=affine, r_max=r_max, d_max=d_max, dtype=torch.float64, **FIXED
    )
    rm, rv = running(c, seed=len(shape))
    w, b = params(c)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        if affine:
            m.weight.copy_(w)
            m.bias.copy_(b)
    x = offcenter(*shape, seed=1).requires_grad_()
    y = m(x)
    dy = offcenter(*shape, seed=2, loc=0.0, scale=1.0)
    y.backward(dy)
    wn, bn = (w.numpy(), b.numpy()) if affine else (None, None)
    y_ref, cache = R.batch_renorm_forward(
        np64(x), wn, bn, running_mean=rm.numpy(), running_var=rv.numpy(), r_max=r_max, d_max=d_max
    )
    g = R.batch_renorm_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    if affine:
        assert_close(m.weight.grad, g["dweight"])
        assert_close(m.bias.grad, g["dbias"])
    new_rm, new_rv, nbt = R.batch_renorm_update_running(np64(x), rm.numpy(), rv.numpy())
    assert_close(m.running_mean, new_rm)
    assert_close(m.running_var, new_rv)
    assert int(m.num_batches_tracked) == nbt == 1
    # eval: the running statistics, like BatchNorm
    m.eval()
    x.grad = None
    y = m(x)
    y.backward(dy)
    y_ref, cache = R.batch_renorm_forward(
        np64(x), wn, bn, running_mean=new_rm, running_var=new_rv, training=False
    )
    assert_close(y, y_ref)
    assert_close(x.grad, R.batch_renorm_backward(np64(dy), cache)["dx"])
    assert int(m.num_batches_tracked) == 1


def test_functional_accepts_tensor_limits():
    x = offcenter(4, 3, 5, seed=3)
    rm, rv = running(3, spread=2.0)
    kw = dict(weight=None, bias=None, training=True, momentum=0.0, eps=1e-5)
    a = NF.batch_renorm(x, rm.clone(), rv.clone(), r_max=1.5, d_max=0.25, **kw)
    t = NF.batch_renorm(
        x, rm.clone(), rv.clone(), r_max=torch.tensor(1.5), d_max=torch.tensor(0.25), **kw
    )
    assert_close(a, t)
    y_ref, _ = R.batch_renorm_forward(
        np64(x), running_mean=rm.numpy(), running_var=rv.numpy(), r_max=1.5, d_max=0.25
    )
    assert_close(a, y_ref)


def test_gradcheck():
    x = offcenter(3, 2, 2, 2, seed=4).requires_grad_()
    w, b = (t.requires_grad_() for t in params(2))
    # Away from the clips the stop-gradient is not the derivative of the forward (an
    # unclipped r, d make y = (x - μ)/σ exactly); with both clipped it is.
    rm, rv = torch.full((2,), -100.0, dtype=torch.float64), torch.full((2,), 100.0)

    def f(x, w, b):  # momentum 0: the running stats, hence r and d, stay fixed
        return NF.batch_renorm(x, rm, rv, w, b, True, 0.0, 1e-5, 1.5, 0.5)

    assert torch.autograd.gradcheck(f, (x, w, b))


# ------------------------------------------------------------ the fused autograd.Function
#
# Training-mode NF.batch_renorm runs a hand-written autograd.Function
# (normlab.functional._brn_autograd) in eager mode and the plain autograd graph
# under torch.compile, torch.func, tracing and for a double backward.


def _fused(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__.startswith("BatchRenormFunction")


def _run(x, rm, rv, w, b, r_max, d_max, momentum=0.3):
    return NF.batch_renorm(x, rm, rv, w, b, True, momentum, 1e-5, r_max, d_max)


FUSED_SHAPES = [(5, 4), (3, 4, 7), (2, 4, 3, 5), (1, 4, 3, 3), (6, 4, 1, 1), (2, 4, 2, 3, 2)]


@pytest.fixture(params=["one-call", "centred"])
def backward_path(request, monkeypatch):
    """Both backward paths of the Function: torch's BN backward kernel on x (data whose
    mean is within 16 σ of 0) and the re-centred u = x − pivot (any data)."""
    if request.param == "centred":
        import normlab.functional._brn_autograd as fused

        monkeypatch.setattr(fused, "_ONE_CALL_LIMIT", 0.0)
    return request.param


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("limits", [(1.3, 0.4), (1.0, 0.0), (50.0, 50.0)], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_function_matches_reference_on_fresh_data(shape, limits, affine, backward_path):
    """r and d clipped in some channels and not in others, or never (wide limits)."""
    seed = 7 + sum(shape) + 3 * affine + int(10 * limits[0])  # fresh data for each case
    c = shape[1]
    x = offcenter(*shape, seed=seed).requires_grad_()
    rm, rv = running(c, seed=seed, spread=1.5)
    w, b = (t.requires_grad_() for t in params(c, seed)) if affine else (None, None)
    rm0, rv0 = rm.clone(), rv.clone()
    y = _run(x, rm, rv, w, b, *limits)
    assert _fused(y)
    wn, bn = (np64(w), np64(b)) if affine else (None, None)
    y_ref, cache = R.batch_renorm_forward(
        np64(x), wn, bn, running_mean=np64(rm0), running_var=np64(rv0),
        r_max=limits[0], d_max=limits[1],
    )  # fmt: skip
    assert_close(y, y_ref)
    dy = offcenter(*shape, seed=seed + 10, loc=0.5, scale=1.0)
    leaves = [x] + ([w, b] if affine else [])
    grads = torch.autograd.grad(y, leaves, dy)
    g = R.batch_renorm_backward(np64(dy), cache)
    for key, got in zip(("dx", "dweight", "dbias"), grads, strict=False):
        assert_close(got, g[key], msg=key)
    new_rm, new_rv, _ = R.batch_renorm_update_running(np64(x), np64(rm0), np64(rv0), momentum=0.3)
    assert_close(rm, new_rm)
    assert_close(rv, new_rv)


def test_reference_cases_do_clip_some_channels_and_not_others():
    """The table above exercises both sides of each clip (else it would not test them)."""
    rs, ds = [], []
    for shape in FUSED_SHAPES:
        for affine in (True, False):
            seed = 7 + sum(shape) + 3 * affine + 13  # as in the table, limits (1.3, 0.4)
            rm, rv = running(shape[1], seed=seed, spread=1.5)
            _, cache = R.batch_renorm_forward(
                np64(offcenter(*shape, seed=seed)), running_mean=np64(rm),
                running_var=np64(rv), r_max=1.3, d_max=0.4,
            )  # fmt: skip
            rs.append(np.abs(np.log(cache["r"].reshape(-1))))
            ds.append(np.abs(cache["d"].reshape(-1)))
    r, d = np.concatenate(rs), np.concatenate(ds)
    assert (r < np.log(1.3) - 1e-9).sum() >= 3 and np.isclose(r, np.log(1.3)).sum() >= 3
    assert (d < 0.4 - 1e-9).sum() >= 3 and np.isclose(d, 0.4).sum() >= 3


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_fused_function_equals_plain_autograd_path(shape):
    from normlab.functional.batch_renorm import _batch_renorm_autograd

    c = shape[1]
    outs = []
    for fused in (True, False):
        x = offcenter(*shape, seed=9).requires_grad_()
        rm, rv = running(c, seed=9, spread=1.5)
        w, b = (t.requires_grad_() for t in params(c, 9))
        if fused:
            y = _run(x, rm, rv, w, b, 1.3, 0.4, momentum=0.1)
        else:
            y = _batch_renorm_autograd(x, rm, rv, w, b, 0.1, 1e-5, 1.3, 0.4, None)
        assert _fused(y) == fused
        dy = offcenter(*shape, seed=10, loc=0.0, scale=1.0)
        outs.append([y, *torch.autograd.grad(y, (x, w, b), dy), rm, rv])
    for a, e in zip(*outs, strict=True):
        assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 4), (2, 2, 2, 1, 2)], ids=str)
def test_gradcheck_fused_function_with_saturated_clips(shape):
    """With r and d clipped (running statistics far away) the stopped gradient is exact."""
    c = shape[1]
    x = offcenter(*shape, seed=11).requires_grad_()
    w, b = (t.requires_grad_() for t in params(c, 11))
    rm, rv = torch.full((c,), -100.0, dtype=torch.float64), torch.full((c,), 100.0)

    def f(x, w, b):
        y = NF.batch_renorm(x, rm, rv, w, b, True, 0.0, 1e-5, 1.5, 0.5)
        assert _fused(y)
        return y

    assert torch.autograd.gradcheck(f, (x, w, b))
    if x.dim() == 2:  # double backward differentiates the plain graph (recompute): once is enough
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("cls,shape", [(nnl.BatchRenorm2d, (3, 4, 5, 3)),
                                       (nnl.BatchRenorm3d, (2, 4, 3, 2, 3))])  # fmt: skip
def test_fused_module_channels_last_momentum_none_matches_reference(cls, shape):
    """Module path, channels_last input, cumulative running averages, clipped r and d."""
    c = shape[1]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    m = cls(c, momentum=None, r_max=1.2, d_max=0.3, dtype=torch.float64, **FIXED)
    rm, rv = running(c, seed=21, spread=1.5)
    w, b = params(c, seed=21)
    with torch.no_grad():
        for name, t in (("running_mean", rm), ("running_var", rv), ("weight", w), ("bias", b)):
            getattr(m, name).copy_(t)
    rm, rv = rm.numpy(), rv.numpy()
    for step in range(3):
        x = offcenter(*shape, seed=22 + step).contiguous(memory_format=fmt).requires_grad_()
        y = m(x)
        assert _fused(y) and y.is_contiguous(memory_format=fmt)
        y_ref, cache = R.batch_renorm_forward(
            np64(x), w.numpy(), b.numpy(), running_mean=rm, running_var=rv, r_max=1.2, d_max=0.3
        )
        assert_close(y, y_ref)
        dy = offcenter(*shape, seed=30 + step, loc=0.0, scale=1.0)
        grads = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
        ref = R.batch_renorm_backward(np64(dy), cache)
        for key, g in zip(("dx", "dweight", "dbias"), grads, strict=True):
            assert_close(g, ref[key], msg=key)
        rm, rv, _ = R.batch_renorm_update_running(
            np64(x), rm, rv, momentum=None, num_batches_tracked=step
        )
        assert_close(m.running_mean, rm)
        assert_close(m.running_var, rv)


def _saved_bytes(fn) -> tuple[int, int]:
    """(total bytes, largest tensor) that autograd saves for backward while running ``fn``."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_the_input_and_per_channel_vectors(dtype):
    from normlab.functional.batch_renorm import _batch_renorm_autograd

    c = 8
    m = nnl.BatchRenorm2d(c, r_max=2.0, d_max=1.0, **FIXED)
    x = offcenter(4, c, 16, 16, seed=12, dtype=dtype).requires_grad_()
    total, largest = _saved_bytes(lambda: m(x))
    assert largest == x.numel() * x.element_size()  # x itself, no fp32 copy, no y or x̂
    assert total - largest <= 10 * c * 4 + 64 * 8
    args = (m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias, 0.1, 1e-5, 2.0, 1.0)
    plain, _ = _saved_bytes(lambda: _batch_renorm_autograd(x, *args, None))
    assert plain > 2 * x.numel() * x.element_size()  # the plain graph: this test tells them apart


def test_fused_backward_accurate_on_ct_like_data():
    """fp32 data of mean 1e4, std 1e-2: gradients keep fp32 accuracy (pivot shift)."""
    shape, c = (4, 3, 5, 5), 3
    x64 = offcenter(*shape, seed=13, loc=1e4, scale=1e-2).float().double()
    dy = offcenter(*shape, seed=14, loc=0.0, scale=1.0)
    rm64 = torch.tensor([1e4, 1e4 + 0.005, 1e4 - 0.02]).double()  # exact in fp32
    rv64 = torch.tensor([1e-4, 4e-4, 0.5e-4]).float().double()
    results = []
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        w, b = (t.to(dtype).requires_grad_() for t in params(c, 13))
        y = NF.batch_renorm(x, rm64.to(dtype), rv64.to(dtype), w, b, True, 0.1, 1e-8, 1.5, 0.5)
        results.append([y, *torch.autograd.grad(y, (x, w, b), dy.to(dtype))])
    for a, e in zip(*results, strict=True):
        assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.detach().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_fused_gradients(dtype):
    c = 4
    x_half = offcenter(4, c, 5, 3, dtype=dtype, seed=15)
    dy = offcenter(4, c, 5, 3, seed=16, loc=0.0, scale=1.0, dtype=dtype)
    outs = []
    for x in (x_half, x_half.double()):
        x = x.detach().requires_grad_()
        w, b = (t.to(torch.float32 if x.dtype != torch.float64 else x.dtype) for t in params(c, 15))
        w.requires_grad_()
        rm, rv = (t.to(w.dtype) for t in running(c, seed=15))
        y = NF.batch_renorm(x, rm, rv, w, b, True, 0.1, 1e-5, 1.5, 0.5)
        assert y.dtype == x.dtype
        outs.append([y, *torch.autograd.grad(y, (x, w), dy.to(x.dtype))])
    for a, e in zip(*outs, strict=True):
        assert_close(a, e, dtype, atol=2e-2 * max(1.0, float(e.detach().abs().max())))


@pytest.mark.parametrize("path", ["one-call", "centred"])
def test_a_wrong_backward_is_caught(monkeypatch, path):
    """The reference comparison can fail: a backward that drops BN's mean term −A·Σdy/n."""
    import normlab.functional._brn_autograd as fused

    if path == "centred":
        monkeypatch.setattr(fused, "_ONE_CALL_LIMIT", 0.0)
    real = fused.BatchRenormFunction.backward

    def wrong(ctx, dy):
        dx, *rest = real(ctx, dy)
        x, weight, *_ = ctx.saved_tensors
        sigma_b, r = ctx.saved_tensors[-4], ctx.saved_tensors[-3]
        a = r * weight / sigma_b
        shape = [1, -1] + [1] * (dy.dim() - 2)
        mean_dy = dy.sum([d for d in range(dy.dim()) if d != 1]) / ctx.count
        return (dx + (a.reshape(-1) * mean_dy).reshape(shape), *rest)

    monkeypatch.setattr(fused.BatchRenormFunction, "backward", staticmethod(wrong))
    with pytest.raises(AssertionError, match="dx"):
        test_fused_function_matches_reference_on_fresh_data((2, 4, 3, 5), (1.3, 0.4), True, path)


# ------------------------------------------------------------------ equals BatchNorm


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("schedule", ["limits_1_0", "warmup"])
def test_plain_limits_equal_batchnorm_over_steps(momentum, schedule):
    """r_max = 1, d_max = 0 (explicitly, or during the warm-up) is BatchNorm, step by step."""
    if schedule == "limits_1_0":
        brn = nnl.BatchRenorm2d(5, momentum=momentum, r_max=1.0, d_max=0.0, **FIXED)
    else:
        brn = nnl.BatchRenorm2d(5, momentum=momentum)  # paper's defaults: 5k steps of BN
    bn = nn.BatchNorm2d(5, momentum=momentum)
    ours = nnl.BatchNorm2d(5, momentum=momentum)
    for layer in (brn, bn, ours):
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-0.2, 0.2, 5))
    for step in range(4):
        x = offcenter(3, 5, 4, 3, dtype=torch.float32, seed=10 + step)
        outs = []
        for layer in (brn, bn, ours):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        for other in outs[1:]:
            for a, e in zip(outs[0], other, strict=True):
                assert_close(a, e, torch.float32)
        for other in (bn, ours):
            assert_close(brn.running_mean, other.running_mean, torch.float32)
            assert_close(brn.running_var, other.running_var, torch.float32)
        assert int(brn.num_batches_tracked) == step + 1
    brn.eval()
    bn.eval()
    x = offcenter(2, 5, 3, 3, dtype=torch.float32, seed=20)
    assert_close(brn(x), bn(x), torch.float32)


# --------------------------------------------------------------------------- schedule


def test_schedule_values_paper_defaults():
    def at(step):
        r, d = NF.batch_renorm_limits(step)
        return float(r), float(d)

    assert at(0) == (1.0, 0.0)
    assert at(4999) == (1.0, 0.0)
    assert at(5000) == (1.0, 0.0)
    assert at(15000) == pytest.approx((1.0 + 2.0 * 10000 / 35000, 2.5))
    assert at(25000) == pytest.approx((1.0 + 2.0 * 20000 / 35000, 5.0))
    assert at(40000) == pytest.approx((3.0, 5.0))
    assert at(10**6) == pytest.approx((3.0, 5.0))
    r, d = NF.batch_renorm_limits(torch.tensor(15000))
    assert r.dim() == 0 and d.dim() == 0 and r.dtype == torch.float64


def test_module_schedule_driven_by_num_batches_tracked():
    m = nnl.BatchRenorm1d(
        2, r_max=2.0, d_max=1.0, warmup_iters=2, r_max_rampup_iters=4, d_max_rampup_iters=2
    )
    expected_r = [1.0, 1.0, 1.0, 1.25, 1.5, 1.75, 2.0, 2.0]
    expected_d = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    for step in range(8):
        r, d = m.renorm_limits()
        assert (float(r), float(d)) == pytest.approx((expected_r[step], expected_d[step]))
        m(offcenter(4, 2, dtype=torch.float32, seed=step))
    assert int(m.num_batches_tracked) == 8
    m.eval()
    m(offcenter(4, 2, dtype=torch.float32))
    assert int(m.num_batches_tracked) == 8


def test_zero_rampup_jumps_after_warmup():
    r, d = NF.batch_renorm_limits(3, 3.0, 5.0, 3, 0, 0)
    assert (float(r), float(d)) == (3.0, 5.0)
    r, d = NF.batch_renorm_limits(2, 3.0, 5.0, 3, 0, 0)
    assert (float(r), float(d)) == (1.0, 0.0)


# ------------------------------------------------------------------------- numerics


def test_off_center_fp32_accuracy():
    """Data of mean 1e4 and std 1e-2: fp32 must stay at fp32 accuracy."""
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)).float()
    rm = torch.tensor([1e4, 1e4 + 0.005, 1e4 - 0.02])
    rv = torch.tensor([1e-4, 4e-4, 0.5e-4])
    m = nnl.BatchRenorm2d(3, eps=1e-8, **FIXED)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    y = m(x)
    y_ref, _ = R.batch_renorm_forward(
        np64(x),
        np64(m.weight),
        np64(m.bias),
        running_mean=np64(rm),
        running_var=np64(rv),
        eps=1e-8,
    )
    assert_close(y, y_ref, torch.float32)
    new_rm, new_rv, _ = R.batch_renorm_update_running(np64(x), np64(rm), np64(rv))
    assert_close(m.running_var, new_rv, torch.float32, atol=1e-9)
    assert_close(m.running_mean, new_rm, torch.float32, atol=2e-3)  # 1 ulp at 1e4


def test_channels_last_same_values():
    m = nnl.BatchRenorm2d(6, r_max=2.0, d_max=1.0, **FIXED)
    m2 = copy.deepcopy(m)
    x = offcenter(3, 6, 4, 5, dtype=torch.float32, seed=5)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, yl = m(x), m2(xl)
    assert_close(yl, y, torch.float32)
    y.sum().backward()
    yl.sum().backward()
    assert_close(xl.grad, x.grad, torch.float32)
    assert_close(m2.running_var, m.running_var, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_within_tolerance(dtype):
    m = nnl.BatchRenorm2d(4, r_max=2.0, d_max=1.0, **FIXED)
    x = offcenter(4, 4, 5, 3, dtype=dtype, seed=6)
    y = m(x)
    assert y.dtype == dtype and m.running_var.dtype == torch.float32
    y_ref, _ = R.batch_renorm_forward(
        np64(x),
        np64(m.weight),
        np64(m.bias),
        running_mean=np.zeros(4),
        running_var=np.ones(4),
        r_max=2.0,
        d_max=1.0,
    )
    assert_close(y, y_ref, dtype)


# ------------------------------------------------------------------------------ state


def test_state_dict_deepcopy_save_load_resume():
    m = nnl.BatchRenorm2d(3, warmup_iters=1, r_max_rampup_iters=3, d_max_rampup_iters=3)
    for step in range(3):
        m(offcenter(4, 3, 3, 3, dtype=torch.float32, seed=step))
    assert set(m.state_dict()) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = nnl.BatchRenorm2d(3, warmup_iters=1, r_max_rampup_iters=3, d_max_rampup_iters=3)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    clone = copy.deepcopy(m)
    x = offcenter(4, 3, 3, 3, dtype=torch.float32, seed=9)
    y = m(x)
    for other in (loaded, clone):
        assert torch.equal(other(x), y)
        assert torch.equal(other.running_var, m.running_var)
        assert int(other.num_batches_tracked) == 4


def test_registry_builds_brn():
    assert isinstance(create_norm("brn", 8), nnl.BatchRenorm2d)


# -------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    m = nnl.BatchRenorm2d(4)
    with pytest.raises(ValueError, match=r"BatchRenorm2d.*4-D.*\(2, 4, 5\)"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"BatchRenorm2d.*3 channels.*num_features=4"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match=r"BatchRenorm2d.*floating"):
        m(torch.ones(2, 4, 5, 5, dtype=torch.int32))
    with pytest.raises(
        ValueError, match=r"BatchRenorm2d.*more than 1 value per channel.*GroupNorm"
    ):
        m(torch.randn(1, 4, 1, 1))
    assert int(m.num_batches_tracked) == 0  # refused before any state moved
    m.eval()
    assert torch.isfinite(m(torch.randn(1, 4, 1, 1))).all()  # eval at batch 1 is fine
    with pytest.raises(ValueError, match=r"BatchRenorm1d: eps must be > 0"):
        nnl.BatchRenorm1d(4, eps=0.0)
    with pytest.raises(ValueError, match=r"r_max must be >= 1"):
        nnl.BatchRenorm1d(4, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be >= 0"):
        nnl.BatchRenorm1d(4, d_max=-1.0)
    with pytest.raises(ValueError, match=r"warmup_iters must be >= 0"):
        nnl.BatchRenorm1d(4, warmup_iters=-1)
    x, rm, rv = torch.randn(3, 4), torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"batch_renorm: r_max must be >= 1"):
        NF.batch_renorm(x, rm, rv, training=True, r_max=torch.tensor(0.9))
    with pytest.raises(ValueError, match=r"batch_renorm: running_mean and running_var"):
        NF.batch_renorm(x, None, None, training=True)
    with pytest.raises(ValueError, match=r"batch_renorm: eps must be > 0"):
        NF.batch_renorm(x, rm, rv, training=True, eps=-1.0)


# --------------------------------------------------------------------------- training


def test_short_training_drives_loss_down():
    """A tiny CNN whose norms go through warm-up, ramp and full renormalization."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = 1.0 + torch.randn(32, 3, 6, 6, generator=g)
        target = torch.randint(0, 4, (32,), generator=g)
        sched = dict(warmup_iters=20, r_max_rampup_iters=50, d_max_rampup_iters=30)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nnl.BatchRenorm2d(8, **sched),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nnl.BatchRenorm2d(8, **sched),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        losses = []
        for step in range(200):  # two batches of 16: the norms see changing batches
            xb, tb = x[(step % 2) * 16 :][:16], target[(step % 2) * 16 :][:16]
            loss = nn.functional.cross_entropy(model(xb), tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            final = nn.functional.cross_entropy(model(x), target).item()
            model.train()
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(losses))
    first = float(np.mean(losses[:2]))
    assert final < 0.1 * first, (first, final)  # in eval mode, with the running statistics
