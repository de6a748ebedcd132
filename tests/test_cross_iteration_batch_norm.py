"""CrossIterationBatchNorm2d: the float64 reference, gradcheck, the authors' algorithm, BN.

The authors' oracle (tests/_cbn_oracle.py) runs the same iterations (the same data,
the same SGD updates of the convolution) as normlab's layer; with the two conventions
we changed switched to ours (ε inside the square root, the biased variance in burn-in)
outputs, running statistics and the window agree to float64 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.functional as NF
import normlab.nn as nnl
import normlab.reference as R
from _cbn_oracle import AuthorsCBN
from _models import make_model
from _testing import assert_close, np64, offcenter
from normlab.convert import convert_norms
from normlab.functional.cross_iteration_batch_norm import IterationWindow

F64 = torch.float64


def _window_from_reference(entries: list[dict], size: int) -> IterationWindow:
    """Our window (mean, variance and their gradients) from the reference's raw moments."""
    w = IterationWindow.empty(size, torch.as_tensor(entries[0]["conv_weight"]), F64)
    for i, e in enumerate(entries):
        mean, grad_mean = torch.as_tensor(e["mean"]), torch.as_tensor(e["grad_mean"])
        w.mean[i] = mean
        w.var[i] = torch.as_tensor(e["mean_sq"]) - mean.square()
        w.grad_mean[i] = grad_mean
        w.grad_var[i] = (
            torch.as_tensor(e["grad_mean_sq"]) - 2 * mean.reshape(-1, 1, 1, 1) * grad_mean
        )
        w.conv_weight[i] = torch.as_tensor(e["conv_weight"])
    w.filled.fill_(len(entries))
    return w


def _past(n: int, theta: torch.Tensor, seed: int) -> list[dict]:
    """``n`` earlier iterations: other inputs under perturbed weights (the reference's entries)."""
    out = []
    for i in range(n):
        w = theta + 0.05 * offcenter(*theta.shape, seed=seed + 2 * i, loc=0.0, scale=1.0)
        x = offcenter(2, theta.shape[1], 5, 4, seed=seed + 2 * i + 1)
        e = R.conv_moment_grads(np64(x), np64(w), padding=1)
        e["conv_weight"] = np64(w)
        out.append(e)
    return out


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_functional_matches_the_float64_reference(rho):
    theta = offcenter(4, 3, 3, 3, seed=1, loc=0.1, scale=0.3).requires_grad_()
    x_in = offcenter(2, 3, 5, 4, seed=2)
    past = _past(3, theta.detach(), seed=10)
    # One entry whose compensated variance is negative: it must be left out.
    past[1]["mean_sq"] = past[1]["mean"] ** 2 + 1e-4
    window = _window_from_reference(past, size=4)  # 3 of 4 filled
    gamma, beta = offcenter(4, seed=3, loc=1.0, scale=0.2), offcenter(4, seed=4, scale=0.5)
    gamma.requires_grad_(), beta.requires_grad_()
    rm, rv = offcenter(4, seed=5), offcenter(4, seed=6, loc=2.0, scale=0.1)
    rm0, rv0 = rm.clone(), rv.clone()
    x = F.conv2d(x_in, theta, padding=1)
    y = NF.cross_iteration_batch_norm(
        x, rm, rv, gamma, beta, True, 0.1, 1e-5, conv_weight=theta, window=window, rho=rho
    )
    y_ref, cache = R.cross_iteration_batch_norm_forward(
        np64(x), past, np64(theta), np64(gamma), np64(beta), eps=1e-5, rho=rho
    )
    assert (cache["k"] < 4).any()  # the planted entry was dropped somewhere
    assert_close(y, y_ref)
    dy = offcenter(*y.shape, seed=7, loc=0.0, scale=1.0)
    # autograd.grad, not x.retain_grad(): the layer's own backward passes for ∂μ/∂θ and
    # ∂v/∂θ run through x too, and a retained .grad would add them up (as in the authors').
    dx, dgamma, dbeta = torch.autograd.grad(y, (x, gamma, beta), dy)
    grads = R.cross_iteration_batch_norm_backward(np64(dy), cache)
    assert_close(dx, grads["dx"])
    assert_close(dgamma, grads["dweight"])
    assert_close(dbeta, grads["dbias"])
    # This batch entered the window (newest first), the others moved down one place.
    now = R.conv_moment_grads(np64(x_in), np64(theta), padding=1)
    assert int(window.filled) == 4
    assert_close(window.mean[0], now["mean"])
    assert_close(window.var[0], now["mean_sq"] - now["mean"] ** 2)
    assert_close(window.grad_mean[0], now["grad_mean"])
    grad_var = now["grad_mean_sq"] - 2 * now["mean"].reshape(-1, 1, 1, 1) * now["grad_mean"]
    assert_close(window.grad_var[0], grad_var)
    assert_close(window.conv_weight[1], past[0]["conv_weight"])
    # The running statistics are BatchNorm's, of this batch alone.
    m = x.numel() // 4
    batch_var = (now["mean_sq"] - now["mean"] ** 2) * m / (m - 1)
    assert_close(rm, 0.9 * np64(rm0) + 0.1 * now["mean"])
    assert_close(rv, 0.9 * np64(rv0) + 0.1 * batch_var)


