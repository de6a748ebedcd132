"""Switchable Normalization: reference math, functional, modules, checkpoint loader."""

from __future__ import annotations

import copy
import io
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import normlab.functional as NF
import normlab.nn as nnl
from _testing import assert_close, np64, numeric_grad, offcenter
from normlab import reference as R
from normlab.registry import create_norm

INF = float("inf")

# --------------------------------------------------------------------------- case table


@dataclass(frozen=True)
class Case:
    id: str
    shape: tuple[int, ...]
    training: bool = True
    using_bn: bool = True
    affine: bool = True
    bias: bool = True
    last_gamma: bool = False  # γ initialised to 0 (the residual-branch trick)

    @property
    def k(self) -> int:
        return (3 if len(self.shape) >= 3 else 2) - (0 if self.using_bn else 1)


CASES = [
    Case("rank4-train", (3, 4, 2, 3)),
    Case("rank4-eval", (3, 4, 2, 3), training=False),
    Case("rank2-train", (5, 3)),
    Case("rank2-eval", (4, 3), training=False),
    Case("rank3-train-nonpow2", (3, 5, 7)),
    Case("rank5-train", (2, 3, 2, 1, 3)),
    Case("rank5-eval", (2, 3, 2, 1, 3), training=False),
    Case("hw1-train", (4, 3, 1, 1)),
    Case("hw1-eval-N1", (1, 3, 1, 1), training=False),
    Case("N1-train", (1, 3, 2, 3)),
    Case("no-bn-N1", (1, 4, 3, 2), using_bn=False),
    Case("no-bn-rank2-N1", (1, 5), using_bn=False),
    Case("no-affine", (2, 3, 3, 2), affine=False),
    Case("weight-only", (2, 3, 3, 2), bias=False),
]


