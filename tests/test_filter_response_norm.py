"""FilterResponseNorm1d/2d/3d, TLU and frn_tlu against the float64 reference."""

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
from normlab.registry import create_norm

SHAPES = [(2, 3, 5), (2, 3, 4, 5), (1, 3, 1, 1), (2, 3, 2, 3, 2), (3, 5, 7, 3)]
MODULES = {3: nnl.FilterResponseNorm1d, 4: nnl.FilterResponseNorm2d, 5: nnl.FilterResponseNorm3d}


def params(c: int, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    w = 1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    return w, b


def median_tau(x, w, b, eps):
    """A per-channel τ at the median of the FRN output: both TLU branches are used."""
    z, _ = R.filter_response_norm_forward(np64(x), np64(w), np64(b), eps=eps)
    return torch.from_numpy(midpoint_median(z))


def midpoint_median(z: np.ndarray) -> np.ndarray:
    """Per channel, halfway between two middle values: a threshold that no element ties."""
    per_channel = np.sort(np.moveaxis(z, 1, 0).reshape(z.shape[1], -1), axis=1)
    k = per_channel.shape[1] // 2
    if per_channel.shape[1] == 1:
        return per_channel[:, 0] - 0.5
    return 0.5 * (per_channel[:, k - 1] + per_channel[:, k])


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("with_tau", [False, True])
@pytest.mark.parametrize("eps", [1e-3, -0.5])
def test_reference_matches_finite_differences(with_tau, eps):
    rng = np.random.default_rng(0)
    x = 3.0 + 2.0 * rng.standard_normal((2, 3, 2, 3))
    x[0, 1] = 0.01 * rng.standard_normal((2, 3))  # a small-ν² channel: eps matters
    w = 1.0 + 0.5 * rng.standard_normal(3)
    b = 0.3 * rng.standard_normal(3)
    z, _ = R.filter_response_norm_forward(x, w, b, eps=eps)
    tau = midpoint_median(z) if with_tau else None
    r = rng.standard_normal(x.shape)
    e = np.array([eps])

    def loss():
        y, _ = R.filter_response_norm_forward(x, w, b, eps=float(e[0]), tau=tau)
        return float((y * r).sum())

    _, cache = R.filter_response_norm_forward(x, w, b, eps=eps, tau=tau)
    g = R.filter_response_norm_backward(r, cache)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g["dx"], numeric_grad(loss, x), **tol)
    np.testing.assert_allclose(g["dweight"], numeric_grad(loss, w), **tol)
    np.testing.assert_allclose(g["dbias"], numeric_grad(loss, b), **tol)
    np.testing.assert_allclose(g["deps"], numeric_grad(loss, e)[0], **tol)
    if with_tau:
        np.testing.assert_allclose(g["dtau"], numeric_grad(loss, tau), **tol)
    else:
        assert g["dtau"] is None


def test_reference_tlu_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5))
    tau = 0.2 * rng.standard_normal(4)
    r = rng.standard_normal(x.shape)

    def loss():
        return float((R.tlu_forward(x, tau)[0] * r).sum())

    g = R.tlu_backward(r, R.tlu_forward(x, tau)[1])
    np.testing.assert_allclose(g["dx"], numeric_grad(loss, x), atol=1e-6)
    np.testing.assert_allclose(g["dtau"], numeric_grad(loss, tau), atol=1e-6)


