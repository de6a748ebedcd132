"""EvoNormB0_2d and EvoNormS0_2d against the float64 reference."""

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

SHAPES = [(2, 4, 3, 5), (1, 4, 3, 3), (3, 6, 1, 1), (2, 6, 5, 7)]


def params(c: int, seed: int = 0):
    """weight, bias and a v of both signs (so both sides of B0's max are used)."""
    g = torch.Generator().manual_seed(100 + seed)
    w = 1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    v = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    return w, b, v


def set_params(m: nn.Module, seed: int = 0) -> tuple[torch.Tensor, ...]:
    w, b, v = params(m.num_features, seed)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        m.v.copy_(v)
    return w, b, v


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("training", [True, False])
def test_reference_b0_matches_finite_differences(training):
    rng = np.random.default_rng(0)
    x = 3.0 + 2.0 * rng.standard_normal((3, 4, 2, 3))
    w, b = 1.0 + 0.5 * rng.standard_normal(4), 0.3 * rng.standard_normal(4)
    v = np.array([0.8, -0.3, 0.05, 0.4])
    rv = 4.0 * np.exp(rng.standard_normal(4))
    kw = dict(running_var=rv, training=training, eps=1e-3)
    _, cache = R.evonorm_b0_forward(x, v, w, b, **kw)
    assert cache["inst"].any() and not cache["inst"].all()
    dy = rng.standard_normal(x.shape)

    def loss():
        return float((R.evonorm_b0_forward(x, v, w, b, **kw)[0] * dy).sum())

    g = R.evonorm_b0_backward(dy, cache)
    for name, a in (("dx", x), ("dweight", w), ("dbias", b), ("dv", v)):
        np.testing.assert_allclose(g[name], numeric_grad(loss, a), rtol=1e-6, atol=1e-6)