def make_inputs(case: Case, seed: int | None = None):
    """fp64 numpy inputs for a case: x, logits, weight, bias, running stats."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()) if seed is None else seed)
    x = 3.0 + 2.0 * rng.standard_normal(case.shape)
    lm, lv = rng.standard_normal(case.k), rng.standard_normal(case.k)
    c = case.shape[1]
    w = 1.0 + 0.5 * rng.standard_normal(c) if case.affine else None
    if w is not None and case.last_gamma:
        w = np.zeros(c)
    b = rng.standard_normal(c) if case.affine and case.bias else None
    rm = rv = None
    if case.using_bn and not case.training:
        rm, rv = 3.0 + rng.standard_normal(c), 2.0 + rng.random(c)
    return x, lm, lv, w, b, rm, rv


def ref_forward(case: Case, x, lm, lv, w, b, rm, rv):
    return R.switchable_norm_forward(
        x,
        lm,
        lv,
        w,
        b,
        running_mean=rm,
        running_var=rv,
        training=case.training,
        using_bn=case.using_bn,
    )


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_backward_matches_finite_differences(case: Case) -> None:
    x, lm, lv, w, b, rm, rv = make_inputs(case)
    y, cache = ref_forward(case, x, lm, lv, w, b, rm, rv)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    r = np.random.default_rng(7).standard_normal(y.shape)
    grads = R.switchable_norm_backward(r, cache)

    def loss() -> float:
        return float(np.sum(ref_forward(case, x, lm, lv, w, b, rm, rv)[0] * r))

    for key, a in (
        ("dx", x),
        ("dmean_weight", lm),
        ("dvar_weight", lv),
        ("dweight", w),
        ("dbias", b),
    ):
        if a is None:
            assert grads[key] is None, key
            continue
        num = numeric_grad(loss, a)
        atol = 1e-7 * max(1.0, float(np.abs(num).max()))
        np.testing.assert_allclose(grads[key], num, rtol=1e-6, atol=atol, err_msg=key)


def test_reference_moments_are_exact_group_moments() -> None:
    """One-hot logits select exactly the IN / LN / BN references (and GN(1) = LN)."""
    rng = np.random.default_rng(3)
    x = 3.0 + 2.0 * rng.standard_normal((3, 4, 2, 3))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    onehot = [np.array([0.0, -np.inf, -np.inf]), np.array([-np.inf, 0.0, -np.inf])]
    onehot.append(np.array([-np.inf, -np.inf, 0.0]))
    expected = [
        R.instance_norm_forward(x, w, b)[0],
        R.group_norm_forward(x, 1, w, b)[0],
        R.batch_norm_forward(x, w, b)[0],
    ]
    for logits, exp in zip(onehot, expected, strict=True):
        y, _ = R.switchable_norm_forward(x, logits, logits, w, b)
        np.testing.assert_allclose(y, exp, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- functional vs reference


def torch_inputs(case: Case, dtype=torch.float64):
    arrays = make_inputs(case)
    ts = [None if a is None else torch.tensor(a, dtype=dtype) for a in arrays]
    for t in ts[:5]:
        if t is not None:
            t.requires_grad_(True)
    return arrays, ts


def run_functional(case: Case, x, lm, lv, w, b, rm, rv, **kw):
    return NF.switchable_norm(
        x,
        lm,
        lv,
        w,
        b,
        running_mean=rm,
        running_var=rv,
        training=case.training,
        using_bn=case.using_bn,
        **kw,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_functional_matches_reference_forward_and_all_grads(case: Case) -> None:
    arrays, (x, lm, lv, w, b, rm, rv) = torch_inputs(case)
    y = run_functional(case, x, lm, lv, w, b, rm, rv)
    y_ref, cache = ref_forward(case, *arrays)
    assert_close(y, y_ref)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy)
    grads = R.switchable_norm_backward(np64(dy), cache)
    for key, t in (
        ("dx", x),
        ("dmean_weight", lm),
        ("dvar_weight", lv),
        ("dweight", w),
        ("dbias", b),
    ):
        if t is None:
            assert grads[key] is None
        else:
            assert_close(t.grad, grads[key])


@pytest.mark.parametrize(
    "case",
    [Case("gc-rank4", (2, 3, 2, 2)), Case("gc-rank4-eval", (2, 3, 1, 2), training=False)]
    + [Case("gc-rank2", (3, 4)), Case("gc-no-bn", (1, 3, 2, 1), using_bn=False)],
    ids=lambda c: c.id,
)
def test_gradcheck(case: Case) -> None:
    _, (x, lm, lv, w, b, rm, rv) = torch_inputs(case)

    def fn(x, lm, lv, w, b):
        return run_functional(case, x, lm, lv, w, b, rm, rv)

    assert torch.autograd.gradcheck(fn, (x, lm, lv, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, lm, lv, w, b))


@pytest.mark.parametrize("shape", [(3, 4, 2, 3), (5, 3), (2, 3, 1, 1), (2, 3, 2, 1, 2)])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_running_stats_update_matches_reference(shape, momentum) -> None:
    x = offcenter(*shape, seed=1)
    c = shape[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    k = 3 if len(shape) >= 3 else 2
    logits = torch.randn(k, dtype=torch.float64)
    NF.switchable_norm(x, logits, logits, running_mean=rm, running_var=rv, momentum=momentum)
    em, ev, _ = R.batch_norm_update_running(np64(x), np.zeros(c), np.ones(c), momentum=momentum)
    assert_close(rm, em)
    assert_close(rv, ev)


# ------------------------------------------------------------ the fused autograd.Function
#
# NF.switchable_norm runs a hand-written autograd.Function (normlab.functional.
# _sn_autograd) in eager mode and the plain autograd graph under torch.compile,
# torch.func, tracing and for a double backward. These tests check that the
# fused path is the one taken, and compare it with the float64 reference and
# with the plain path, on fresh random off-center data, for every option.

FUSED_CASES = CASES + [
    Case("last-gamma", (3, 4, 3, 2), last_gamma=True),
    Case("last-gamma-eval", (2, 4, 3, 2), training=False, last_gamma=True),
    Case("rank3-eval", (3, 5, 4), training=False),
    Case("rank5-no-bn", (2, 3, 2, 2, 3), using_bn=False),
    Case("rank5-no-affine-eval", (2, 3, 2, 1, 2), training=False, affine=False),
    Case("rank2-no-affine", (6, 4), affine=False),
    Case("rank2-weight-only-eval", (3, 4), training=False, bias=False),
    Case("hw1-no-bn", (3, 4, 1, 1), using_bn=False),
    Case("N1-hw1-no-bn", (1, 3, 1, 1), using_bn=False),
    Case("odd-sizes", (5, 7, 3, 5)),
]


def _fused(y: torch.Tensor) -> bool:
    """Whether ``y`` came out of the fused Function (through the squeeze of an (N, C) input)."""
    fn = y.grad_fn
    if type(fn).__name__.startswith("SqueezeBackward"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__.startswith("SwitchableNormFunction")


@pytest.mark.parametrize("seed", [101, 202])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_fused_function_matches_reference_on_fresh_data(case: Case, seed: int) -> None:
    arrays = make_inputs(case, seed=seed)
    x, lm, lv, w, b, rm, rv = (None if a is None else torch.tensor(a) for a in arrays)
    leaves = [t.requires_grad_() for t in (x, lm, lv, w, b) if t is not None]
    if case.using_bn and case.training:  # the BN branch also updates running statistics
        rm, rv = torch.zeros(case.shape[1], dtype=x.dtype), torch.ones(case.shape[1], dtype=x.dtype)
    y = run_functional(case, x, lm, lv, w, b, rm, rv, momentum=0.3)
    assert _fused(y), type(y.grad_fn).__name__
    ref_arrays = arrays[:5] + ((None, None) if case.training else arrays[5:])
    y_ref, cache = ref_forward(case, *ref_arrays)
    assert_close(y, y_ref)
    dy = offcenter(*case.shape, seed=seed + 1, loc=0.5, scale=1.0)
    grads = torch.autograd.grad(y, leaves, dy)
    ref = R.switchable_norm_backward(np64(dy), cache)
    keys = [k for k, t in zip(("dx", "dmean_weight", "dvar_weight", "dweight", "dbias"),
                              (x, lm, lv, w, b), strict=True) if t is not None]  # fmt: skip
    for key, g in zip(keys, grads, strict=True):
        assert_close(g, ref[key], msg=key)
    if case.using_bn and case.training:
        em, ev, _ = R.batch_norm_update_running(
            np64(x), np.zeros(case.shape[1]), np.ones(case.shape[1]), momentum=0.3
        )
        assert_close(rm, em)
        assert_close(rv, ev)


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_fused_function_equals_plain_autograd_path(case: Case) -> None:
    """Same values as the plain graph the compiler/functorch path uses, to rounding."""
    from normlab.functional.switchable_norm import _switchable_norm_autograd

    arrays = make_inputs(case, seed=303)
    outs = []
    for fused in (True, False):
        x, lm, lv, w, b, rm, rv = (None if a is None else torch.tensor(a) for a in arrays)
        leaves = [t.requires_grad_() for t in (x, lm, lv, w, b) if t is not None]
        args = (x, lm, lv, w, b, rm, rv, case.training, 0.1, 1e-5, case.using_bn, None)
        y = run_functional(case, *args[:7]) if fused else _switchable_norm_autograd(*args)
        assert _fused(y) == fused
        dy = offcenter(*case.shape, seed=7, loc=0.0, scale=1.0)
        outs.append([y, *torch.autograd.grad(y, leaves, dy)])
    for a, e in zip(*outs, strict=True):
        assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        Case("gc-rank3", (2, 3, 4)),
        Case("gc-rank5-eval", (2, 2, 2, 1, 2), training=False),
        Case("gc-hw1", (3, 2, 1, 1)),
        Case("gc-no-affine", (2, 3, 2, 2), affine=False),
        Case("gc-last-gamma", (2, 3, 2, 2), last_gamma=True),
        Case("gc-rank2-eval-no-bn", (3, 4), using_bn=False, training=False),
    ],
    ids=lambda c: c.id,
)
def test_gradcheck_fused_function(case: Case) -> None:
    """First derivatives of every input (logits included) by the hand-written backward."""
    _, (x, lm, lv, w, b, rm, rv) = torch_inputs(case)
    inputs = tuple(t for t in (x, lm, lv, w, b) if t is not None)

    def fn(*args):
        it = iter(args)
        x_, lm_, lv_ = next(it), next(it), next(it)
        w_ = next(it) if w is not None else None
        b_ = next(it) if b is not None else None
        y = run_functional(case, x_, lm_, lv_, w_, b_, rm, rv)
        assert _fused(y)
        return y

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("cls,shape", [(nnl.SwitchableNorm2d, (3, 5, 4, 3)),
                                       (nnl.SwitchableNorm3d, (2, 4, 3, 2, 3))])  # fmt: skip
def test_fused_module_channels_last_momentum_none_matches_reference(cls, shape) -> None:
    """Module path, channels_last input, cumulative running averages, three steps, then eval."""
    c = shape[1]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    m = cls(c, momentum=None).double()
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.3, -0.4, 0.2]))
        m.var_weight.copy_(torch.tensor([-0.2, 0.1, 0.5]))
        m.weight.copy_(offcenter(c, seed=50, loc=1.0, scale=0.3))
        m.bias.copy_(offcenter(c, seed=51, loc=0.0, scale=0.3))
    rm, rv = np.zeros(c), np.ones(c)
    p = [np64(t) for t in (m.mean_weight, m.var_weight, m.weight, m.bias)]
    for step in range(4):
        training = step < 3
        m.train(training)
        x = offcenter(*shape, seed=52 + step).contiguous(memory_format=fmt).requires_grad_()
        y = m(x)
        assert _fused(y) and y.is_contiguous(memory_format=fmt)
        run = {} if training else dict(running_mean=rm, running_var=rv)
        y_ref, cache = R.switchable_norm_forward(np64(x), *p, training=training, **run)
        assert_close(y, y_ref)
        dy = offcenter(*shape, seed=60 + step, loc=0.0, scale=1.0)
        grads = torch.autograd.grad(y, (x, m.mean_weight, m.var_weight, m.weight), dy)
        ref = R.switchable_norm_backward(np64(dy), cache)
        for key, g in zip(("dx", "dmean_weight", "dvar_weight", "dweight"), grads, strict=True):
            assert_close(g, ref[key], msg=key)
        if training:
            rm, rv, _ = R.batch_norm_update_running(
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


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_the_input_and_per_sample_channel_statistics(training, dtype) -> None:
    from normlab.functional.switchable_norm import _switchable_norm_autograd

    n, c = 4, 8
    x = offcenter(n, c, 16, 16, seed=40, dtype=dtype).requires_grad_()
    m = nnl.SwitchableNorm2d(c).train(training)
    total, largest = _saved_bytes(lambda: m(x))
    assert largest == x.numel() * x.element_size()  # x itself, nothing bigger, no fp32 copy
    small = total - largest
    assert small <= 20 * n * c * 4 + 64 * 8, small  # ~a dozen (N, C) fp32 matrices
    # The plain graph saves several full-size tensors: this test tells them apart.
    args = (m.mean_weight, m.var_weight, m.weight, m.bias, m.running_mean.clone(),
            m.running_var.clone(), training, 0.1, 1e-5, True, None)  # fmt: skip
    plain, _ = _saved_bytes(lambda: _switchable_norm_autograd(x, *args))
    assert plain > 2 * x.numel() * x.element_size()


def test_fused_backward_accurate_on_ct_like_data() -> None:
    """fp32 data of mean 1e4 and std 1e-2: the gradients keep fp32 accuracy (pivot shift)."""
    shape, c = (4, 6, 7, 5), 6
    x64 = offcenter(*shape, seed=41, loc=1e4, scale=1e-2).float().double()
    dy = offcenter(*shape, seed=42, loc=0.0, scale=1.0)
    results = []
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        lm = torch.tensor([0.3, -0.2, 0.1], dtype=dtype, requires_grad=True)
        lv = torch.tensor([-0.1, 0.4, 0.2], dtype=dtype, requires_grad=True)
        w = torch.linspace(0.5, 1.5, c, dtype=dtype, requires_grad=True)
        y = NF.switchable_norm(x, lm, lv, w, running_mean=torch.zeros(c, dtype=dtype),
                               running_var=torch.ones(c, dtype=dtype))  # fmt: skip
        results.append([y, *torch.autograd.grad(y, (x, lm, lv, w), dy.to(dtype))])
    assert results[1][0].abs().max() > 0.5  # O(1) output: not flattened by eps
    for a, e in zip(*results, strict=True):
        assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.detach().abs().max()))


def test_outlier_pivot_keeps_the_variance_exact() -> None:
    """The pivot is the first element of each group; an outlier there must not cancel digits."""
    x = offcenter(3, 4, 6, 6, seed=43, loc=0.0, scale=1.0)
    x[:, :, 0, 0] = 3e3  # the pivot, 3000 std away from the rest of its group
    y64 = NF.switchable_norm(x, torch.zeros(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype))
    x32 = x.float().requires_grad_()
    y32 = NF.switchable_norm(x32, torch.zeros(3), torch.zeros(3))
    assert _fused(y32)
    assert_close(y32, y64, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_input_fused_gradients(dtype, training) -> None:
    """Half input, fp32 statistics: values and gradients match fp64 on the same rounded input."""
    c = 5
    x_half = offcenter(3, c, 4, 6, seed=44, dtype=dtype)
    dy = offcenter(3, c, 4, 6, seed=45, loc=0.0, scale=1.0, dtype=dtype)
    outs = []
    for x in (x_half, x_half.double()):
        x = x.detach().requires_grad_()
        m = nnl.SwitchableNorm2d(c, dtype=torch.float64 if x.dtype == torch.float64 else None)
        with torch.no_grad():
            m.mean_weight.copy_(torch.tensor([0.2, -0.1, 0.4]))
            m.var_weight.copy_(torch.tensor([-0.3, 0.1, 0.2]))
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.running_mean.fill_(3.0)
            m.running_var.fill_(4.0)
        y = m.train(training)(x)
        assert y.dtype == x.dtype
        outs.append(
            [y, *torch.autograd.grad(y, (x, m.mean_weight, m.var_weight, m.weight), dy.to(x.dtype))]
        )
    for a, e in zip(*outs, strict=True):
        assert_close(a, e, dtype, atol=2e-2 * max(1.0, float(e.detach().abs().max())))


def test_a_wrong_backward_is_caught(monkeypatch) -> None:
    """The comparison above can fail: drop the LN variance term of the mixing adjoint."""
    import normlab.functional._sn_autograd as fused

    real = fused._mix_backward

    def wrong(d_mean, d_var, saved, names, bn_mode):
        d_mu, d_v, d_lm, d_lv = real(d_mean, d_var, saved, names, bn_mode)
        return (
            d_mu - 2.0 * d_var.sum(1, keepdim=True) / d_var.shape[1] * saved["dev_ln"],
            d_v,
            d_lm,
            d_lv,
        )

    monkeypatch.setattr(fused, "_mix_backward", wrong)
    with pytest.raises(AssertionError):
        test_fused_function_matches_reference_on_fresh_data(Case("wrong", (3, 4, 2, 3)), 101)


# --------------------------------------------------------------------------- one-hot = BN / IN / LN


def onehot(i: int, k: int = 3, dtype=torch.float64) -> torch.Tensor:
    t = torch.full((k,), -INF, dtype=dtype)
    t[i] = 0.0
    return t


@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (1, 4, 3, 2), (2, 3, 2, 1, 3)])
def test_onehot_in_and_ln_equal_instance_and_layer_norm(shape) -> None:
    x = offcenter(*shape, seed=2)
    c = shape[1]
    w, b = offcenter(c, seed=3), offcenter(c, seed=4)
    for training in (True, False):
        run = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        kw = dict(training=training, running_mean=run[0], running_var=run[1])
        if shape[0] == 1 and training:
            kw = dict(using_bn=False)
            in_, ln_ = onehot(0, 2), onehot(1, 2)
        else:
            in_, ln_ = onehot(0), onehot(1)
        y_in = NF.switchable_norm(x, in_, in_, w, b, **kw)
        assert_close(y_in, NF.instance_norm(x, weight=w, bias=b))
        tin = nn.InstanceNorm3d if x.dim() == 5 else nn.InstanceNorm2d
        tin = tin(c, affine=True).double()
        with torch.no_grad():
            tin.weight.copy_(w)
            tin.bias.copy_(b)
        assert_close(y_in, tin(x))
        y_ln = NF.switchable_norm(x, ln_, ln_, w, b, **kw)
        assert_close(y_ln, NF.group_norm(x, 1, w, b))
        assert_close(y_ln, nn.functional.group_norm(x, 1, w, b))
        y_ln0 = NF.switchable_norm(x, ln_, ln_, **kw)
        assert_close(y_ln0, nn.functional.layer_norm(x, x.shape[1:]))
        assert_close(y_ln0, NF.layer_norm(x, x.shape[1:]))


@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (6, 5), (2, 3, 1, 1)])
def test_onehot_bn_equals_batch_norm_train_and_eval(shape) -> None:
    x = offcenter(*shape, seed=5)
    c = shape[1]
    w, b = offcenter(c, seed=6), offcenter(c, seed=7)
    k = 3 if len(shape) >= 3 else 2
    bn_ = onehot(k - 1, k)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    trm, trv = rm.clone(), rv.clone()
    y = NF.switchable_norm(x, bn_, bn_, w, b, running_mean=rm, running_var=rv, training=True)
    y_t = nn.functional.batch_norm(x, trm, trv, w, b, True, 0.1, 1e-5)
    assert_close(y, y_t)
    assert_close(y, NF.batch_norm(x, None, None, w, b, True))
    assert_close(rm, trm)
    assert_close(rv, trv)
    y = NF.switchable_norm(x, bn_, bn_, w, b, running_mean=rm, running_var=rv, training=False)
    assert_close(y, nn.functional.batch_norm(x, trm, trv, w, b, False, 0.1, 1e-5))
    # mixing the mean from BN and the variance from IN is neither, but still exact math
    y_ref, _ = R.switchable_norm_forward(np64(x), np64(bn_), np64(onehot(0, k)), np64(w), np64(b))
    assert_close(NF.switchable_norm(x, bn_, onehot(0, k), w, b), y_ref)


@pytest.mark.parametrize("cls,shape", [(nnl.SwitchableNorm2d, (4, 3, 5, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_onehot_bn_tracks_like_torch_batchnorm(cls, shape, momentum) -> None:
    c = shape[1]
    sn = cls(c, momentum=momentum).double()
    bn = nn.BatchNorm2d(c, momentum=momentum).double()
    with torch.no_grad():
        sn.mean_weight.copy_(onehot(2))
        sn.var_weight.copy_(onehot(2))
        for m in (sn, bn):
            m.weight.copy_(offcenter(c, seed=8))
            m.bias.copy_(offcenter(c, seed=9))
    for step in range(5):
        x = offcenter(*shape, seed=10 + step)
        assert_close(sn(x), bn(x))
    for name in ("running_mean", "running_var"):
        assert_close(getattr(sn, name), getattr(bn, name))
    assert int(sn.num_batches_tracked) == int(bn.num_batches_tracked) == 5
    sn.eval()
    bn.eval()
    x = offcenter(*shape, seed=99)
    assert_close(sn(x), bn(x))


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape", [(4, 3, 1, 1), (3, 5, 1), (2, 3, 1, 1, 1), (4, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_hw1_gives_no_nan(shape, training) -> None:
    x = offcenter(*shape, seed=11, dtype=torch.float32).requires_grad_(True)
    k = 3 if len(shape) >= 3 else 2
    lm = torch.zeros(k, requires_grad=True)
    lv = torch.zeros(k, requires_grad=True)
    c = shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    y = NF.switchable_norm(x, lm, lv, running_mean=rm, running_var=rv, training=training)
    y.square().sum().backward()
    for t in (y, x.grad, lm.grad, lv.grad, rm, rv):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 7, 5), (8, 5)])
def test_offcenter_fp32_matches_fp64(training, shape) -> None:
    c = shape[1]
    # CT-like data: mean 1e4, std 1e-2, with small per-channel offsets
    x = offcenter(*shape, seed=12, loc=1e4, scale=1e-2).float()
    x = x + 1e-2 * torch.arange(c, dtype=torch.float32).reshape([1, c] + [1] * (len(shape) - 2))
    k = 3 if len(shape) >= 3 else 2
    logits = torch.tensor([0.3, -0.2, 0.1][-k:])
    rm = x.double().mean(dim=[d for d in range(len(shape)) if d != 1]).float()
    rv = torch.full((c,), 2e-4)
    kw = dict(running_mean=rm.clone(), running_var=rv.clone(), training=training)
    y32 = NF.switchable_norm(x, logits, logits + 0.5, **kw)
    kw64 = dict(running_mean=rm.double(), running_var=rv.double(), training=training)
    y64 = NF.switchable_norm(x.double(), logits.double(), logits.double() + 0.5, **kw64)
    assert y64.abs().max() > 0.5  # the output is O(1), not flattened by eps
    assert_close(y32, y64, rtol=1e-3, atol=1e-3)
    if training:
        assert_close(kw["running_mean"], kw64["running_mean"], rtol=1e-6, atol=0)
        assert_close(kw["running_var"], kw64["running_var"], rtol=1e-3, atol=0)


def test_channels_last_same_values_and_grads() -> None:
    x = offcenter(3, 5, 4, 6, seed=13)
    xcl = x.contiguous(memory_format=torch.channels_last)
    outs = []
    for inp in (x, xcl):
        inp = inp.detach().requires_grad_(True)
        sn = nnl.SwitchableNorm2d(5).double()
        y = sn(inp)
        y.backward(torch.ones_like(y) * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape))
        outs.append((y, inp.grad, sn.mean_weight.grad, sn.running_var))
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(outs[0], outs[1], strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_inputs_with_fp32_statistics(dtype, training) -> None:
    x = offcenter(4, 6, 5, 3, seed=14, dtype=dtype)
    sn_half, sn_ref = nnl.SwitchableNorm2d(6), nnl.SwitchableNorm2d(6).double()
    with torch.no_grad():
        for m in (sn_half, sn_ref):
            m.mean_weight.copy_(torch.tensor([0.2, -0.1, 0.4]))
            m.var_weight.copy_(torch.tensor([-0.3, 0.1, 0.2]))
            m.running_mean.fill_(3.0)
            m.running_var.fill_(4.0)
    sn_half.train(training)
    sn_ref.train(training)
    y = sn_half(x)
    y_ref = sn_ref(x.double())
    assert y.dtype == dtype
    assert sn_half.running_mean.dtype == torch.float32
    assert_close(y, y_ref, dtype)
    assert_close(sn_half.running_var, sn_ref.running_var, torch.float32)


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    "cls,shape,k",
    [
        (nnl.SwitchableNorm1d, (5, 4), 2),
        (nnl.SwitchableNorm2d, (2, 4, 3, 5), 3),
        (nnl.SwitchableNorm3d, (2, 4, 2, 3, 1), 3),
    ],
)
def test_module_matches_functional_and_parameters(cls, shape, k) -> None:
    m = cls(4).double()
    assert m.mean_weight.shape == m.var_weight.shape == (k,)
    assert torch.equal(m.mean_weight, torch.ones(k, dtype=torch.float64))
    assert torch.equal(m.weight, torch.ones(4, dtype=torch.float64))
    assert torch.equal(m.bias, torch.zeros(4, dtype=torch.float64))
    assert m.running_mean.shape == (4,) and m.running_var.shape == (4,)
    x = offcenter(*shape, seed=15)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    logits = torch.ones(k, dtype=torch.float64)
    y = m(x)
    assert_close(y, NF.switchable_norm(x, logits, logits, running_mean=rm, running_var=rv))
    assert_close(m.running_mean, rm)
    m.eval()
    assert_close(m(x), NF.switchable_norm(x, logits, logits, running_mean=rm, running_var=rv,
                                          training=False))  # fmt: skip
    lg = cls(4, last_gamma=True, using_bn=False)
    assert torch.equal(lg.weight, torch.zeros(4))
    assert lg.mean_weight.shape == (k - 1,)
    assert lg.running_mean is None and not lg.track_running_stats
    assert lg(x.float()).abs().max() == 0  # γ = 0, β = 0
    m.reset_parameters()
    assert torch.equal(m.running_var, torch.ones(4, dtype=torch.float64))


def test_module_eval_without_running_stats_uses_batch() -> None:
    x = offcenter(3, 4, 2, 2, seed=16)
    m = nnl.SwitchableNorm2d(4, track_running_stats=False).double().eval()
    assert m.running_mean is None
    logits = torch.ones(3, dtype=torch.float64)
    assert_close(m(x), NF.switchable_norm(x, logits, logits, training=True))
    with pytest.raises(ValueError, match="more than 1 value"):
        m(offcenter(1, 4, 1, 1, seed=1))


def test_module_eval_uses_running_bn_but_per_sample_in_ln() -> None:
    m = nnl.SwitchableNorm2d(3).double()
    for s in range(3):
        m(offcenter(4, 3, 4, 4, seed=20 + s))
    m.eval()
    x = offcenter(2, 3, 4, 4, seed=30)
    y_ref, _ = R.switchable_norm_forward(
        np64(x),
        np.ones(3),
        np.ones(3),
        np64(m.weight),
        np64(m.bias),
        running_mean=np64(m.running_mean),
        running_var=np64(m.running_var),
        training=False,
    )
    assert_close(m(x), y_ref)
    # each sample is normalized independently of the others in eval
    assert_close(m(x[:1]), m(x)[:1])


def test_state_dict_round_trip_repr_deepcopy_and_save_load() -> None:
    m = nnl.SwitchableNorm2d(6, momentum=0.2, last_gamma=True)
    m(offcenter(3, 6, 4, 4, seed=17, dtype=torch.float32))
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    sd = m.state_dict()
    assert set(sd) == {
        "weight",
        "bias",
        "mean_weight",
        "var_weight",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    m2 = nnl.SwitchableNorm2d(6, momentum=0.2, last_gamma=True)
    m2.load_state_dict(sd)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m3 = nnl.SwitchableNorm2d(6, momentum=0.2, last_gamma=True)
    m3.load_state_dict(torch.load(buf, weights_only=True))
    m4 = copy.deepcopy(m)
    x = offcenter(2, 6, 3, 3, seed=18, dtype=torch.float32)
    for other in (m2, m3, m4):
        for key, value in other.state_dict().items():
            assert torch.equal(value, sd[key]), key
        other.eval()
    m.eval()
    for other in (m2, m3, m4):
        assert torch.equal(other(x), m(x))
    assert repr(m) == (
        "SwitchableNorm2d(6, eps=1e-05, momentum=0.2, using_bn=True, last_gamma=True, "
        "affine=True, track_running_stats=True)"
    )
    assert "using_bn=False" in repr(nnl.SwitchableNorm1d(3, using_bn=False))


def test_registry_and_factory_kwargs() -> None:
    m = create_norm("sn", 8, dtype=torch.float64)
    assert isinstance(m, nnl.SwitchableNorm2d)
    assert m.mean_weight.dtype == m.running_mean.dtype == torch.float64
    assert m.components == ("in", "ln", "bn")
    assert nnl.SwitchableNorm1d(3).components == ("ln", "bn")


# --------------------------------------------------------------------------- paper checkpoints


def paper_state_dict(c: int, rank: int, using_bn: bool = True, seed: int = 0):
    """A synthetic state_dict with the shapes of the official ``SwitchNorm{1,2,3}d``."""
    g = torch.Generator().manual_seed(seed)
    pshape = (1, c) + (1,) * (rank - 2)
    k = (3 if rank >= 3 else 2) - (0 if using_bn else 1)
    if rank == 2:
        k = 2  # the official SwitchNorm1d has no using_bn option
    sd = {
        "weight": torch.randn(pshape, generator=g),
        "bias": torch.randn(pshape, generator=g),
        "mean_weight": torch.randn(k, generator=g),
        "var_weight": torch.randn(k, generator=g),
    }
    if using_bn:
        rshape = (1, c) if rank == 2 else (1, c, 1)
        sd["running_mean"] = torch.randn(rshape, generator=g)
        sd["running_var"] = torch.rand(rshape, generator=g) + 0.5
    return sd


@pytest.mark.parametrize(
    "cls,rank,using_bn",
    [
        (nnl.SwitchableNorm1d, 2, True),
        (nnl.SwitchableNorm2d, 4, True),
        (nnl.SwitchableNorm2d, 4, False),
        (nnl.SwitchableNorm3d, 5, True),
    ],
)
def test_load_paper_checkpoint(cls, rank, using_bn) -> None:
    c = 5
    sd = paper_state_dict(c, rank, using_bn)
    m = cls(c, using_bn=using_bn)
    nnl.load_reference_switchnorm_state_dict(m, sd)
    for key, value in sd.items():
        assert torch.equal(getattr(m, key), value.reshape(getattr(m, key).shape)), key
    assert int(m.num_batches_tracked if using_bn else 0) == 0
    # a whole model's state_dict, with a DataParallel prefix
    full = {f"module.layer1.sn.{k}": v for k, v in sd.items()}
    full["module.layer1.conv.weight"] = torch.zeros(3)
    m2 = cls(c, using_bn=using_bn)
    nnl.load_reference_switchnorm_state_dict(m2, full, prefix="module.layer1.sn.")
    for key in sd:
        assert torch.equal(getattr(m2, key), getattr(m, key))
    # the loaded layer computes our eval forward with the loaded statistics
    m.eval()
    shape = (3, c) + (2, 3, 1)[: rank - 2]
    x = offcenter(*shape, seed=19, dtype=torch.float32)
    y_ref, _ = R.switchable_norm_forward(
        np64(x),
        np64(m.mean_weight),
        np64(m.var_weight),
        np64(m.weight),
        np64(m.bias),
        running_mean=np64(m.running_mean),
        running_var=np64(m.running_var),
        training=False,
        using_bn=using_bn,
    )
    assert_close(m(x), y_ref, torch.float32)


def test_load_paper_checkpoint_errors() -> None:
    sd = paper_state_dict(4, 4)
    with pytest.raises(ValueError, match="using_bn"):
        nnl.load_reference_switchnorm_state_dict(nnl.SwitchableNorm2d(4, using_bn=False), sd)
    with pytest.raises(ValueError, match="num_features=4"):
        nnl.load_reference_switchnorm_state_dict(nnl.SwitchableNorm2d(6), sd)
    with pytest.raises(ValueError, match="missing keys"):
        nnl.load_reference_switchnorm_state_dict(nnl.SwitchableNorm2d(4), {"weight": sd["weight"]})
    with pytest.raises(ValueError, match="affine=True"):
        nnl.load_reference_switchnorm_state_dict(nnl.SwitchableNorm2d(4, affine=False), sd)
    with pytest.raises(ValueError, match="mixes 2 normalizers"):
        nnl.load_reference_switchnorm_state_dict(nnl.SwitchableNorm1d(4), paper_state_dict(4, 4))


# --------------------------------------------------------------------------- bad input


def test_bad_input_errors() -> None:
    m = nnl.SwitchableNorm2d(4)
    with pytest.raises(ValueError, match=r"SwitchableNorm2d.*4-D"):
        m(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="num_features=4"):
        m(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="SwitchableNorm1d"):
        nnl.SwitchableNorm1d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        nnl.SwitchableNorm2d(4, eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        NF.switchable_norm(torch.randn(2, 4, 3, 3), torch.ones(3), torch.ones(3), eps=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    # BN branch with one value per channel in training: clear error, with alternatives
    for bad in (torch.randn(1, 4, 1, 1), torch.randn(1, 4)):
        layer = nnl.SwitchableNorm2d(4) if bad.dim() == 4 else nnl.SwitchableNorm1d(4)
        with pytest.raises(ValueError, match="more than 1 value per channel.*GroupNorm"):
            layer(bad)
        assert torch.isfinite(layer.eval()(bad)).all()  # eval: running statistics
    out = nnl.SwitchableNorm2d(4, using_bn=False)(torch.randn(1, 4, 1, 1))
    assert torch.isfinite(out).all()
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"mean_weight has shape \(2,\), expected \(3,\)"):
        NF.switchable_norm(x, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="training=False"):
        NF.switchable_norm(x, torch.ones(3), torch.ones(3), training=False)
    with pytest.raises(ValueError, match="using_bn=False"):
        NF.switchable_norm(
            x, torch.ones(2), torch.ones(2), running_mean=torch.zeros(4), using_bn=False
        )
    with pytest.raises(ValueError, match="weight has shape"):
        NF.switchable_norm(x, torch.ones(3), torch.ones(3), torch.ones(5))
    with pytest.raises(ValueError, match="at least|expected an"):
        NF.switchable_norm(torch.randn(4), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="backend"):
        NF.switchable_norm(x, torch.ones(3), torch.ones(3), backend="cuda")


# --------------------------------------------------------------------------- training


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nnl.SwitchableNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False),
            nnl.SwitchableNorm2d(8, last_gamma=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8, 16), nnl.SwitchableNorm1d(16), nn.ReLU())
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.body(x)))


@pytest.mark.slow
def test_short_training_drives_loss_down() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(16, 3, 8, 8, generator=g)
    target = torch.randint(0, 4, (16,), generator=g)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    try:
        for _ in range(200):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
    # the importance logits were trained
    sn = model.body[1]
    assert not torch.equal(sn.mean_weight.detach(), torch.ones(3))
    model.eval()
    assert torch.isfinite(model(x)).all()
