"""The BN doctor: each finding is planted and found; a clean model gets none; no mutation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model
from normlab.doctor import DoctorTargetError, diagnose, load_factory
from normlab.recalibrate import recalibrate

X = inputs(16, dtype=torch.float32)


@pytest.fixture(scope="module")
def clean_model():
    """32/64 channels, statistics at the fixed point for X (5 recalibration passes)."""
    model = make_model(dtype=torch.float32, width=32).eval()
    for _ in range(5):
        recalibrate(model, [X])
    return model


@pytest.fixture
def model(clean_model):
    return copy.deepcopy(clean_model)


def codes_at(report, code):
    return {f.module: f.severity for f in report.findings if f.code == code}


def test_clean_models_have_no_findings(model):
    report = diagnose(model, X)
    assert report.findings == [], report.to_table()
    assert report.ok
    gn = nn.Sequential(nn.Conv2d(3, 32, 3), nnl.GroupNorm(32, 32), nn.ReLU(), nn.Dropout(0.2))
    assert diagnose(gn.eval(), X).findings == []
    assert diagnose(model.train(), X).findings == []  # training, as the caller says


def test_layer_table_counts_values_per_statistic(model):
    report = diagnose(model, X)
    values = {i.module: i.values_per_statistic for i in report.layers}
    assert values["stem.1"] == 16 * 8 * 8
    assert values["stages.1.body.1"] == 16 * 4 * 4
    assert values["head.fc.1"] == 16
    info = next(i for i in report.layers if i.module == "stem.1")
    assert info.batch_statistics and not info.training and info.input_shape == (16, 32, 8, 8)


def test_diagnose_does_not_mutate_the_model(model):
    model.train()
    model.stem[1].eval()
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    diagnose(model, X)
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k


def test_bn_training_mode(model):
    model.stages[0].body[1].train()
    assert codes_at(diagnose(model, X), "bn_training_mode") == {"stages.0.body.1": "error"}
    model.train()  # caller forgot eval(), but says it is evaluating
    found = codes_at(diagnose(model, X, expect_eval=True), "bn_training_mode")
    assert len(found) == 8
    assert codes_at(diagnose(model, X, expect_eval=False), "bn_training_mode") == {}


def test_batch_stats_in_eval(model):
    model.stem[1] = nn.BatchNorm2d(32, track_running_stats=False)
    model.eval()
    assert codes_at(diagnose(model, X), "batch_stats_in_eval") == {"stem.1": "warning"}


def test_tiny_batch_statistic(model):
    x2 = inputs(2, dtype=torch.float32)
    found = codes_at(diagnose(model, x2), "tiny_batch_statistic")
    assert found == {"head.fc.1": "error"}  # 2 values: batch 2 on a (N, C) input
    found = codes_at(diagnose(model, x2, batch_size=4), "tiny_batch_statistic")
    assert found == {"head.fc.1": "warning"}
    assert codes_at(diagnose(model, x2, batch_size=8), "tiny_batch_statistic") == {}


def test_degenerate_statistic():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nnl.GroupNorm(4, 4), nn.GroupNorm(4, 4)
    ).eval()
    found = codes_at(diagnose(net, X), "degenerate_statistic")
    assert found == {"2": "error", "3": "error"}


def test_running_stats_nonfinite_and_near_zero(model):
    with torch.no_grad():
        model.stem[1].running_var[0] = float("nan")
        model.stages[0].body[1].running_mean[3] = float("inf")
        model.stages[1].body[1].running_var[:2] = 0.0
    report = diagnose(model, X)
    assert codes_at(report, "running_stats_nonfinite") == {
        "stem.1": "error",
        "stages.0.body.1": "error",
    }
    assert codes_at(report, "running_var_near_zero") == {"stages.1.body.1": "warning"}
    assert report.findings[0].severity == "error"  # sorted by severity


def test_stale_running_stats(model):
    with torch.no_grad():
        bn = model.stages[1].body[1]
        bn.running_mean += 2 * bn.running_var.sqrt()
    found = codes_at(diagnose(model, X), "stale_running_stats")
    assert found["stages.1.body.1"] == "warning"  # (downstream layers may follow)
    assert "stem.1" not in found


class LeakyFrozenBatchNorm2d(nn.Module):
    """Looks frozen (name, buffers) but updates its running mean in forward."""

    def __init__(self, n):
        super().__init__()
        for name, value in (
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x):
        self.running_mean.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)))
        return (x - self.running_mean[:, None, None]) * self.running_var.rsqrt()[:, None, None]


class TrainableFrozenBN(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        return x * self.weight[:, None, None]


def test_frozen_bn_changes():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), LeakyFrozenBatchNorm2d(4), TrainableFrozenBN(4)).eval()
    assert codes_at(diagnose(net, X), "frozen_bn_changes") == {"1": "error", "2": "error"}
    ok = nn.Sequential(nn.Conv2d(3, 4, 1), nnl.FrozenBatchNorm2d(4)).train()
    assert diagnose(ok, X).findings == []


def test_bn_params_frozen_stats_not(model):
    model.train()
    model.stem[1].weight.requires_grad_(False)
    model.stem[1].bias.requires_grad_(False)
    assert codes_at(diagnose(model, X), "bn_params_frozen_stats_not") == {"stem.1": "warning"}


def test_dropout_before_bn():
    net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.BatchNorm1d(32))
    x = torch.randn(16, 8)
    with torch.no_grad():
        net.train()(x)  # sensible statistics
    found = codes_at(diagnose(net.eval(), x), "dropout_before_bn")
    assert found == {"2": "warning"}
    assert "1" in next(
        f.message for f in diagnose(net, x).findings if f.code == "dropout_before_bn"
    )


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.6])
def test_momentum_extreme(model, momentum):
    model.stem[1].momentum = momentum
    assert codes_at(diagnose(model, X), "momentum_extreme") == {"stem.1": "warning"}


def test_momentum_none_is_fine(model):
    model.stem[1].momentum = None
    assert diagnose(model, X).findings == []


def test_groupnorm32_blocked():
    model = make_model(dtype=torch.float32, width=8).eval()
    found = codes_at(diagnose(model, X), "groupnorm32_blocked")
    assert found["stem.1"] == "info" and len(found) == 8


def test_report_json_and_table(model):
    model.stem[1].momentum = 0.0
    report = diagnose(model, X)
    data = json.loads(report.to_json())
    assert data["findings"][0]["code"] == "momentum_extreme"
    assert set(data["findings"][0]) == {"code", "severity", "module", "message", "fix"}
    assert data["layers"][0]["module"] == "stem.1"
    table = report.to_table()
    assert "momentum_extreme" in table and "fix:" in table and "VALUES/STAT" in table


def test_input_structures_and_failures():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(32)

        def forward(self, x, y=0):
            return self.bn(x + y)

    net = Pair().eval()
    x = torch.randn(16, 32)
    assert diagnose(net, (x, 0.0)).layers[0].values_per_statistic == 16
    assert diagnose(net, {"x": x, "y": 1.0}).layers[0].input_shape == (16, 32)
    with pytest.raises(RuntimeError, match="running the model on example_inputs failed"):
        diagnose(net, torch.randn(2, 3))


FACTORY = """
import torch
from torch import nn
from helper_mod import WIDTH