# ------------------------------------------------------------------- torch vs reference


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["frn", "frn_tlu", "no_affine"])
def test_functional_matches_reference(shape, mode):
    c = shape[1]
    x = offcenter(*shape, seed=1).requires_grad_()
    w, b = params(c)
    if mode == "no_affine":
        w = b = None
    eps_value = 1e-3
    tau = median_tau(x, w, b, eps_value) if mode == "frn_tlu" else None
    leaves = [t for t in (w, b, tau) if t is not None]
    for t in leaves:
        t.requires_grad_()
    eps = torch.tensor(eps_value, dtype=torch.float64, requires_grad=True)
    if tau is None:
        y = NF.filter_response_norm(x, w, b, eps)
    else:
        y = NF.frn_tlu(x, w, b, tau, eps)
    dy = offcenter(*shape, seed=2, loc=0.0, scale=1.0)
    y.backward(dy)
    y_ref, cache = R.filter_response_norm_forward(
        np64(x), np64(w), np64(b), eps=eps_value, tau=np64(tau)
    )
    g = R.filter_response_norm_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    assert_close(eps.grad, g["deps"])
    if w is not None:
        assert_close(w.grad, g["dweight"])
        assert_close(b.grad, g["dbias"])
    if tau is not None:
        assert_close(tau.grad, g["dtau"])


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)], ids=str)
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_module_matches_reference(shape, learnable_eps):
    c = shape[1]
    m = MODULES[len(shape)](c, learnable_eps=learnable_eps, dtype=torch.float64)
    w, b = params(c, seed=3)
    x = offcenter(*shape, seed=4).requires_grad_()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        m.tau.copy_(median_tau(x, w, b, 1e-4))
        if learnable_eps:
            m.eps.fill_(-2e-3)  # ε = floor + |ε_l|: the sign of ε_l is free
    eps_eff = (1e-6 + 2e-3) if learnable_eps else 1e-6
    y = m(x)
    dy = offcenter(*shape, seed=5, loc=0.0, scale=1.0)
    y.backward(dy)
    y_ref, cache = R.filter_response_norm_forward(
        np64(x), w.numpy(), b.numpy(), eps=eps_eff, tau=np64(m.tau)
    )
    g = R.filter_response_norm_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    assert_close(m.weight.grad, g["dweight"])
    assert_close(m.bias.grad, g["dbias"])
    assert_close(m.tau.grad, g["dtau"])
    if learnable_eps:
        assert_close(m.eps.grad, -g["deps"])  # d|ε_l|/dε_l = sign(ε_l) = -1
    else:
        assert m.eps.grad is None and not m.eps.requires_grad
    m.eval()
    assert_close(m(x), y_ref)  # no batch statistics: eval == train


