"""Precise recalibration: running stats equal the exact population statistics of the data fed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model
from _testing import assert_close, offcenter
from normlab.recalibrate import recalibrate, recalibration_kind

SIZES = (3, 1, 5, 2)  # uneven on purpose, including a batch of one


def make_batches(sizes=SIZES, seed=10, size=8):
    return [inputs(n, size=size, seed=seed + i) for i, n in enumerate(sizes)]


def population_inputs(model, data):
    """Each BN-like layer's inputs on ``data`` with the model in eval mode, concatenated."""
    seen: dict[int, list[torch.Tensor]] = {}
    layers = {id(m): (p, m) for p, m in model.named_modules() if recalibration_kind(m)}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.setdefault(id(mod), []).append(args[0]))
        for _, m in layers.values()
    ]
    model.eval()
    with torch.no_grad():
        model(data)
    for h in handles:
        h.remove()
    return {
        layers[k][0]: (layers[k][1], torch.cat([x.detach() for x in v])) for k, v in seen.items()
    }


def channel_stats(x):
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.mean(1), flat.var(1, correction=1)


@pytest.mark.parametrize(
    "norm2d, norm1d", [(nn.BatchNorm2d, nn.BatchNorm1d), (nnl.BatchNorm2d, nnl.BatchNorm1d)]
)
def test_matches_population_statistics(norm2d, norm1d):
    model = make_model(norm2d=norm2d, norm1d=norm1d).eval()
    batches = make_batches()
    want = population_inputs(copy.deepcopy(model), torch.cat(batches))
    assert len(want) == 8
    out = recalibrate(model, batches)
    assert out is model
    for path, (_, x) in want.items():
        layer = model.get_submodule(path)
        mean, var = channel_stats(x)
        assert_close(layer.running_mean, mean)
        assert_close(layer.running_var, var)
        assert int(layer.num_batches_tracked) == len(SIZES)
    # the shared BN saw both of its calls: twice the values
    shared_x = want["refine.0.1"][1]
    assert shared_x.shape[0] == 2 * sum(SIZES)


def test_not_the_mean_of_batch_variances():
    model = make_model().eval()
    batches = make_batches()
    per_batch = [
        channel_stats(population_inputs(copy.deepcopy(model), b)["stem.1"][1])[1] for b in batches
    ]
    recalibrate(model, batches)
    naive = torch.stack(per_batch).mean(0)
    assert (model.stem[1].running_var - naive).abs().max() > 1e-3


def test_modes_and_parameters_untouched():
    class ModeProbe(nn.Module):
        """Doubles its input in training mode: shows which mode it ran in."""

        def forward(self, x):
            return 2 * x if self.training else x

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), ModeProbe(), nn.BatchNorm2d(4), nn.Dropout(0.5)
    ).double()
    model.train()
    model[1].eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    data = make_batches((4, 2))
    old = copy.deepcopy(model).eval()
    recalibrate(model, data)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])
    # BN 1 normalized with its old running stats (eval), the probe stayed in training mode
    with torch.no_grad():
        h = old[1](old[0](torch.cat(data)))
    assert_close(model[3].running_mean, channel_stats(2 * h)[0])


def test_batch_structures_and_forward_fn():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x, shift=0.0):
            return self.bn(x + shift)

    data = [inputs(4, seed=s)[:, :, 0, 0] for s in range(3)]
    want = channel_stats(torch.cat(data) + 1.0)
    for batches, fn in (
        ([(x, 1.0) for x in data], None),
        ([{"x": x, "shift": 1.0} for x in data], None),
        ([{"image": x} for x in data], lambda m, b: m(b["image"], shift=1.0)),
    ):
        model = TwoInputs().double()
        recalibrate(model, iter(batches), forward_fn=fn)
        assert_close(model.bn.running_mean, want[0])
        assert_close(model.bn.running_var, want[1])
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

    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded only 4"):
        recalibrate(model, batches, num_batches=10)
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate(model, iter([]))
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        recalibrate(model, batches, num_batches=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_instance_norm_with_tracking():
    layer = nnl.InstanceNorm2d(3, track_running_stats=True).double()
    data = [inputs(n, seed=n) for n in (2, 3)]
    recalibrate(layer, data + [data[0][0]])  # an unbatched sample too
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


def test_fp32_buffers_and_warnings():
    model = make_model(dtype=torch.float32).eval()
    data = [b.float() for b in make_batches()]
    recalibrate(model, data)
    assert model.stem[1].running_var.dtype == torch.float32
    want = population_inputs(copy.deepcopy(model), torch.cat(data))["stem.1"][1]
    assert_close(model.stem[1].running_var, channel_stats(want)[1], dtype=torch.float32)

    branchy = nn.ModuleDict({"used": nn.BatchNorm1d(3), "unused": nn.BatchNorm1d(3)})
    with pytest.warns(RuntimeWarning, match="unused never ran"):
        recalibrate(branchy, [torch.randn(4, 3)], forward_fn=lambda m, b: m["used"](b))
    with pytest.warns(RuntimeWarning, match="no layer with running statistics"):
        recalibrate(nn.Linear(3, 3), [torch.randn(2, 3)])


def test_small_batch_family_layers_are_recalibrated():
    """BRN and EvoNorm B0 keep BN-style statistics; MABN keeps E[x²] in running_var."""

    layers = [nnl.BatchRenorm2d(3), nnl.EvoNormB0_2d(3), nnl.MovingAverageBatchNorm2d(3)]
    batches = [offcenter(n, 3, 4, 2, seed=s) for s, n in enumerate((2, 5, 3))]
    data = torch.cat(batches)
    for layer in layers:
        layer = layer.to(torch.float64)
        layer.num_batches_tracked.fill_(7)
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
