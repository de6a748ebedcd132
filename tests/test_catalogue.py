"""Every catalogue layer against its float64 reference, and by gradcheck."""

from __future__ import annotations

import pytest
import torch

from normlab.catalogue import CATALOGUE, check_case, prepare

IDS = [c.name for c in CATALOGUE]


@pytest.mark.parametrize("case", CATALOGUE, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(case, seed):
    result = check_case(case, seed=seed, tol=1e-10)
    assert result.ok, result


GRAD_CASES = [c for c in CATALOGUE if c.exact_gradient]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_gradcheck(case):
    module, x = prepare(case, seed=3)
    params = list(module.parameters())
    x.requires_grad_(True)

    def f(inp, *ps):
        # Running buffers change in training mode; gradcheck calls f many times,
        # which is harmless because the output of train mode does not read them.
        return module(inp)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_check_detects_a_wrong_layer():
    """The self-check is able to fail: a layer with a shifted output is caught."""
    case = CATALOGUE[0]

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = case.build()

        def __getattr__(self, name):  # expose the inner layer's weight, eps, ...
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

        def forward(self, x):
            return self.inner(x) + 1e-6

    from dataclasses import replace

    broken = replace(case, build=Broken)
    assert not check_case(broken).ok


def test_catalogue_covers_every_norm_module():
    import normlab.nn as nnl

    covered = {type(c.build()).__name__ for c in CATALOGUE}
    convs = {"CenteredConv2d", "WSConv2d"}  # weight transforms: tests/test_conv.py
    modules = {
        n
        for n in nnl.__all__
        if isinstance(getattr(nnl, n), type) and issubclass(getattr(nnl, n), torch.nn.Module)
    }
    assert modules - convs <= covered, modules - convs - covered
