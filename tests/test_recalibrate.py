"""Recalibration: precise (train-mode) statistics, variance options, layers, batches, errors.

The eval-mode fixed point (``method="exact"``) is tested in test_recalibrate_exact.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model
from _recal import (
    SIZES,
    layer_inputs,
    make_batches,
    np_channels,
    running,
    train_mode_reference,
)
from _testing import assert_close, offcenter
from normlab.recalibrate import _Population, recalibrate


@pytest.mark.parametrize(
    "norm2d, norm1d", [(nn.BatchNorm2d, nn.BatchNorm1d), (nnl.BatchNorm2d, nnl.BatchNorm1d)]
)
def test_precise_equals_train_mode_accumulation(norm2d, norm1d):
    model = make_model(norm2d=norm2d, norm1d=norm1d).eval()
    batches = make_batches()
    want = train_mode_reference(model, batches)
    assert len(want) == 8
    out = recalibrate(model, batches)
    assert out is model
    for path, (mean, var) in want.items():
        layer = model.get_submodule(path)
        assert_close(layer.running_mean, mean)
        assert_close(layer.running_var, var)
        assert int(layer.num_batches_tracked) == len(SIZES)
    # Depth matters: the eval-mode inputs (old statistics upstream) give other statistics.
    eval_x = layer_inputs(make_model(norm2d=norm2d, norm1d=norm1d), torch.cat(batches), False)
    assert (torch.as_tensor(want["head.fc.1"][0]) - eval_x["head.fc.1"].mean(0)).abs().max() > 0.1
    # the shared BN saw both of its calls in every batch: twice the values
    assert layer_inputs(model, batches[0], True)["refine.0.1"].shape[0] == 2 * SIZES[0]


def test_variance_options_against_numpy():
    model = make_model().eval()
    batches = make_batches()
    results = {}
    for variance in ("population", "per_batch"):
        want = train_mode_reference(model, batches, variance)
        got = recalibrate(copy.deepcopy(model), batches, variance=variance)
        for path, (mean, var) in want.items():
            assert_close(got.get_submodule(path).running_mean, mean)
            assert_close(got.get_submodule(path).running_var, var)
        results[variance] = got.stem[1].running_var
    # the population variance includes the spread of the batch means: larger here
    assert (results["population"] - results["per_batch"]).abs().max() > 1e-3


def test_per_batch_variance_is_count_weighted():
    """Algorithm 2 with uneven batches: each batch weighs by its count, not 1/num_batches."""
    layer = nn.BatchNorm2d(3).double()
    batches = [offcenter(n, 3, 4, 4, seed=n, scale=1.0 + n) for n in (2, 6)]
    recalibrate(layer, batches, variance="per_batch")
    flats = [np_channels(b) for b in batches]
    counts = [f.shape[1] for f in flats]
    weighted = sum(n * f.var(axis=1, ddof=1) for n, f in zip(counts, flats, strict=True)) / sum(
        counts
    )
    unweighted = np.mean([f.var(axis=1, ddof=1) for f in flats], axis=0)
    assert_close(layer.running_var, weighted)
    assert np.abs(layer.running_var.numpy() - unweighted).max() > 1.0


def test_uneven_batches_count_weighted():
    """The first layer's input does not depend on the batching: any split gives one answer."""
    model = make_model().eval()
    data = torch.cat(make_batches())
    whole = recalibrate(copy.deepcopy(model), [data])
    split = recalibrate(copy.deepcopy(model), list(data.split([7, 2, 3])))
    for name in ("running_mean", "running_var"):
        assert_close(getattr(split.stem[1], name), getattr(whole.stem[1], name))
    with torch.no_grad():
        conv = model.stem[0](data)
    unweighted = torch.stack([c.mean((0, 2, 3)) for c in conv.split([7, 2, 3])]).mean(0)
    assert_close(whole.stem[1].running_mean, conv.mean((0, 2, 3)))
    assert (split.stem[1].running_mean - unweighted).abs().max() > 1e-3