def test_gradcheck_with_a_fixed_window():
    theta = offcenter(3, 2, 3, 3, seed=1, loc=0.1, scale=0.3).requires_grad_()
    window = _window_from_reference(_past(2, theta.detach(), seed=20), size=3)
    x_in = offcenter(2, 2, 4, 3, seed=2).requires_grad_()
    gamma = offcenter(3, seed=3, loc=1.0, scale=0.2).requires_grad_()
    beta = offcenter(3, seed=4, scale=0.5).requires_grad_()

    def f(x_in, gamma, beta):
        w = IterationWindow(*(t.clone() for t in window))  # the same window every call
        x = F.conv2d(x_in, theta, padding=1)
        return NF.cross_iteration_batch_norm(
            x, None, None, gamma, beta, True, conv_weight=theta, window=w
        )

    assert torch.autograd.gradcheck(f, (x_in, gamma, beta), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (x_in, gamma, beta), eps=1e-6, atol=1e-6)


def _pair(burnin: int, buffer_size: int, stride: int = 1, groups: int = 1):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=False).to(F64)
    ours = nnl.CrossIterationBatchNorm2d(6, buffer_size=buffer_size, burnin=burnin).to(F64)
    return conv, ours


@pytest.mark.parametrize(
    "burnin, buffer_size, stride, groups", [(0, 3, 1, 1), (2, 3, 2, 1), (3, 1, 1, 2)]
)
def test_matches_the_authors_algorithm_over_iterations(burnin, buffer_size, stride, groups):
    conv, ours = _pair(burnin, buffer_size, stride, groups)
    conv_a = copy.deepcopy(conv)
    authors = AuthorsCBN(6, buffer_size, burnin, eps_inside=True, burnin_unbiased=False)
    opt = torch.optim.SGD(conv.parameters(), lr=0.2, momentum=0.9)
    opt_a = torch.optim.SGD(conv_a.parameters(), lr=0.2, momentum=0.9)
    target = offcenter(2, 6, 5, 5 if stride == 1 else 3, seed=99)[..., : 5 // stride + 1]
    for step in range(9):
        x = offcenter(2, 4, 9, 9, seed=step, loc=1.0 + step, scale=2.0)
        y = ours(conv(x))
        y_a = authors.forward(conv_a(x), conv_a.weight)
        assert_close(y, y_a)
        for _model, out, o in ((conv, y, opt), (conv_a, y_a, opt_a)):
            o.zero_grad()
            (
                out[..., : target.shape[-1], : target.shape[-1]] * target[..., :1, :1]
            ).sum().backward()
            o.step()
        assert_close(ours.running_mean, authors.running_mean)
        assert_close(ours.running_var, authors.running_var)
        assert_close(conv.weight, conv_a.weight)
    filled = int(ours.window_filled)
    assert filled == len(authors.pre_mu) == min(buffer_size, 9 - burnin)
    mu = torch.stack(authors.pre_mu)
    assert_close(ours.window_mean[:filled], mu)
    assert_close(ours.window_var[:filled], torch.stack(authors.pre_meanx2) - mu.square())
    assert_close(ours.window_grad_mean[:filled], torch.stack(authors.pre_dmudw))
    assert_close(ours.window_conv_weight[:filled], torch.stack(authors.pre_weight))
    expected = torch.stack(authors.pre_dmeanx2dw) - 2 * mu[..., None, None, None] * torch.stack(
        authors.pre_dmudw
    )
    assert_close(ours.window_grad_var[:filled], expected)


def test_the_authors_own_conventions_differ_only_as_documented():
    # Their defaults: ε added to σ, the unbiased variance while burning in. On these
    # data both move the output by a small but visible amount; ours is BN's convention.
    conv, ours = _pair(burnin=1, buffer_size=2)
    authors = AuthorsCBN(6, 2, burnin=1)
    x = offcenter(2, 4, 9, 9, seed=0)
    y, y_a = ours(conv(x)), authors.forward(conv(x), conv.weight)
    bn = F.batch_norm(conv(x), None, None, training=True, eps=1e-5)
    assert_close(y, bn)
    assert not torch.allclose(y, y_a, atol=1e-4)
    assert torch.allclose(y, y_a, rtol=2e-2, atol=1e-3)


def test_burn_in_and_buffer_size_zero_are_batch_norm():
    for burnin, size in ((5, 3), (0, 0)):
        conv, ours = _pair(burnin, size)
        bn = nnl.BatchNorm2d(6).to(F64)
        for step in range(3):
            x = conv(offcenter(2, 4, 5, 5, seed=step))
            assert_close(ours(x), bn(x))
        assert_close(ours.running_var, bn.running_var)
        assert ours.window_filled is None


def test_state_dict_is_batch_norms_and_eval_is_batch_norm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).to(F64)
    bn(offcenter(3, 6, 4, 4, seed=1))
    cbn = nnl.CrossIterationBatchNorm2d(6).to(F64)
    assert cbn.state_dict().keys() == bn.state_dict().keys()
    cbn.load_state_dict(bn.state_dict())
    x = offcenter(2, 6, 4, 4, seed=2)
    assert_close(cbn.eval()(x), bn.eval()(x))
    assert "buffer_size=3, burnin=0, rho=1.0" in repr(cbn)