def test_fused_equals_composition():
    x = offcenter(2, 4, 3, 5, seed=6)
    w, b = params(4)
    tau = torch.tensor([-0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    fused = NF.frn_tlu(x, w, b, tau, 1e-5)
    composed = NF.tlu(NF.filter_response_norm(x, w, b, 1e-5), tau)
    assert_close(fused, composed)


def test_gradcheck():
    x = offcenter(2, 3, 3, 2, seed=7).requires_grad_()
    w, b = (t.requires_grad_() for t in params(3))
    tau = median_tau(x, w, b, 1e-2).requires_grad_()
    eps = torch.tensor(1e-2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NF.frn_tlu, (x, w, b, tau, eps))
    assert torch.autograd.gradcheck(NF.filter_response_norm, (x, w, b, eps))


# ------------------------------------------------------------------------ special cases


@pytest.mark.parametrize("spatial", [(1, 1), (3, 4)])
def test_constant_per_channel_input(spatial):
    consts = torch.tensor([[2.5, -0.75, 1e-3], [-4.0, 0.5, 3.0]], dtype=torch.float64)
    x = consts[:, :, None, None].expand(2, 3, *spatial).contiguous()
    w = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    eps = 1e-4
    y = NF.filter_response_norm(x, w, b, eps)
    c = consts[:, :, None, None]
    expected = torch.sign(c) * w.view(3, 1, 1) * c.abs() / torch.sqrt(c * c + eps)
    expected = expected + b.view(3, 1, 1)
    assert_close(y, expected.expand_as(y))


def test_tlu_gradient_only_above_threshold():
    tau = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor(
        [[[-1.0, 0.0, 2.0], [0.5, 0.4, 0.6], [-1.0, -2.0, 3.0]]], dtype=torch.float64
    ).requires_grad_()
    y = NF.tlu(x, tau)
    dy = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(1, 3, 3)
    y.backward(dy)
    above = x.detach() > tau.detach().view(1, 3, 1)
    assert torch.equal(y.detach(), torch.where(above, x.detach(), tau.detach().view(1, 3, 1)))
    assert torch.equal(x.grad, torch.where(above, dy, torch.zeros_like(dy)))
    # ties (x == τ) send the whole gradient to τ
    assert torch.equal(tau.grad, torch.where(above, 0.0, dy).sum(dim=(0, 2)))
    assert tau.grad.tolist() == [1.0 + 2.0, 4.0 + 5.0, 7.0 + 8.0]
    g = R.tlu_backward(np64(dy), R.tlu_forward(np64(x), np64(tau))[1])
    assert_close(x.grad, g["dx"])
    assert_close(tau.grad, g["dtau"])


def test_tlu_module_is_relu_at_init_and_learns_tau():
    act = nnl.TLU(4)
    x = offcenter(2, 4, 3, seed=8, loc=0.0)
    assert torch.equal(act(x), torch.relu(x))
    assert act.tau.shape == (4,) and bool((act.tau == 0).all())
    act(x).sum().backward()
    assert_close(act.tau.grad, (x <= 0).sum(dim=(0, 2)).double())


def test_fresh_module_initialisation():
    m = nnl.FilterResponseNorm2d(5)
    assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())
    assert bool((m.tau == 0).all())
    assert "eps" in dict(m.named_buffers()) and float(m.eps) == pytest.approx(1e-6)
    learn = nnl.FilterResponseNorm2d(5, learnable_eps=True)
    assert "eps" in dict(learn.named_parameters())
    assert float(learn.eps.detach()) == pytest.approx(1e-4)
    assert float(learn.effective_eps().detach()) == pytest.approx(1e-6 + 1e-4)
    plain = nnl.FilterResponseNorm2d(5, tlu=False, affine=False)
    assert plain.tau is None and plain.weight is None and plain.bias is None
    assert set(plain.state_dict()) == {"eps"}
    x = offcenter(2, 5, 3, 3, seed=9)
    assert_close(plain(x), NF.filter_response_norm(x, eps=1e-6), torch.float32)


def test_channels_last_same_values():
    m = nnl.FilterResponseNorm2d(6)
    with torch.no_grad():
        m.tau.fill_(0.5)
    x = offcenter(2, 6, 5, 3, dtype=torch.float32, seed=10)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, yl = m(x), m(xl)
    assert_close(yl, y, torch.float32)
    y.sum().backward()
    yl.sum().backward()
    assert_close(xl.grad, x.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_tolerance(dtype):
    x64 = offcenter(2, 4, 6, 5, seed=11)
    w, b = params(4)
    tau = torch.full((4,), 0.2, dtype=torch.float64)
    x = x64.to(dtype)
    y = NF.frn_tlu(x, w.float(), b.float(), tau.float(), 1e-6)
    assert y.dtype == dtype
    expected, _ = R.filter_response_norm_forward(
        np64(x), w.numpy(), b.numpy(), eps=1e-6, tau=tau.numpy()
    )
    assert_close(y, expected, dtype)


# ------------------------------------------------------------------------------ state


@pytest.mark.parametrize("learnable_eps", [False, True])
def test_state_dict_deepcopy_and_save_load(learnable_eps):
    m = nnl.FilterResponseNorm2d(3, eps=1e-5, learnable_eps=learnable_eps)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        m.tau.uniform_(-1, 0)
        m.eps.fill_(3e-3)
    x = offcenter(2, 3, 4, 4, dtype=torch.float32, seed=12)
    y = m(x)
    fresh = nnl.FilterResponseNorm2d(3, eps=1e-5, learnable_eps=learnable_eps)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(m)(x), y)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = nnl.FilterResponseNorm2d(3, eps=1e-5, learnable_eps=learnable_eps)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(loaded(x), y)


def test_to_float64_moves_eps():
    m = nnl.FilterResponseNorm2d(3).to(torch.float64)
    assert m.eps.dtype == torch.float64 and m.tau.dtype == torch.float64
    x = offcenter(2, 3, 2, 2, seed=13)
    assert m(x).dtype == torch.float64
    learn = nnl.FilterResponseNorm1d(3, learnable_eps=True).to(torch.float64)
    assert learn.eps.dtype == torch.float64


def test_registry_builds_frn_with_tlu():
    m = create_norm("frn", 8)
    assert isinstance(m, nnl.FilterResponseNorm2d) and m.tau is not None


# -------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    m = nnl.FilterResponseNorm2d(4)
    with pytest.raises(ValueError, match=r"FilterResponseNorm2d.*4-D.*\(2, 4, 5\)"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"FilterResponseNorm2d.*3 channels.*num_features=4"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match=r"FilterResponseNorm2d.*floating"):
        m(torch.ones(2, 4, 5, 5, dtype=torch.long))
    for eps in (0.0, -1e-6):
        with pytest.raises(ValueError, match=r"FilterResponseNorm2d: eps must be > 0"):
            nnl.FilterResponseNorm2d(4, eps=eps)
        with pytest.raises(ValueError, match=r"filter_response_norm: eps must be > 0"):
            NF.filter_response_norm(torch.randn(2, 4, 5), eps=eps)
    with pytest.raises(ValueError, match=r"eps must be nonzero"):
        NF.filter_response_norm(torch.zeros(2, 4, 5), eps=torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"one-element tensor"):
        NF.filter_response_norm(torch.randn(2, 4, 5), eps=torch.ones(4))
    with pytest.raises(ValueError, match=r"filter_response_norm.*at least one spatial.*\(2, 4\)"):
        NF.filter_response_norm(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"frn_tlu: tau has shape \(3,\), expected \(4,\)"):
        NF.frn_tlu(torch.randn(2, 4, 5), None, None, torch.zeros(3))
    with pytest.raises(ValueError, match=r"TLU.*3 channels"):
        nnl.TLU(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"num_features must be >= 1"):
        nnl.FilterResponseNorm1d(0)


def test_zero_input_is_finite():
    m = nnl.FilterResponseNorm2d(3, learnable_eps=True)
    y = m(torch.zeros(2, 3, 4, 4))
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------- training


def test_short_training_drives_loss_down():
    """A tiny CNN with FRN+TLU (one learnable ε) fits fixed random data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = 1.0 + torch.randn(32, 3, 6, 6, generator=g)
        target = torch.randint(0, 4, (32,), generator=g)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nnl.FilterResponseNorm2d(8, learnable_eps=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nnl.FilterResponseNorm2d(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        losses = []
        for _ in range(150):
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# ------------------------------------------------- the autograd.Function (hand-written backward)
#
# In eager mode with autograd on, FRN runs _FRNFunction: it saves only x (and
# per-(n, c) vectors) and computes the gradient by hand. These cases check that
# gradient against the float64 reference for every option, on fresh off-center data.

FAST_CASES = {  # name: (shape, affine, tlu, eps kind, channels_last)
    "2d": ((3, 5, 4, 6), True, True, "learnable", False),
    "2d-channels-last": ((2, 5, 3, 7), True, True, "learnable", True),
    "2d-no-affine": ((2, 4, 3, 5), False, True, "float", False),
    "2d-no-tlu": ((2, 4, 3, 5), True, False, "learnable", False),
    "plain": ((2, 4, 7), False, False, "buffer", False),
    "1d": ((3, 2, 9), True, True, "float", False),
    "3d": ((2, 3, 2, 3, 4), True, True, "learnable", False),
    "N=1": ((1, 6, 5, 3), True, True, "learnable", False),
    "spatial-1": ((5, 3, 1, 1), True, True, "learnable", False),
}


def _fast_inputs(shape, affine, tlu, eps_kind, channels_last, seed):
    c = shape[1]
    x = offcenter(*shape, seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = params(c, seed=seed) if affine else (None, None)
    eps_value = -2e-3 if eps_kind == "learnable" else 1e-3  # |eps| is used: the sign is free
    tau = median_tau(x, w, b, eps_value) if tlu else None
    for t in (w, b, tau):
        if t is not None:
            t.requires_grad_()
    eps = {
        "learnable": torch.tensor(eps_value, dtype=torch.float64, requires_grad=True),
        "buffer": torch.tensor(eps_value, dtype=torch.float64),
        "float": eps_value,
    }[eps_kind]
    return x, w, b, tau, eps, eps_value


def _frn_call(x, w, b, tau, eps):
    return NF.filter_response_norm(x, w, b, eps) if tau is None else NF.frn_tlu(x, w, b, tau, eps)


@pytest.mark.parametrize("name", list(FAST_CASES))
def test_fast_function_matches_reference(name):
    shape, affine, tlu, eps_kind, channels_last = FAST_CASES[name]
    x, w, b, tau, eps, eps_value = _fast_inputs(*FAST_CASES[name], seed=20)
    y = _frn_call(x, w, b, tau, eps)
    assert type(y.grad_fn).__name__ == "_FRNFunctionBackward"
    dy = offcenter(*shape, seed=21, loc=0.0, scale=1.0)
    y.backward(dy)
    y_ref, cache = R.filter_response_norm_forward(
        np64(x), np64(w), np64(b), eps=eps_value, tau=np64(tau)
    )
    g = R.filter_response_norm_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    if affine:
        assert_close(w.grad, g["dweight"])
        assert_close(b.grad, g["dbias"])
    if tlu:
        assert_close(tau.grad, g["dtau"])
    if eps_kind == "learnable":
        assert_close(eps.grad, g["deps"])
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["2d", "2d-no-affine", "2d-no-tlu", "plain", "spatial-1"])
def test_fast_function_gradcheck_and_double_backward(name):
    _, affine, tlu, eps_kind, channels_last = FAST_CASES[name]
    shape = (2, 3, 1, 1) if name == "spatial-1" else (2, 3, 3, 2)
    x, w, b, tau, eps, _ = _fast_inputs(shape, affine, tlu, eps_kind, channels_last, seed=22)
    present = [t for t in (w, b, tau) if t is not None]
    tensors = (x, *present, *([eps] if isinstance(eps, torch.Tensor) else []))

    def f(x, *rest):
        it = iter(rest)
        ww, bb = (next(it), next(it)) if affine else (None, None)
        tt = next(it) if tlu else None
        ee = next(it) if isinstance(eps, torch.Tensor) else eps
        return _frn_call(x, ww, bb, tt, ee)

    assert type(f(*tensors).grad_fn).__name__ == "_FRNFunctionBackward"
    assert torch.autograd.gradcheck(f, tensors)
    # create_graph=True differentiates the recomputed composite: exact second order
    assert torch.autograd.gradgradcheck(f, tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_function_half_input_fp32_statistics(dtype):
    shape = (2, 4, 6, 5)
    x = offcenter(*shape, seed=23).to(dtype).requires_grad_()
    w, b = (t.float().requires_grad_() for t in params(4, seed=23))
    tau = median_tau(x, w, b, 1e-3).float().requires_grad_()
    eps = torch.tensor(1e-3, requires_grad=True)
    y = NF.frn_tlu(x, w, b, tau, eps)
    assert type(y.grad_fn).__name__ == "_FRNFunctionBackward" and y.dtype == dtype
    dy = offcenter(*shape, seed=24, loc=0.0, scale=1.0).to(dtype)
    y.backward(dy)
    assert x.grad.dtype == dtype and w.grad.dtype == tau.grad.dtype == torch.float32
    # the reference sees the same (rounded) input and dy, in float64
    y_ref, cache = R.filter_response_norm_forward(
        np64(x), np64(w), np64(b), eps=1e-3, tau=np64(tau)
    )
    g = R.filter_response_norm_backward(np64(dy), cache)
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, g["dx"], dtype, atol=2e-2 if dtype == torch.bfloat16 else 4e-3)
    # parameter gradients are fp32 sums over fp32 statistics: far tighter than half
    for got, key in ((w.grad, "dweight"), (b.grad, "dbias"), (tau.grad, "dtau")):
        assert_close(got, g[key], torch.float32, rtol=1e-4, atol=1e-4)
    assert_close(eps.grad, g["deps"], torch.float32, rtol=1e-4, atol=1e-4)


def test_tlu_ties_send_the_gradient_to_tau_in_the_fast_function():
    # Constant channels at N=1: every z of a channel equals the FRN output, which we
    # use as τ, so every element is a tie (z == τ exactly): all of dy goes to τ.
    x = torch.tensor([1.5, -0.25, 3.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 2, 3)
    x = x.contiguous().requires_grad_()
    w, b = (t.requires_grad_() for t in params(3, seed=25))
    with torch.no_grad():
        tau = NF.filter_response_norm(x, w, b, 1e-3)[0, :, 0, 0].clone()
    tau.requires_grad_()
    y = NF.frn_tlu(x, w, b, tau, 1e-3)
    assert type(y.grad_fn).__name__ == "_FRNFunctionBackward"
    dy = offcenter(1, 3, 2, 3, seed=26, loc=0.0, scale=1.0)
    y.backward(dy)
    assert torch.equal(y.detach(), tau.detach().view(1, 3, 1, 1).expand_as(y))
    assert torch.equal(tau.grad, dy.sum(dim=(0, 2, 3)))
    assert not x.grad.any() and not w.grad.any() and not b.grad.any()


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward (as normlab.lab.bench.layers measures them)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_fast_function_saves_only_the_input(dtype, learnable_eps):
    n, c = 4, 8
    m = nnl.FilterResponseNorm2d(c, learnable_eps=learnable_eps)
    x = offcenter(n, c, 16, 16, dtype=dtype, seed=27).requires_grad_()
    x_bytes = x.numel() * x.element_size()
    small = 8 * (n * c + c + 1) * 4  # a few fp32 per-(n, c) / per-channel vectors
    saved = _saved_bytes(lambda: m(x))
    assert x_bytes <= saved <= x_bytes + small, (saved, x_bytes)
    # The plain composite keeps full-size intermediates: the bound above catches it.
    from normlab.functional._frn_autograd import frn_composite

    composite = _saved_bytes(lambda: frn_composite(x, m.weight, m.bias, m.tau, m.effective_eps()))
    assert composite > x_bytes + small


def test_paths_agree_no_grad_and_torch_func():
    x, w, b, tau, eps, _ = _fast_inputs((2, 3, 4, 5), True, True, "buffer", False, seed=28)
    y = NF.frn_tlu(x, w, b, tau, eps)
    with torch.no_grad():  # the forward kernel alone: the same numbers
        assert torch.equal(NF.frn_tlu(x, w, b, tau, eps), y.detach())
    (dx,) = torch.autograd.grad(y.sum(), x)

    def loss(x):  # torch.func runs the plain composite
        return NF.frn_tlu(x, w.detach(), b.detach(), tau.detach(), eps).sum()

    assert_close(torch.func.grad(loss)(x.detach()), dx)
    assert_close(torch.func.vmap(lambda xi: NF.frn_tlu(xi[None], w, b, tau, eps)[0])(x), y)


# torch's forward_ad scripts its jvp decompositions on first use (torch's own warning)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad():
    """Dual tensors take the composite (the kernels have no tangent formulas)."""
    import torch.autograd.forward_ad as fwAD

    x, w, b, tau, eps, _ = _fast_inputs((2, 3, 4, 5), True, True, "float", False, seed=29)
    x, w, b, tau = (t.detach() for t in (x, w, b, tau))
    tangent = offcenter(2, 3, 4, 5, seed=30, loc=0.0, scale=1.0)

    def f(x):
        return NF.frn_tlu(x, w, b, tau, eps)

    with fwAD.dual_level():
        jvp = fwAD.unpack_dual(f(fwAD.make_dual(x, tangent))).tangent
    assert_close(jvp, torch.func.jvp(f, (x,), (tangent,))[1])


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "large-plane"])
def test_dot_sums_match_plain_sums(per_sample, layout):
    """The backward's fused Σa, Σa·b (torch's BN-backward reduction) against plain sums."""
    from normlab._core.stats import dot_sums

    shape = (2, 3, 300, 300) if layout == "large-plane" else (3, 4, 5, 6)  # 9e4 > 2¹⁶
    a = offcenter(*shape, seed=31, dtype=torch.float32)
    b = offcenter(*shape, seed=32, dtype=torch.float32)
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    dims = (2, 3) if per_sample else (0, 2, 3)
    s_a, s_ab = dot_sums(a, b, per_sample)
    assert s_a.shape == s_ab.shape == (shape[0] if per_sample else 1, shape[1], 1, 1)
    a64, b64 = a.double(), b.double()
    scale = (a64 * b64).abs().sum(dims, keepdim=True)
    assert_close(s_a, a64.sum(dims, keepdim=True), torch.float32, atol=1e-6 * scale.max())
    assert_close(s_ab / scale, (a64 * b64).sum(dims, keepdim=True) / scale, torch.float32)
