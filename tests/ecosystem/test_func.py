"""``torch.func``: functional_call for every layer, vmap over parameter sets, clear refusals."""

from __future__ import annotations

import pytest
import torch
from _eco_cases import BY_NAME, CASES, make_input
from torch.func import functional_call, stack_module_state, vmap

import normlab.nn as nnl
from _testing import assert_close


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_functional_call_matches_module(case):
    m = case.build().eval()
    other = case.build()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    x = make_input(case)
    assert_close(functional_call(m, state, (x,)), other.eval()(x), torch.float32)


VMAP_CASES = [c for c in CASES if c.batch_independent or c.vmap_eval_only]


@pytest.mark.parametrize("case", VMAP_CASES, ids=lambda c: c.name)
def test_vmap_over_parameter_sets(case):
    """One input, K parameter sets: vmap equals a loop over the K modules."""
    modules = [case.build().train(case.batch_independent) for _ in range(3)]
    with torch.no_grad():
        for k, m in enumerate(modules):
            for p in m.parameters():
                p.mul_(1.0 + 0.25 * k)
    params, buffers = stack_module_state(modules)
    x = make_input(case)
    base = case.build().train(case.batch_independent)

    def f(p, b):
        return functional_call(base, (p, b), (x,))

    if not params and not buffers:  # LocalResponseNorm: vmap over inputs instead
        xs = torch.stack([make_input(case, seed=s) for s in range(3)])
        ys = vmap(base)(xs)
        for k in range(3):
            assert_close(ys[k], base(xs[k]), torch.float32)
        return
    ys = vmap(f)(params, buffers)
    for k, m in enumerate(modules):
        assert_close(ys[k], m(x), torch.float32, msg=case.name)


def test_vmap_per_sample_equals_batch_for_batch_independent_layers():
    for case in CASES:
        if not case.batch_independent:
            continue
        m = case.build()
        x = make_input(case)
        ys = vmap(lambda xi, m=m: m(xi.unsqueeze(0)).squeeze(0))(x)
        assert_close(ys, m(x), torch.float32, msg=case.name)


@pytest.mark.parametrize("name", ["MovingAverageBatchNorm2d", "MovingAverageBatchNorm1d"])
def test_mabn_training_under_vmap_says_why(name):
    case = BY_NAME[name]
    m = case.build().train()
    params, buffers = stack_module_state([case.build().train() for _ in range(2)])
    x = make_input(case)
    with pytest.raises(RuntimeError, match=r"torch\.func transforms.*\.eval\(\)"):
        vmap(lambda p, b: functional_call(m, (p, b), (x,)))(params, buffers)


def test_mabn_training_under_grad_says_why():
    case = BY_NAME["MovingAverageBatchNorm2d"]
    m = case.build().train()
    x = make_input(case)
    with pytest.raises(RuntimeError, match="ψ moving-average window"):
        torch.func.grad(lambda x: m(x).sum())(x)


def test_momentum_none_under_vmap_says_why():
    mods = [nnl.BatchNorm2d(6, momentum=None) for _ in range(2)]
    params, buffers = stack_module_state(mods)
    x = make_input(BY_NAME["BatchNorm2d"])
    with pytest.raises(RuntimeError, match=r"momentum=None.*float momentum"):
        vmap(lambda p, b: functional_call(mods[0], (p, b), (x,)))(params, buffers)


def test_batchnorm_training_under_vmap_updates_each_buffer_set():
    """An ensemble of BatchNorms: each member updates its own (batched) running stats."""
    mods = [nnl.BatchNorm2d(6) for _ in range(2)]
    params, buffers = stack_module_state(mods)
    x = make_input(BY_NAME["BatchNorm2d"])
    vmap(lambda p, b: functional_call(mods[0], (p, b), (x,)))(params, buffers)
    ref = nnl.BatchNorm2d(6)
    ref(x)
    assert_close(buffers["running_mean"][1], ref.running_mean, torch.float32)
    assert_close(buffers["running_var"][0], ref.running_var, torch.float32)