def test_the_convolution_is_found_or_given_and_its_absence_warns_once():
    conv, ours = _pair(0, 2)
    given = copy.deepcopy(ours)
    for step in range(3):
        x = offcenter(2, 4, 5, 5, seed=step)
        assert_close(ours(conv(x)), given(conv(x), conv.weight))
    assert int(ours.window_filled) == 2
    lone = nnl.CrossIterationBatchNorm2d(6).to(F64)
    x = offcenter(2, 6, 5, 5, seed=5).requires_grad_()
    with pytest.warns(RuntimeWarning, match="not the output of a convolution"):
        y = lone(x)
    assert_close(y, F.batch_norm(x, None, None, training=True))
    lone(x)  # once per layer: no second warning (warnings are errors here)
    assert lone.window_filled is None
    with pytest.raises(ValueError, match="does not depend on conv_weight"):
        lone(x, conv.weight)


def _train(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        loss = model(offcenter(2, 3, 8, 8, seed=step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_convert_norms_wires_every_layer_to_its_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)),
        nn.Sequential(nn.Conv2d(5, 6, 1, stride=2, groups=1), nn.BatchNorm2d(6)),
    )
    model, _ = convert_norms(model.to(F64), "cbn")
    layers = [m for m in model.modules() if isinstance(m, nnl.CrossIterationBatchNorm2d)]
    assert len(layers) == 3
    _train(model)
    assert all(int(m.window_filled) == 3 for m in layers)  # each found its convolution
    twin = copy.deepcopy(model)  # a copy adopts its own convolutions
    _train(twin, 1)