def test_reference_s0_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = 3.0 + 2.0 * rng.standard_normal((2, 6, 2, 3))
    w, b, v = (
        1.0 + 0.5 * rng.standard_normal(6),
        0.3 * rng.standard_normal(6),
        rng.standard_normal(6),
    )
    dy = rng.standard_normal(x.shape)

    def loss():
        return float((R.evonorm_s0_forward(x, 3, v, w, b, eps=1e-3)[0] * dy).sum())

    g = R.evonorm_s0_backward(dy, R.evonorm_s0_forward(x, 3, v, w, b, eps=1e-3)[1])
    for name, a in (("dx", x), ("dweight", w), ("dbias", b), ("dv", v)):
        np.testing.assert_allclose(g[name], numeric_grad(loss, a), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- torch vs reference


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_b0_matches_reference_train_and_eval(shape):
    c = shape[1]
    m = nnl.EvoNormB0_2d(c, dtype=torch.float64)
    w, b, v = set_params(m)
    rv0 = 4.0 * torch.exp(torch.linspace(-1, 1, c, dtype=torch.float64))
    with torch.no_grad():
        m.running_var.copy_(rv0)
    for training in (True, False):
        m.train(training)
        m.zero_grad()
        x = offcenter(*shape, seed=1).requires_grad_()
        rv_before = m.running_var.clone()
        y = m(x)
        dy = offcenter(*shape, seed=2, loc=0.0, scale=1.0)
        y.backward(dy)
        y_ref, cache = R.evonorm_b0_forward(
            np64(x), v.numpy(), w.numpy(), b.numpy(), running_var=np64(rv_before),
            training=training,
        )  # fmt: skip
        g = R.evonorm_b0_backward(np64(dy), cache)
        assert_close(y, y_ref)
        assert_close(x.grad, g["dx"])
        assert_close(m.weight.grad, g["dweight"])
        assert_close(m.bias.grad, g["dbias"])
        assert_close(m.v.grad, g["dv"])
        if training:
            _, new_rv, _ = R.batch_norm_update_running(np64(x), np.zeros(c), np64(rv0))
            assert_close(m.running_var, new_rv)
            assert int(m.num_batches_tracked) == 1
        else:
            assert torch.equal(m.running_var, rv_before)


def test_b0_eval_uses_running_var():
    m = nnl.EvoNormB0_2d(3).eval()
    x = offcenter(2, 3, 4, 4, dtype=torch.float32, seed=3)
    y1 = m(x)
    with torch.no_grad():
        m.running_var.mul_(100.0)
    y2 = m(x)
    assert not torch.allclose(y1, y2)
    ref, _ = R.evonorm_b0_forward(
        np64(x), np.ones(3), np.ones(3), np.zeros(3), running_var=np64(m.running_var),
        training=False,
    )  # fmt: skip
    assert_close(y2, ref, torch.float32)
    # eval at batch 1 with one value per channel is fine (no batch statistics)
    assert torch.isfinite(m(offcenter(1, 3, 1, 1, dtype=torch.float32))).all()


def test_b0_momentum_none_and_untracked():
    m = nnl.EvoNormB0_2d(3, momentum=None, dtype=torch.float64)
    xs = [offcenter(4, 3, 2, 3, seed=s) for s in range(3)]
    for x in xs:
        m(x)
    unbiased = [x.transpose(0, 1).reshape(3, -1).var(dim=1) for x in xs]
    assert_close(m.running_var, torch.stack(unbiased).mean(0))
    free = nnl.EvoNormB0_2d(3, track_running_stats=False, dtype=torch.float64).eval()
    assert free.running_var is None and set(free.state_dict()) == {"v", "weight", "bias"}
    y_ref, _ = R.evonorm_b0_forward(np64(xs[0]), np.ones(3), np.ones(3), np.zeros(3))
    assert_close(free(xs[0]), y_ref)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("groups", [1, 2])
def test_s0_matches_reference(shape, groups):
    c = shape[1]
    m = nnl.EvoNormS0_2d(c, groups=groups, dtype=torch.float64)
    w, b, v = set_params(m)
    x = offcenter(*shape, seed=4).requires_grad_()
    y = m(x)
    dy = offcenter(*shape, seed=5, loc=0.0, scale=1.0)
    y.backward(dy)
    y_ref, cache = R.evonorm_s0_forward(np64(x), groups, v.numpy(), w.numpy(), b.numpy())
    g = R.evonorm_s0_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    assert_close(m.weight.grad, g["dweight"])
    assert_close(m.bias.grad, g["dbias"])
    assert_close(m.v.grad, g["dv"])
    m.eval()
    assert_close(m(x), y_ref)


def test_s0_groups_equal_channels():
    x = offcenter(2, 4, 3, 3, seed=6)
    _, _, v = params(4)
    y_ref, _ = R.evonorm_s0_forward(np64(x), 4, v.numpy())
    assert_close(NF.evonorm_s0(x, 4, v), y_ref)


def test_gradcheck():
    x = offcenter(2, 4, 2, 2, seed=7).requires_grad_()
    w, b, v = (t.requires_grad_() for t in params(4))
    rv = torch.full((4,), 3.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b, v: NF.evonorm_b0(x, None, v, w, b, True, 0.1, 1e-3), (x, w, b, v)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b, v: NF.evonorm_b0(x, rv, v, w, b, False, 0.1, 1e-3), (x, w, b, v)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b, v: NF.evonorm_s0(x, 2, v, w, b, 1e-3), (x, w, b, v)
    )


# ------------------------------------------------------------------------- numerics


def test_s0_off_center_fp32_accuracy():
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)).float()
    v = torch.full((4,), 1e-4)
    y = NF.evonorm_s0(x, 2, v)
    y_ref, _ = R.evonorm_s0_forward(np64(x), 2, np64(v))
    assert_close(y, y_ref, torch.float32)


def test_b0_off_center_fp32_accuracy():
    g = torch.Generator().manual_seed(1)
    x = (1e4 + 1e-2 * torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)).float()
    v = torch.tensor([0.0, -1.0, 1e-6, 1.0])
    y = NF.evonorm_b0(x, None, v, training=True, eps=1e-8)
    y_ref, _ = R.evonorm_b0_forward(np64(x), np64(v), eps=1e-8)
    assert_close(y, y_ref, torch.float32)