def build():
    model = nn.Sequential(nn.Conv2d(3, WIDTH, 1), nn.BatchNorm2d(WIDTH))
    return model.eval(), torch.randn(4, 3, 8, 8)

def broken():
    raise OSError("weights not found")

def not_a_pair():
    return 3
"""


def test_load_factory(tmp_path):
    (tmp_path / "helper_mod.py").write_text("WIDTH = 32\n")
    (tmp_path / "target.py").write_text(FACTORY)
    model, example = load_factory(f"{tmp_path / 'target.py'}:build")
    assert isinstance(model, nn.Sequential) and example.shape == (4, 3, 8, 8)
    assert not diagnose(model, example).codes - {"stale_running_stats"}

    (tmp_path / "bad.py").write_text("raise ImportError('no module named cv2')\n")
    cases = {
        "spec": "target.py",
        "file": f"{tmp_path / 'missing.py'}:build",
        "import": f"{tmp_path / 'bad.py'}:build",
        "attribute": f"{tmp_path / 'target.py'}:nope",
        "call": f"{tmp_path / 'target.py'}:broken",
        "result": f"{tmp_path / 'target.py'}:not_a_pair",
    }
    for part, target in cases.items():
        with pytest.raises(DoctorTargetError) as info:
            load_factory(target)
        assert info.value.part == part, (part, str(info.value))
    with pytest.raises(DoctorTargetError, match="build, broken, not_a_pair|broken, build"):
        load_factory(f"{tmp_path / 'target.py'}:nope")
    with pytest.raises(DoctorTargetError) as info:
        load_factory("normlab_no_such_module:build")
    assert info.value.part == "import"