class FrozenBatchNorm2d(nn.Module):
    """torchvision's layout (buffers only), not a normlab or torch class."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", 1.5), ("bias", 0.2), ("running_mean", 0.3)):
            self.register_buffer(name, torch.full((n,), value, dtype=torch.float64))
        self.register_buffer("running_var", torch.full((n,), 2.0, dtype=torch.float64))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


def test_frozen_batch_norms_are_named_and_kept():
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nnl.FrozenBatchNorm2d(4))
    frozen = frozen.double()
    data = make_batches((2, 3))
    state = copy.deepcopy(frozen.state_dict())
    with pytest.warns(RuntimeWarning, match=r"no layer with running statistics.*2 frozen Batch"):
        report = recalibrate(frozen, data, return_report=True)
    assert report.frozen == ("1", "2") and report.recalibrated == ()
    with pytest.warns(RuntimeWarning, match="frozen by design"):
        recalibrate(frozen, data)
    mixed = nn.Sequential(frozen, nn.BatchNorm2d(4), nn.InstanceNorm2d(4)).double()
    report = recalibrate(mixed, data, return_report=True)
    assert report.frozen == ("0.1", "0.2") and report.recalibrated == ("1",)
    assert report.untracked == ("2",)  # InstanceNorm without running statistics
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unknown_running_buffers_are_reported():
    class OwnBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))

        def forward(self, x):
            return x - self.running_mean[:, None, None]

    with pytest.warns(RuntimeWarning, match="declares no _recalibrate_kind"):
        report = recalibrate(OwnBN(), [inputs(2).float()], return_report=True)
    assert report.unknown == ("<model>",)


class ListModel(nn.Module):
    """Takes a list of (C, H, W) images of different sizes, as torchvision's detectors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, images):
        assert isinstance(images, list)
        return [self.bn2(torch.relu(self.bn(self.conv(im[None])))) for im in images]


@pytest.mark.parametrize("method", ["precise", "exact"])
def test_lists_of_images(method):
    model = ListModel().double().eval()
    batches = [
        [offcenter(3, 6 + i, 7, seed=i), offcenter(3, 9, 5 + i, seed=10 + i)] for i in range(3)
    ]
    recalibrate(model, batches, method=method)
    with torch.no_grad():
        feats = [model.conv(im[None]) for b in batches for im in b]
    flat = np.concatenate([np_channels(f) for f in feats], axis=1)
    assert_close(model.bn.running_mean, flat.mean(1))
    assert_close(model.bn.running_var, flat.var(1, ddof=1))
    assert int(model.bn.num_batches_tracked) == 3


def test_modes_buffers_and_parameters_untouched():
    class ModeProbe(nn.Module):
        """Doubles its input in training mode: shows which mode it ran in."""

        def forward(self, x):
            return 2 * x if self.training else x

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), ModeProbe(), nn.BatchNorm2d(4), nn.Dropout(0.0)
    ).double()
    model.train()
    model[1].eval()
    model[3].momentum = 0.3
    params = {k: v.clone() for k, v in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    data = make_batches((4, 2))
    old = copy.deepcopy(model)
    recalibrate(model, data)
    assert [m.training for m in model.modules()] == flags
    assert model[3].momentum == 0.3 and model[1].momentum == 0.1
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])
    # BN 1 normalized with each batch's statistics (train mode), the probe stayed in
    # training mode; every batch counts once in the pooled statistics.
    old[1].train()
    with torch.no_grad():
        h = torch.cat([2 * old[1](old[0](b)) for b in data])
    assert_close(model[3].running_mean, np_channels(h).mean(1))
    assert_close(model[3].running_var, np_channels(h).var(1, ddof=1))


def test_batch_structures_and_forward_fn():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x, shift=0.0):
            return self.bn(x + shift)

    data = [inputs(4, seed=s)[:, :, 0, 0] for s in range(3)]
    flat = np_channels(torch.cat(data) + 1.0)
    for batches, fn in (
        ([(x, 1.0) for x in data], None),
        ([{"x": x, "shift": 1.0} for x in data], None),
        ([{"image": x} for x in data], lambda m, b: m(b["image"], shift=1.0)),
    ):
        model = TwoInputs().double()
        recalibrate(model, iter(batches), forward_fn=fn)
        assert_close(model.bn.running_mean, flat.mean(1))
        assert_close(model.bn.running_var, flat.var(1, ddof=1))
    with pytest.raises(TypeError, match="forward_fn"):
        recalibrate(TwoInputs().double(), [object()])


def test_num_batches_and_errors():
    model = make_model().eval()
    batches = make_batches()
    ref = copy.deepcopy(model)
    recalibrate(model, iter(batches), num_batches=2)
    recalibrate(ref, batches[:2])
    assert int(model.stem[1].num_batches_tracked) == 2
    assert torch.equal(model.stem[1].running_var, ref.stem[1].running_var)

    state = running(model)
    with pytest.raises(ValueError, match="yielded only 4"):
        recalibrate(model, batches, num_batches=10)
    with pytest.raises(ValueError, match="yielded only 4"):
        recalibrate(model, batches, num_batches=10, method="exact")
    for method in ("precise", "exact"):
        with pytest.raises(ValueError, match="yielded no batch"):
            recalibrate(model, iter([]), method=method)
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        recalibrate(model, batches, num_batches=0)
    for option in ({"method": "eval"}, {"variance": "biased"}, {"levels": "bfs"}):
        with pytest.raises(ValueError, match="is not one of"):
            recalibrate(model, batches, **option)
    for k, v in running(model).items():
        assert torch.equal(v, state[k]), k


