"""Recalibration with method="exact": the eval-mode fixed point, level by level."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _models import inputs, make_model
from _recal import layer_inputs, make_batches, np_channels, running
from _testing import assert_close
from normlab.recalibrate import recalibrate


def test_exact_is_the_eval_mode_fixed_point():
    model = make_model().eval()
    batches = make_batches()
    report = recalibrate(model, batches, method="exact", return_report=True)
    assert report.model is model and report.method == "exact"
    # the shortcut BN shares a level with the body BN it runs beside
    assert len(report.levels) < len(report.recalibrated) == 8
    assert ("stages.1.body.1", "stages.1.shortcut.1") in report.levels
    # each layer: the statistics of its eval-mode input under the new statistics upstream
    eval_x = layer_inputs(model, torch.cat(batches), train_layers=False)
    for path, x in eval_x.items():
        layer = model.get_submodule(path)
        flat = np_channels(x)
        tol = dict(rtol=1e-8, atol=1e-8) if path == "refine.0.1" else {}  # iterated: cyclic
        assert_close(layer.running_mean, flat.mean(1), **tol)
        assert_close(layer.running_var, flat.var(1, ddof=1), **tol)
    before = running(model)
    recalibrate(model, batches, method="exact")
    for k, v in running(model).items():
        assert (v - before[k]).abs().max() <= 1e-6 * before[k].abs().max(), k
    # precise is not at the eval-mode fixed point: a second exact call would move it
    precise = recalibrate(make_model().eval(), batches)
    assert (precise.head.fc[1].running_mean - model.head.fc[1].running_mean).abs().max() > 1e-3


def test_exact_levels_with_inplace_ops_and_frozen_parameters():
    """The trace sees through in-place activations and needs no parameter gradients."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))

        def forward(self, x):
            y = self.a(x)
            y += x  # in place on a BN output
            return torch.relu_(self.b(y)) + x

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    model.append(Residual()).append(Residual()).double().eval().requires_grad_(False)
    batches = make_batches((3, 2))
    report = recalibrate(model, batches, method="exact", return_report=True)
    assert report.levels == (("1",), ("3.a.1",), ("3.b.1",), ("4.a.1",), ("4.b.1",))
    eval_x = layer_inputs(model, torch.cat(batches), train_layers=False)
    for path, x in eval_x.items():
        assert_close(model.get_submodule(path).running_var, np_channels(x).var(1, ddof=1))


def test_exact_sequential_levels_agree_and_iterators_are_cached():
    model = make_model().eval()
    batches = make_batches()
    graph = recalibrate(copy.deepcopy(model), batches, method="exact")
    seq = recalibrate(
        copy.deepcopy(model), iter(batches), method="exact", levels="sequential", return_report=True
    )
    assert seq.passes >= 8 and all(len(level) == 1 for level in seq.levels)
    for k, v in running(graph).items():
        assert_close(running(seq.model)[k], v, rtol=1e-8, atol=1e-8)

    def no_grad_forward(m, b):
        with torch.no_grad():
            return m(b)

    # autograd off in the forward: the graph is invisible, sequential levels are used
    blind = recalibrate(
        copy.deepcopy(model),
        batches,
        method="exact",
        forward_fn=no_grad_forward,
        return_report=True,
    )
    assert blind.levels == seq.levels
    for k, v in running(graph).items():
        assert_close(running(blind.model)[k], v, rtol=1e-8, atol=1e-8)


def test_exact_works_with_batches_of_one_and_precise_refuses_them():
    model = make_model().eval()
    batches = make_batches((3, 1, 2))
    state = running(model)
    with pytest.raises(ValueError, match=r"head\.fc\.1 .*one value per channel.*method='exact'"):
        recalibrate(model, batches)
    for k, v in running(model).items():
        assert torch.equal(v, state[k]), k
    recalibrate(model, batches, method="exact")
    x = layer_inputs(model, torch.cat(batches), train_layers=False)["head.fc.1"]
    assert_close(model.head.fc[1].running_var, x.var(0))


class Blowup(nn.Module):
    """Multiplies by ``scale``: a huge scale overflows float32 to inf."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("method", ["precise", "exact"])
def test_non_finite_statistics_refused(method):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Blowup(1e30), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).eval()
    data = [inputs(4, seed=s).float() * 1e10 for s in range(2)]
    state = running(model)
    with pytest.raises(ValueError, match=r"statistics of 4 are not finite.*No statistic was"):
        recalibrate(model, data, method=method)
    # exact wrote level 0 (layer 1) before failing at layer 4: restored too
    for k, v in running(model).items():
        assert torch.equal(v, state[k]), k
    nan = [b.clone() for b in data[:1]]
    nan[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"statistics of 1(, 4)? are not finite"):
        recalibrate(model, nan, method=method)
