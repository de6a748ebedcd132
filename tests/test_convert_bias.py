"""Tools on torch BatchNorms built with ``bias=False`` (torch 2.13's option)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from normlab.convert import convert_norms, freeze_bn


def _model() -> nn.Sequential:
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, bias=False), nn.ReLU())
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 2.0)
        m[1].running_mean.uniform_(-1.0, 1.0)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_freeze_keeps_a_bias_free_bn_output():
    m = _model()
    x = 2.0 + torch.randn(2, 3, 9, 9)
    want = m(x)
    frozen = freeze_bn(copy.deepcopy(m))
    torch.testing.assert_close(frozen(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(frozen[1].bias, torch.zeros(6))


@pytest.mark.parametrize("target", ["bn", "gn", "in"])
def test_convert_keeps_bias_false_where_the_target_takes_it(target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new, report = convert_norms(copy.deepcopy(_model()), target)
    assert new[1].bias is None
    assert "bias" not in dict(new[1].named_parameters())
    assert "bias" not in report.replacements[0].details


def test_convert_says_when_the_target_adds_a_bias():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new, report = convert_norms(copy.deepcopy(_model()), "frn_linear")
    assert isinstance(new[1].bias, nn.Parameter) and not new[1].bias.detach().any()
    assert report.replacements[0].details["bias"].startswith("added, zero")


def test_converted_bn_computes_the_same():
    m = _model()
    x = 2.0 + torch.randn(2, 3, 9, 9)
    new, _ = convert_norms(copy.deepcopy(m), "bn")
    torch.testing.assert_close(new.eval()(x), m(x), rtol=1e-5, atol=1e-5)