@pytest.mark.parametrize("cls", [nnl.EvoNormB0_2d, nnl.EvoNormS0_2d])
def test_channels_last_same_values(cls):
    m = cls(6) if cls is nnl.EvoNormB0_2d else cls(6, groups=3)
    set_params(m)
    m.float()
    m2 = copy.deepcopy(m)
    x = offcenter(3, 6, 4, 5, dtype=torch.float32, seed=8)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, yl = m(x), m2(xl)
    assert_close(yl, y, torch.float32)
    y.sum().backward()
    yl.sum().backward()
    assert_close(xl.grad, x.grad, torch.float32)
    assert_close(m2.v.grad, m.v.grad, torch.float32, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_within_tolerance(dtype):
    x = offcenter(2, 4, 5, 3, dtype=dtype, seed=9)
    w, b, v = params(4)
    yb = NF.evonorm_b0(x, None, v.float(), w.float(), b.float(), True)
    ys = NF.evonorm_s0(x, 2, v.float(), w.float(), b.float())
    assert yb.dtype == ys.dtype == dtype
    ref_b, _ = R.evonorm_b0_forward(np64(x), v.numpy(), w.numpy(), b.numpy())
    ref_s, _ = R.evonorm_s0_forward(np64(x), 2, v.numpy(), w.numpy(), b.numpy())
    assert_close(yb, ref_b, dtype)
    assert_close(ys, ref_s, dtype)


# ------------------------------------------------------------------------------ state


@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_state_dict_deepcopy_save_load(kind):
    def build():
        return nnl.EvoNormB0_2d(4) if kind == "b0" else nnl.EvoNormS0_2d(4, groups=2)

    m = build()
    set_params(m)
    m.float()
    m(offcenter(3, 4, 3, 3, dtype=torch.float32, seed=10))
    expected = {"v", "weight", "bias"}
    if kind == "b0":
        expected |= {"running_var", "num_batches_tracked"}
    assert set(m.state_dict()) == expected
    m.eval()
    x = offcenter(2, 4, 3, 3, dtype=torch.float32, seed=11)
    y = m(x)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = build().eval()
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    fresh = build().eval()
    fresh.load_state_dict(m.state_dict())
    for other in (loaded, fresh, copy.deepcopy(m)):
        assert torch.equal(other(x), y)


def test_registry_names():
    assert isinstance(create_norm("evonorm_b0", 8), nnl.EvoNormB0_2d)
    s0 = create_norm("evonorm_s0", 48)
    assert isinstance(s0, nnl.EvoNormS0_2d) and s0.groups == 24
    assert create_norm("evonorm_s0", 64).groups == 32


# -------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    b0, s0 = nnl.EvoNormB0_2d(4), nnl.EvoNormS0_2d(4, groups=2)
    for m, name in ((b0, "EvoNormB0_2d"), (s0, "EvoNormS0_2d")):
        with pytest.raises(ValueError, match=rf"{name}.*4-D.*\(2, 4, 5\)"):
            m(torch.randn(2, 4, 5))
        with pytest.raises(ValueError, match=rf"{name}.*3 channels.*num_features=4"):
            m(torch.randn(2, 3, 5, 5))
        with pytest.raises(TypeError, match=rf"{name}.*floating"):
            m(torch.ones(2, 4, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"EvoNormB0_2d.*more than 1 value per channel"):
        b0(torch.randn(1, 4, 1, 1))
    assert int(b0.num_batches_tracked) == 0
    with pytest.raises(ValueError, match=r"EvoNormB0_2d: eps must be > 0"):
        nnl.EvoNormB0_2d(4, eps=0.0)
    with pytest.raises(ValueError, match=r"EvoNormS0_2d: eps must be > 0"):
        nnl.EvoNormS0_2d(4, groups=2, eps=-1.0)
    with pytest.raises(ValueError, match=r"EvoNormS0_2d: 24 channels .* 32 groups.*24, 12, 8, 6"):
        nnl.EvoNormS0_2d(24)
    with pytest.raises(ValueError, match=r"evonorm_s0: 6 channels .* 4 groups.*3, 2, 1"):
        NF.evonorm_s0(torch.randn(2, 6, 3, 3), 4, torch.ones(6))
    with pytest.raises(ValueError, match=r"evonorm_b0: training=False needs running_var"):
        NF.evonorm_b0(torch.randn(2, 4, 3, 3), None, torch.ones(4))
    with pytest.raises(ValueError, match=r"evonorm_b0: v has shape \(3,\)"):
        NF.evonorm_b0(torch.randn(2, 4, 3, 3), None, torch.ones(3), training=True)


def test_s0_batch_one_and_single_pixel_are_finite():
    m = nnl.EvoNormS0_2d(4, groups=2)
    assert torch.isfinite(m(offcenter(1, 4, 1, 1, dtype=torch.float32))).all()


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_short_training_drives_loss_down(kind):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = 1.0 + torch.randn(32, 3, 6, 6, generator=g)
        target = torch.randint(0, 4, (32,), generator=g)

        def norm(c: int) -> nn.Module:
            return nnl.EvoNormB0_2d(c) if kind == "b0" else nnl.EvoNormS0_2d(c, groups=4)

        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            norm(8),
            nn.Conv2d(8, 8, 3, padding=1),
            norm(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        losses = []
        for step in range(200):
            xb, tb = x[(step % 2) * 16 :][:16], target[(step % 2) * 16 :][:16]
            loss = nn.functional.cross_entropy(model(xb), tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            final = nn.functional.cross_entropy(model(x), target).item()
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(losses))
    first = float(np.mean(losses[:2]))
    assert final < 0.1 * first, (first, final)


# ------------------------------------------------- the autograd.Functions (hand-written backward)
#
# In eager mode with autograd on, B0 and S0 run autograd.Functions that save only x
# (and per-(n, c) statistics) and compute the gradient by hand. These cases check
# that gradient against the float64 reference for every option, on fresh
# off-center data.

B0_CASES = {  # name: (shape, affine, training, channels_last)
    "2d-train": ((4, 5, 3, 4), True, True, False),
    "2d-eval": ((3, 5, 3, 4), True, False, False),
    "2d-train-channels-last": ((3, 5, 4, 3), True, True, True),
    "2d-eval-channels-last": ((3, 5, 4, 3), True, False, True),
    "no-affine-train": ((3, 4, 3, 3), False, True, False),
    "1d-train": ((4, 3, 7), True, True, False),
    "3d-train": ((2, 3, 2, 3, 2), True, True, False),
    "N=1-train": ((1, 4, 3, 5), True, True, False),
    "spatial-1-train": ((6, 3, 1, 1), True, True, False),
    "N=1-spatial-1-eval": ((1, 3, 1, 1), True, False, False),
}

S0_CASES = {  # name: (shape, groups, affine, channels_last)
    "2d-g2": ((3, 6, 4, 5), 2, True, False),
    "2d-g1": ((2, 4, 3, 3), 1, True, False),
    "2d-gC": ((2, 4, 3, 3), 4, True, False),
    "channels-last": ((2, 6, 3, 5), 3, True, True),
    "no-affine": ((2, 4, 3, 3), 2, False, False),
    "1d": ((3, 4, 7), 2, True, False),
    "3d": ((2, 4, 2, 3, 2), 2, True, False),
    "N=1": ((1, 6, 4, 3), 3, True, False),
    "spatial-1": ((3, 6, 1, 1), 2, True, False),
    "spatial-1-gC": ((2, 4, 1, 1), 4, True, False),
}


def _leaves(c: int, affine: bool, seed: int, dtype=torch.float64):
    w, b, v = (t.to(dtype).requires_grad_() for t in params(c, seed))
    return (w, b, v) if affine else (None, None, v)


def _input(shape, channels_last: bool, seed: int, dtype=torch.float64):
    x = offcenter(*shape, seed=seed, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _running_var(c: int) -> torch.Tensor:
    return 4.0 * torch.exp(torch.linspace(-1, 1, c, dtype=torch.float64))


@pytest.mark.parametrize("name", list(B0_CASES))
def test_b0_fast_function_matches_reference(name):
    shape, affine, training, channels_last = B0_CASES[name]
    c = shape[1]
    x = _input(shape, channels_last, seed=30)
    w, b, v = _leaves(c, affine, seed=30)
    rv0 = _running_var(c)
    rv = rv0.clone()
    y = NF.evonorm_b0(x, rv, v, w, b, training, 0.1, 1e-3)
    assert type(y.grad_fn).__name__ == "_EvoNormB0FunctionBackward"
    dy = offcenter(*shape, seed=31, loc=0.0, scale=1.0)
    y.backward(dy)
    y_ref, cache = R.evonorm_b0_forward(
        np64(x), np64(v), np64(w), np64(b), running_var=np64(rv0), training=training, eps=1e-3
    )
    g = R.evonorm_b0_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    assert_close(v.grad, g["dv"])
    if affine:
        assert_close(w.grad, g["dweight"])
        assert_close(b.grad, g["dbias"])
    if training:
        _, new_rv, _ = R.batch_norm_update_running(np64(x), np.zeros(c), np64(rv0))
        assert_close(rv, new_rv)
    else:
        assert torch.equal(rv, rv0)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_b0_fast_cases_use_both_sides_of_the_max():
    sides = []
    for shape, affine, training, _ in B0_CASES.values():
        x = offcenter(*shape, seed=30)
        w, b, v = _leaves(shape[1], affine, seed=30)
        _, cache = R.evonorm_b0_forward(
            np64(x), np64(v), running_var=np64(_running_var(shape[1])), training=training, eps=1e-3
        )
        sides.append(cache["inst"].mean())
    assert 0.2 < np.mean(sides) < 0.8


@pytest.mark.parametrize("name", list(S0_CASES))
def test_s0_fast_function_matches_reference(name):
    shape, groups, affine, channels_last = S0_CASES[name]
    x = _input(shape, channels_last, seed=32)
    w, b, v = _leaves(shape[1], affine, seed=32)
    y = NF.evonorm_s0(x, groups, v, w, b, 1e-3)
    assert type(y.grad_fn).__name__ == "_EvoNormS0FunctionBackward"
    dy = offcenter(*shape, seed=33, loc=0.0, scale=1.0)
    y.backward(dy)
    y_ref, cache = R.evonorm_s0_forward(np64(x), groups, np64(v), np64(w), np64(b), eps=1e-3)
    g = R.evonorm_s0_backward(np64(dy), cache)
    assert_close(y, y_ref)
    assert_close(x.grad, g["dx"])
    assert_close(v.grad, g["dv"])
    if affine:
        assert_close(w.grad, g["dweight"])
        assert_close(b.grad, g["dbias"])
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["b0-train", "b0-eval", "s0", "s0-no-affine"])
def test_fast_functions_gradcheck_and_double_backward(kind):
    x = offcenter(2, 4, 2, 2, seed=34).requires_grad_()
    w, b, v = _leaves(4, kind != "s0-no-affine", seed=34)
    rv = torch.full((4,), 3.0, dtype=torch.float64)
    if kind.startswith("b0"):
        training = kind == "b0-train"

        def f(x, v, w, b):
            return NF.evonorm_b0(x, None if training else rv, v, w, b, training, 0.1, 1e-3)

        inputs, name = (x, v, w, b), "_EvoNormB0FunctionBackward"
    elif kind == "s0":

        def f(x, v, w, b):
            return NF.evonorm_s0(x, 2, v, w, b, 1e-3)

        inputs, name = (x, v, w, b), "_EvoNormS0FunctionBackward"
    else:

        def f(x, v):
            return NF.evonorm_s0(x, 2, v, None, None, 1e-3)

        inputs, name = (x, v), "_EvoNormS0FunctionBackward"
    assert type(f(*inputs).grad_fn).__name__ == name
    assert torch.autograd.gradcheck(f, inputs)
    # create_graph=True differentiates the recomputed composite: exact second order
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_fast_functions_half_input_fp32_statistics(kind, dtype):
    shape = (3, 4, 5, 6)
    x = offcenter(*shape, seed=35).to(dtype).requires_grad_()
    w, b, v = _leaves(4, True, seed=35, dtype=torch.float32)
    if kind == "b0":
        y = NF.evonorm_b0(x, None, v, w, b, True, 0.1, 1e-3)
        ref = R.evonorm_b0_forward(np64(x), np64(v), np64(w), np64(b), eps=1e-3)
        backward = R.evonorm_b0_backward
    else:
        y = NF.evonorm_s0(x, 2, v, w, b, 1e-3)
        ref = R.evonorm_s0_forward(np64(x), 2, np64(v), np64(w), np64(b), eps=1e-3)
        backward = R.evonorm_s0_backward
    assert "Function" in type(y.grad_fn).__name__ and y.dtype == dtype
    dy = offcenter(*shape, seed=36, loc=0.0, scale=1.0).to(dtype)
    y.backward(dy)
    assert x.grad.dtype == dtype and w.grad.dtype == v.grad.dtype == torch.float32
    # the reference sees the same (rounded) input and dy, in float64
    y_ref, cache = ref
    g = backward(np64(dy), cache)
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, g["dx"], dtype, atol=2e-2 if dtype == torch.bfloat16 else 4e-3)
    # parameter gradients are fp32 sums over fp32 statistics: far tighter than half
    for got, key in ((w.grad, "dweight"), (b.grad, "dbias"), (v.grad, "dv")):
        assert_close(got, g[key], torch.float32, rtol=1e-4, atol=1e-4)


def test_fast_functions_off_center_fp32_gradients():
    """Mean 1e4, std 1e-2 in fp32: statistics and x − mean stay accurate in backward."""
    g = torch.Generator().manual_seed(37)
    x64 = 1e4 + 1e-2 * torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    x = x64.float().requires_grad_()
    dy = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).float()
    v = torch.tensor([1e-4, -1e-4, 2e-4, 0.0], requires_grad=True)
    for kind in ("b0", "s0"):
        x.grad = v.grad = None
        if kind == "b0":
            y = NF.evonorm_b0(x, None, v, training=True, eps=1e-8)
            y_ref, cache = R.evonorm_b0_forward(np64(x), np64(v), eps=1e-8)
            grads = R.evonorm_b0_backward(np64(dy), cache)
        else:
            y = NF.evonorm_s0(x, 2, v, eps=1e-8)
            y_ref, cache = R.evonorm_s0_forward(np64(x), 2, np64(v), eps=1e-8)
            grads = R.evonorm_s0_backward(np64(dy), cache)
        y.backward(dy)
        assert_close(y, y_ref, torch.float32)
        scale = np.abs(grads["dx"]).max()
        assert_close(x.grad, grads["dx"], torch.float32, rtol=1e-4, atol=1e-4 * scale)


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
@pytest.mark.parametrize("kind", ["b0-train", "b0-eval", "s0"])
def test_fast_functions_save_only_the_input(kind, dtype):
    from normlab.functional._evonorm_autograd import b0_normalize, s0_composite

    n, c = 4, 8
    m = nnl.EvoNormS0_2d(c, groups=4) if kind == "s0" else nnl.EvoNormB0_2d(c)
    m.train(kind != "b0-eval")
    x = offcenter(n, c, 16, 16, dtype=dtype, seed=38).requires_grad_()
    x_bytes = x.numel() * x.element_size()
    small = 8 * (n * c + c) * 4  # a few fp32 per-(n, c) / per-channel vectors
    saved = _saved_bytes(lambda: m(x))
    assert x_bytes <= saved <= x_bytes + small, (saved, x_bytes)
    # The plain composites keep full-size intermediates: the bound above catches them.
    if kind == "s0":
        composite = _saved_bytes(lambda: s0_composite(x, 4, m.v, m.weight, m.bias, 1e-5))
    else:
        std = torch.ones(1, c, 1, 1)
        composite = _saved_bytes(lambda: b0_normalize(x, std, m.v, m.weight, m.bias, 1e-5))
    assert composite > x_bytes + small


def test_paths_agree_no_grad_and_torch_func():
    x = offcenter(3, 4, 3, 5, seed=39).requires_grad_()
    w, b, v = _leaves(4, True, seed=39)
    rv = _running_var(4)
    for f in (
        lambda x: NF.evonorm_s0(x, 2, v, w, b, 1e-3),
        lambda x: NF.evonorm_b0(x, rv, v, w, b, False, 0.1, 1e-3),
        lambda x: NF.evonorm_b0(x, None, v, w, b, True, 0.1, 1e-3),
    ):
        y = f(x)
        assert "Function" in type(y.grad_fn).__name__
        with torch.no_grad():  # the forward kernel alone: the same numbers
            assert torch.equal(f(x), y.detach())
        (dx,) = torch.autograd.grad(y.sum(), x)
        # torch.func runs the plain composite
        assert_close(torch.func.grad(lambda x, f=f: f(x).sum())(x.detach()), dx)


# torch's forward_ad scripts its jvp decompositions on first use (torch's own warning)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad():
    """Dual tensors take the composite (the kernels have no tangent formulas)."""
    import torch.autograd.forward_ad as fwAD

    x = offcenter(3, 4, 3, 5, seed=40)
    tangent = offcenter(3, 4, 3, 5, seed=41, loc=0.0, scale=1.0)
    w, b, v = (t.detach() for t in _leaves(4, True, seed=40))
    for f in (
        lambda x: NF.evonorm_s0(x, 2, v, w, b, 1e-3),
        lambda x: NF.evonorm_b0(x, None, v, w, b, True, 0.1, 1e-3),
    ):
        with fwAD.dual_level():
            jvp = fwAD.unpack_dual(f(fwAD.make_dual(x, tangent))).tangent
        assert_close(jvp, torch.func.jvp(f, (x,), (tangent,))[1])