def test_a_layer_shared_by_two_convolutions_is_refused():
    model, _ = convert_norms(make_model(), "cbn", exclude="head.*")  # refine shares one norm
    with pytest.raises(ValueError, match="fed by more than one convolution"):
        _train(model, 1)


def test_bfloat16_autocast_keeps_float32_statistics():
    conv, ours = _pair(0, 2)
    conv, ours = conv.float(), ours.float()
    ref, ref_conv = copy.deepcopy(ours), copy.deepcopy(conv)
    for step in range(3):
        x = offcenter(2, 4, 6, 6, dtype=torch.float32, seed=step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(conv(x))
        assert y.dtype == torch.bfloat16
        assert_close(y, ref(ref_conv(x)), dtype=torch.bfloat16)
    assert ours.window_mean.dtype == torch.float32 and int(ours.window_filled) == 2


def test_bad_arguments_say_what_and_how():
    with pytest.raises(ValueError, match="buffer_size must be an int >= 0"):
        nnl.CrossIterationBatchNorm2d(4, buffer_size=-1)
    with pytest.raises(ValueError, match="rho must be a finite number"):
        nnl.CrossIterationBatchNorm2d(4, rho=float("nan"))
    x = offcenter(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        NF.cross_iteration_batch_norm(x, None, None, training=True, backend="triton")
    theta = offcenter(5, 4, 1, 1, seed=1).requires_grad_()
    window = IterationWindow.empty(2, theta, F64)
    with pytest.raises(ValueError, match="5 output channels but the input has 4"):
        NF.cross_iteration_batch_norm(
            x, None, None, training=True, conv_weight=theta, window=window
        )
    conv, ours = _pair(0, 2)
    ours(conv(offcenter(2, 4, 5, 5)))
    other = nn.Conv2d(4, 6, 1, bias=False).to(F64)
    with pytest.raises(ValueError, match="fed by more than one convolution"):
        ours(other(offcenter(2, 4, 5, 5)))
    window = IterationWindow.empty(2, conv.weight, F64)
    with pytest.raises(ValueError, match="one layer compensates one convolution"):
        NF.cross_iteration_batch_norm(
            other(offcenter(2, 4, 5, 5)),
            None,
            None,
            training=True,
            conv_weight=other.weight,
            window=window,
        )


def _synced_scenario(rank: int, world: int) -> None:
    """Each rank trains on its share of the batch; its reference, on the whole batch."""
    import torch.distributed as dist

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(F64)
    ours = nnl.CrossIterationBatchNorm2d(4, buffer_size=2, process_group="world").to(F64)
    ref_conv, ref = copy.deepcopy(conv), nnl.CrossIterationBatchNorm2d(4, buffer_size=2).to(F64)
    for step in range(4):
        x = offcenter(2 * world, 3, 5, 5, seed=step, loc=1.0 + step)
        g = offcenter(2 * world, 4, 5, 5, seed=50 + step, loc=0.0, scale=1.0)
        mine = slice(2 * rank, 2 * rank + 2)
        y, y_ref = ours(conv(x[mine])), ref(ref_conv(x))
        assert_close(y, y_ref[mine])
        (y * g[mine]).sum().backward()
        (y_ref * g).sum().backward()
        for p in (*conv.parameters(), *ours.parameters()):
            dist.all_reduce(p.grad)  # the whole batch's gradient, as DDP sums it
        for model in (conv, ours, ref_conv, ref):
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    for name in ("running_mean", "running_var", "window_mean", "window_var", "window_grad_mean"):
        assert_close(getattr(ours, name), getattr(ref, name))
    assert_close(ours.window_grad_var, ref.window_grad_var)


@pytest.mark.slow
def test_process_group_pools_the_global_batch_and_its_gradients():
    from test_distributed import run_world

    run_world(_synced_scenario, world=2)