def test_instance_norm_with_tracking():
    for method in ("precise", "exact"):
        layer = nnl.InstanceNorm2d(3, track_running_stats=True).double()
        data = [inputs(n, seed=n) for n in (2, 3)]
        recalibrate(layer, data + [data[0][0]], method=method)  # an unbatched sample too
        x = torch.cat(data + [data[0][:1]])
        flat = x.reshape(x.shape[0], 3, -1)
        assert_close(layer.running_mean, flat.mean(2).mean(0))
        assert_close(layer.running_var, flat.var(2, correction=1).mean(0))
    torch_layer = nn.InstanceNorm2d(3, track_running_stats=True).double()
    recalibrate(torch_layer, data)
    assert_close(torch_layer.running_var, torch.cat(data).reshape(5, 3, -1).var(2).mean(0))


def test_protocol_for_other_layers():
    class SecondMoment(nn.Module):
        _recalibrate_kind = "batch_second_moment"
        _recalibrate_unbiased = False

        def __init__(self):
            super().__init__()
            self.register_buffer("running_var", torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return x / self.running_var.sqrt()[None, :, None, None]

    class BiasedBN(nnl.BatchNorm2d):
        _recalibrate_unbiased = False

    data = make_batches((2, 3))
    x = torch.cat(data)
    layer = recalibrate(SecondMoment(), data)
    assert_close(layer.running_var, x.square().mean((0, 2, 3)))
    bn = recalibrate(BiasedBN(3).double(), data)
    assert_close(bn.running_var, x.var((0, 2, 3), correction=0))

    class Unknown(SecondMoment):
        _recalibrate_kind = "median"

    with pytest.raises(ValueError, match="does not know"):
        recalibrate(Unknown(), data)


def test_doctor_accumulator_interface():
    x = offcenter(6, 3, 4, 4, seed=3)
    pop = _Population(nn.BatchNorm2d(3), "batch_mean_var", "bn")
    for part in x.split([2, 4]):
        pop.update(part)
    mean, var = pop.result()
    assert pop.n == 96
    assert_close(mean, np_channels(x).mean(1))
    assert_close(var, np_channels(x).var(1, ddof=1))
    assert_close(pop.m2 / pop.n, np_channels(x).var(1))


def test_fp32_buffers_warnings_and_progress(capsys):
    model = make_model(dtype=torch.float32).eval()
    data = [b.float() for b in make_batches()]
    want = train_mode_reference(model, data)
    recalibrate(model, data, progress=False)
    assert model.stem[1].running_var.dtype == torch.float32
    assert_close(model.stem[1].running_var, want["stem.1"][1], dtype=torch.float32)

    branchy = nn.ModuleDict({"used": nn.BatchNorm1d(3), "unused": nn.BatchNorm1d(3)})
    with pytest.warns(RuntimeWarning, match="unused never ran"):
        recalibrate(branchy, [torch.randn(4, 3) + 2], forward_fn=lambda m, b: m["used"](b))
    with pytest.warns(RuntimeWarning, match="no layer with running statistics"):
        recalibrate(nn.Linear(3, 3), [torch.randn(2, 3) + 2])
    recalibrate(make_model().eval(), make_batches(), method="exact", progress=True)
    assert "recalibrate (exact)" in capsys.readouterr().err


def test_small_batch_family_layers_are_recalibrated():
    """BRN and EvoNorm B0 keep BN-style statistics; MABN keeps E[x²] in running_var."""

    layers = [nnl.BatchRenorm2d(3), nnl.EvoNormB0_2d(3), nnl.MovingAverageBatchNorm2d(3)]
    batches = [offcenter(n, 3, 4, 2, seed=s) for s, n in enumerate((2, 5, 3))]
    data = torch.cat(batches)
    for layer in layers:
        layer = layer.to(torch.float64)
        layer.num_batches_tracked.fill_(7)
        others = {k: v.clone() for k, v in layer.state_dict().items() if k not in ("running_var",)}
        recalibrate(layer, batches)
        flat = data.transpose(0, 1).reshape(3, -1)
        if isinstance(layer, nnl.MovingAverageBatchNorm2d):
            assert_close(layer.running_var, flat.square().mean(1))
        else:
            assert_close(layer.running_var, flat.var(1, correction=1))
            if getattr(layer, "running_mean", None) is not None:
                assert_close(layer.running_mean, flat.mean(1))
        # BRN's and MABN's schedules run on the step count: recalibration keeps it.
        keeps_step = isinstance(layer, (nnl.BatchRenorm2d, nnl.MovingAverageBatchNorm2d))
        assert int(layer.num_batches_tracked) == (7 if keeps_step else 3)
        # The train-mode passes changed no other buffer (MABN's windows).
        for k, v in others.items():
            if k not in ("running_mean", "num_batches_tracked"):
                assert torch.equal(layer.state_dict()[k], v), k
