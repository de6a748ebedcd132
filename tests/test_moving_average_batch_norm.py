"""MovingAverageBatchNorm1d/2d/3d and its functional op against the float64 reference."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import normlab.functional as NF
import normlab.nn as nnl
from _testing import assert_close, np64, offcenter
from normlab import reference as R
from normlab.registry import NORM_LAYERS, create_norm

CLASSES = {3: nnl.MovingAverageBatchNorm1d, 4: nnl.MovingAverageBatchNorm2d}
CLASSES[5] = nnl.MovingAverageBatchNorm3d


def _cls(shape):
    return nnl.MovingAverageBatchNorm1d if len(shape) == 2 else CLASSES[len(shape)]


def _make(shape, dtype=torch.float64, affine=True, **kw):
    c = shape[1]
    m = _cls(shape)(c, affine=affine, dtype=dtype, **kw)
    if affine:
        with torch.no_grad():
            m.weight.copy_(offcenter(c, seed=11, loc=1.0, scale=0.5))
            m.bias.copy_(offcenter(c, seed=12, loc=0.0, scale=0.5))
    return m


class _RefState:
    """The reference's copy of a module's state, advanced step by step."""

    def __init__(self, m):
        sd = m.state_dict()
        # Copies: np64 of a float64 tensor shares its memory, and the module
        # updates its buffers in place.
        self.running_var = np64(sd["running_var"]).copy()
        self.chi_window = np64(sd["chi_window"]).copy()
        self.psi_window = np64(sd["psi_window"]).copy()
        self.psi_filled = int(sd["psi_filled"])
        self.t = int(sd["num_batches_tracked"])

    def step(self, m, x, dy, **kw):
        y, cache = R.moving_average_batch_norm_forward(
            np64(x),
            np64(m.weight),
            np64(m.bias),
            running_var=self.running_var,
            chi_window=self.chi_window,
            psi_window=self.psi_window,
            psi_filled=self.psi_filled,
            num_batches_tracked=self.t,
            momentum=m.momentum,
            eps=m.eps,
            warmup_iters=m.warmup_iters,
            r_clip=m.r_clip,
            r_warmup_iters=m.r_warmup_iters,
            **kw,
        )
        grads = R.moving_average_batch_norm_backward(np64(dy), cache)
        self.running_var, self.chi_window = cache["running_var"], cache["chi_window"]
        self.t = cache["num_batches_tracked"]
        self.psi_window, self.psi_filled = grads["psi_window"], grads["psi_filled"]
        return y, grads, cache


def _torch_step(m, x, dy):
    x = x.clone().requires_grad_()
    for p in m.parameters():
        p.grad = None
    y = m(x)
    y.backward(dy)
    return y, x.grad, m.weight.grad if m.affine else None, m.bias.grad if m.affine else None


CASES = [
    # (shape, module kwargs)
    ((4, 3, 5, 6), dict(window=4, warmup_iters=2, r_clip=1.3)),
    ((2, 3, 5, 6), dict(window=3, warmup_iters=0, r_clip=5.0, momentum=None)),
    ((5, 4), dict(window=4, warmup_iters=3, r_clip=1.5)),
    ((3, 2, 7), dict(window=2, warmup_iters=1, r_clip=2.0, affine=False)),
    ((2, 3, 2, 3, 4), dict(window=5, warmup_iters=2, r_clip=1.2, momentum=0.3)),
    ((1, 3, 1, 1), dict(window=3, warmup_iters=1, r_clip=1.5)),
    ((3, 3, 4, 4), dict(window=2, warmup_iters=1, r_clip=1.3, r_warmup_iters=4)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,kw", CASES)
def test_matches_reference_over_steps(shape, kw, dtype):
    kw = dict(kw)
    affine = kw.pop("affine", True)
    m = _make(shape, dtype=dtype, affine=affine, **kw)
    ref = _RefState(m)
    clipped = False
    for step in range(8):  # through warm-up, window filling and wrap-around
        x = offcenter(*shape, seed=100 + step, loc=0.5, scale=2.0 + step).to(dtype)
        dy = offcenter(*shape, seed=200 + step, loc=0.3, scale=1.0).to(dtype)
        y, dx, dw, db = _torch_step(m, x, dy)
        yr, g, cache = ref.step(m, x, dy)
        assert_close(y, yr, dtype)
        # One value per channel: x̂² ≈ 1 and g − x̂·ψ cancels, which amplifies the
        # fp32 rounding by 1/(1 − x̂²) (~500 here); fp64 stays exact.
        loose = (
            dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 and x[:, 0].numel() == 1 else {}
        )
        assert_close(dx, g["dx"], dtype, **loose)
        if affine:
            assert_close(dw, g["dweight"], dtype)
            assert_close(db, g["dbias"], dtype)
        else:
            assert g["dweight"] is None and g["dbias"] is None
        assert_close(m.running_var, ref.running_var, dtype)
        assert_close(m.chi_window, ref.chi_window, dtype)
        assert_close(m.psi_window, ref.psi_window, dtype)
        assert int(m.psi_filled) == ref.psi_filled
        assert int(m.num_batches_tracked) == ref.t == step + 1
        r = cache["r"]
        clipped |= bool(np.isclose(r, m.r_clip).any() or np.isclose(r, 1 / m.r_clip).any())
    if m.r_clip < 5:
        assert clipped, "the case was meant to exercise the clip bounds"


def test_channels_last_matches_contiguous():
    shape = (3, 4, 5, 6)
    a, b = _make(shape, window=3, warmup_iters=1), _make(shape, window=3, warmup_iters=1)
    for step in range(4):
        x = offcenter(*shape, seed=step)
        dy = offcenter(*shape, seed=50 + step)
        ya, dxa, dwa, _ = _torch_step(a, x, dy)
        yb, dxb, dwb, _ = _torch_step(b, x.contiguous(memory_format=torch.channels_last), dy)
        assert_close(yb, ya)
        assert_close(dxb, dxa)
        assert_close(dwb, dwa)


def _mean_free_bn(x, weight, bias, eps):
    """``x / sqrt(E[x²] + eps)·γ + β`` written with autograd ops (batch stats)."""
    dims = (0, *range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    chi = (x * x).mean(dim=dims, keepdim=True)
    return x / torch.sqrt(chi + eps) * weight.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize(
    "kw",
    [
        dict(window=1, warmup_iters=0, r_clip=1.0),  # window 1, renormalization off
        dict(window=7, warmup_iters=10**9, r_clip=5.0),  # forever in warm-up
    ],
)
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (6, 3), (1, 2, 3, 2, 2)])
def test_window_one_is_mean_free_batch_norm(shape, kw):
    m = _make(shape, **kw)
    for step in range(5):
        x = offcenter(*shape, seed=300 + step, scale=1.0 + step)
        dy = offcenter(*shape, seed=400 + step)
        y, dx, dw, db = _torch_step(m, x, dy)
        xe = x.clone().requires_grad_()
        w = m.weight.detach().clone().requires_grad_()
        b = m.bias.detach().clone().requires_grad_()
        ye = _mean_free_bn(xe, w, b, m.eps)
        ye.backward(dy)
        assert_close(y, ye)
        assert_close(dx, xe.grad)
        assert_close(dw, w.grad)
        assert_close(db, b.grad)


def test_gradcheck_during_warmup():
    # In warm-up MABN is mean-free BN, whose custom backward is the exact gradient.
    m = _make((3, 2, 3, 2), window=4, warmup_iters=10**9)
    x = offcenter(3, 2, 3, 2, seed=5).requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return NF.moving_average_batch_norm(
            x,
            m.running_var,
            w,
            b,
            True,
            chi_window=m.chi_window,
            psi_window=m.psi_window,
            psi_filled=m.psi_filled,
            num_batches_tracked=m.num_batches_tracked,
            warmup_iters=10**9,
        )

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_after_warmup_backward_uses_window_average_of_psi():
    """Not the exact gradient: dx uses ψ averaged with earlier steps, as the paper says."""
    shape = (2, 3, 4, 4)
    m = _make(shape, window=3, warmup_iters=1, r_clip=1.0)
    ref = _RefState(m)
    for step in range(3):
        x, dy = offcenter(*shape, seed=step), offcenter(*shape, seed=10 + step, loc=1.0)
        _, dx, _, _ = _torch_step(m, x, dy)
        ref.step(m, x, dy)
    x = x.clone().requires_grad_()
    exact = torch.autograd.grad((_mean_free_bn(x, m.weight, m.bias, m.eps) * dy).sum(), x)[0]
    assert not torch.allclose(dx, exact)  # ψ_SMA ≠ ψ_B, χ_SMA ≠ χ_B
    assert torch.isclose(m.psi_filled, torch.tensor(3))


@pytest.mark.parametrize("n", [1, 3, 7])
def test_any_batch_size(n):
    for shape in [(n, 3, 4, 5), (n, 3)]:
        m = _make(shape, window=4, warmup_iters=2, r_clip=2.0)
        ref = _RefState(m)
        for step in range(6):
            x = offcenter(*shape, seed=n * 10 + step)
            dy = offcenter(*shape, seed=n * 20 + step)
            y, dx, dw, db = _torch_step(m, x, dy)
            yr, g, _ = ref.step(m, x, dy)
            assert torch.isfinite(y).all() and torch.isfinite(dx).all()
            assert_close(y, yr)
            assert_close(dx, g["dx"])
            assert_close(dw, g["dweight"])


def test_resume_after_reload_is_bit_identical():
    shape = (2, 4, 5, 5)
    kw = dict(window=4, warmup_iters=3, r_clip=2.0, dtype=torch.float32)
    a = nnl.MovingAverageBatchNorm2d(4, **kw)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    data = [
        (offcenter(*shape, seed=i, dtype=torch.float32), offcenter(*shape, seed=99 + i))
        for i in range(9)
    ]
    for x, dy in data[:5]:  # past warm-up, window wrapped
        opt_a.zero_grad()
        a(x).backward(dy.float())
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = nnl.MovingAverageBatchNorm2d(4, **kw)
    b.load_state_dict(ckpt["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    opt_b.load_state_dict(ckpt["opt"])
    for x, dy in data[5:]:
        outs = []
        for mod, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            xg = x.clone().requires_grad_()
            y = mod(xg)
            y.backward(dy.float())
            opt.step()
            outs.append((y.detach(), xg.grad, mod.weight.grad, mod.bias.grad))
        for ta, tb in zip(*outs, strict=True):
            assert torch.equal(ta, tb)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)


def test_no_host_sync_in_the_hot_path(monkeypatch):
    shape = (2, 3, 4, 4)
    m = _make(shape, window=3, warmup_iters=1, r_clip=2.0, momentum=None)
    xs = [offcenter(*shape, seed=i).requires_grad_() for i in range(4)]

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in MABN's training step")

    # The non-finite-batch count as on a GPU: kept on the device, not read per step.
    monkeypatch.setattr("normlab.nn._base.read_at_once", lambda flag: False)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for x in xs:
        m(x).square().sum().backward()
    monkeypatch.undo()
    assert int(m.num_batches_tracked) == 4 and int(m.psi_filled) == 3


def test_eval_uses_the_ema_and_changes_nothing():
    shape = (3, 4, 3, 3)
    m = _make(shape, window=2, warmup_iters=1)
    for step in range(4):
        _torch_step(m, offcenter(*shape, seed=step), offcenter(*shape, seed=9 + step))
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = offcenter(*shape, seed=77).requires_grad_()
    y = m(x)
    w, b, rv = m.weight, m.bias, m.running_var
    expected = x / torch.sqrt(rv + m.eps)[:, None, None] * w[:, None, None] + b[:, None, None]
    assert_close(y, expected)
    dy = offcenter(*shape, seed=78)
    y.backward(dy)
    assert_close(x.grad, dy * (w / torch.sqrt(rv + m.eps))[:, None, None])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    yr, cache = R.moving_average_batch_norm_forward(
        np64(x), np64(w), np64(b), running_var=np64(rv), training=False, eps=m.eps
    )
    assert_close(y, yr)
    assert_close(x.grad, R.moving_average_batch_norm_backward(np64(dy), cache)["dx"])


def test_training_forward_without_backward():
    shape = (2, 3, 4)
    m = _make(shape, window=3)
    with torch.no_grad():
        m(offcenter(*shape))
    assert int(m.num_batches_tracked) == 1 and int(m.psi_filled) == 0
    assert m.chi_window[0].abs().sum() > 0 and m.psi_window.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_fp32_module(dtype):
    shape = (2, 3, 6, 6)
    m16 = _make(shape, dtype=torch.float32, window=3, warmup_iters=1)
    m32 = copy.deepcopy(m16)
    for step in range(3):
        x = offcenter(*shape, seed=step, dtype=dtype)
        dy = offcenter(*shape, seed=5 + step, dtype=dtype)
        y16, dx16, dw16, _ = _torch_step(m16, x, dy)
        y32, dx32, dw32, _ = _torch_step(m32, x.float(), dy.float())
        assert y16.dtype == dtype and dx16.dtype == dtype and dw16.dtype == torch.float32
        assert_close(y16, y32, dtype)
        assert_close(dx16, dx32, dtype)
        assert_close(dw16, dw32, dtype, rtol=1e-2, atol=1e-1)  # sums of ~70 half products
    assert m16.running_var.dtype == torch.float32


def test_state_dict_deepcopy_and_weights_only_save():
    m = nnl.MovingAverageBatchNorm2d(5, window=6)
    assert set(m.state_dict()) == {
        "weight",
        "bias",
        "running_var",
        "num_batches_tracked",
        "chi_window",
        "psi_window",
        "psi_filled",
    }
    assert m.chi_window.shape == m.psi_window.shape == (6, 5)
    _torch_step(m, offcenter(2, 5, 3, 3, dtype=torch.float32), torch.ones(2, 5, 3, 3))
    clone = copy.deepcopy(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k])
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = nnl.MovingAverageBatchNorm2d(5, window=6)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in m.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])
    assert "window=6" in repr(m) and "r_clip=5.0" in repr(m)
    m.reset_running_stats()
    assert int(m.num_batches_tracked) == 0 and m.chi_window.abs().sum() == 0
    assert torch.equal(m.running_var, torch.ones(5))


def test_registry():
    assert NORM_LAYERS["mabn"] is nnl.MovingAverageBatchNorm2d
    m = create_norm("mabn", 8, window=4)
    assert isinstance(m, nnl.MovingAverageBatchNorm2d) and m.window == 4


def test_defaults_are_the_papers_except_momentum():
    """momentum=0.1 is BatchNorm's default; the paper's α = 0.98 is momentum=0.02."""
    m = nnl.MovingAverageBatchNorm2d(3)
    assert (m.window, m.warmup_iters, m.r_clip, m.eps, m.momentum) == (16, 100, 5.0, 1e-5, 0.1)
    assert m.r_warmup_iters is None


class _AuthorsSchedule:
    """The authors' MABN2d step by step, in float64, as their release schedules it.

    Steps count from 1; moving averages once the window is full and the step
    reaches ``warmup``; r from step ``max(r_warmup, warmup) + 1`` (the release
    fixes r_warmup = 1000); ``alpha`` weights the old running value.
    """

    def __init__(self, c, window, warmup, r_warmup, alpha, eps):
        self.k, self.window, self.warmup, self.r_warmup = 0, window, warmup, r_warmup
        self.alpha, self.eps = alpha, eps
        self.running_var = torch.ones(c, dtype=torch.float64)
        self.chi = torch.zeros(window, c, dtype=torch.float64)
        self.psi = torch.zeros(window, c, dtype=torch.float64)

    def step(self, x, dy, w, b):
        self.k += 1
        k, v = self.k, (1, -1, 1, 1)
        chi_b = (x * x).mean((0, 2, 3))
        self.chi[k % self.window] = chi_b
        sma = k > self.window and k >= self.warmup
        chi = self.chi.mean(0) if sma else chi_b
        z = x / (chi + self.eps).sqrt().reshape(v)
        r = (chi + self.eps).sqrt() / (self.running_var + self.eps).sqrt()
        r = r.clamp(0.2, 5.0) if k > max(self.r_warmup, self.warmup) else torch.ones_like(r)
        y = w.reshape(v) * r.reshape(v) * z + b.reshape(v)
        self.running_var = self.alpha * self.running_var + (1 - self.alpha) * chi
        g = dy * (w * r).reshape(v)
        psi_b = (g * z).mean((0, 2, 3))
        self.psi[k % self.window] = psi_b
        psi = self.psi.mean(0) if sma else psi_b
        dx = (g - z * psi.reshape(v)) / (chi + self.eps).sqrt().reshape(v)
        return y, dx, (dy * r.reshape(v) * z).sum((0, 2, 3)), dy.sum((0, 2, 3))


def test_reproduces_the_authors_schedule():
    """The docstring's mapping: authors' (window m, warmup W, α) = ours (m, W − 1, 1 − α,
    r_warmup_iters=max(r_warmup, W)), here with a short r warm-up in place of 1000."""
    c, window, warmup, r_warmup = 3, 2, 4, 6
    ref = _AuthorsSchedule(c, window, warmup, r_warmup, alpha=0.98, eps=1e-5)
    m = _make(
        (2, c, 3, 3),
        window=window,
        warmup_iters=warmup - 1,
        momentum=0.02,
        r_warmup_iters=max(r_warmup, warmup),
    )
    for step in range(10):
        x = offcenter(2, c, 3, 3, seed=step, loc=1.0 + 0.3 * step)
        dy = offcenter(2, c, 3, 3, seed=100 + step, loc=0.5)
        y, dx, dw, db = _torch_step(m, x, dy)
        ry, rdx, rdw, rdb = ref.step(x, dy, m.weight.detach(), m.bias.detach())
        for a, e in ((y, ry), (dx, rdx), (dw, rdw), (db, rdb), (m.running_var, ref.running_var)):
            assert_close(a, e)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(window=0), "window must be >= 1"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(eps=-1e-5), "eps must be > 0"),
        (dict(r_clip=0.5), "r_clip must be >= 1"),
        (dict(warmup_iters=-1), "warmup_iters must be >= 0"),
        (dict(momentum=1.5), "momentum must be in"),
        (dict(r_warmup_iters=-1), "r_warmup_iters must be >= 0"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        nnl.MovingAverageBatchNorm2d(4, **kw)


def test_bad_input():
    m = nnl.MovingAverageBatchNorm2d(4)
    with pytest.raises(ValueError, match=r"MovingAverageBatchNorm2d.*4-D.*\(3, 4, 5\)"):
        m(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"3 channels.*num_features=4"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match=r"floating-point.*torch.int64"):
        m(torch.ones(2, 4, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no values per channel"):
        m(torch.randn(0, 4, 3, 3))
    with pytest.raises(ValueError, match=r"MovingAverageBatchNorm1d.*2-D or 3-D"):
        nnl.MovingAverageBatchNorm1d(4)(torch.randn(2, 4, 3, 3))
    rv = torch.ones(4)
    with pytest.raises(ValueError, match="needs the state tensors"):
        NF.moving_average_batch_norm(torch.randn(2, 4), rv, training=True)
    with pytest.raises(ValueError, match="chi_window must have shape"):
        NF.moving_average_batch_norm(
            torch.randn(2, 4),
            rv,
            training=True,
            chi_window=torch.zeros(3, 5),
            psi_window=torch.zeros(3, 5),
            psi_filled=torch.tensor(0),
            num_batches_tracked=torch.tensor(0),
        )
    with pytest.raises(ValueError, match="running_var has shape"):
        NF.moving_average_batch_norm(torch.randn(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        NF.moving_average_batch_norm(torch.randn(2, 4), rv, eps=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        NF.moving_average_batch_norm(torch.randn(2, 4), rv, backend="cuda")


@pytest.mark.slow
def test_tiny_cnn_trains_at_batch_two():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = 1.0 + torch.randn(16, 3, 6, 6, generator=g)
    target = torch.randint(0, 4, (16,), generator=g)
    model = torch.nn.Sequential(
        nnl.CenteredConv2d(3, 8, 3, padding=1, bias=False),
        nnl.MovingAverageBatchNorm2d(8, window=4, warmup_iters=20),
        torch.nn.ReLU(),
        nnl.CenteredConv2d(8, 8, 3, padding=1, bias=False),
        nnl.MovingAverageBatchNorm2d(8, window=4, warmup_iters=20),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def full_loss():
        model.eval()
        with torch.no_grad():
            out = loss_fn(model(x), target).item()
        model.train()
        return out

    start = full_loss()
    for step in range(200):  # batch 2, warm-up 20, then moving averages
        idx = torch.arange(2 * step, 2 * step + 2) % 16
        opt.zero_grad()
        loss_fn(model(x[idx]), target[idx]).backward()
        opt.step()
    end = full_loss()
    assert np.isfinite(end) and end < 0.2 * start, (start, end)
