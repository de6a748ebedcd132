"""The BN doctor: each finding is planted and found; a clean model gets none; no mutation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model
from _testing import calibrate_bn
from normlab.doctor import (
    CODES,
    DoctorForwardError,
    DoctorTargetError,
    Finding,
    Report,
    diagnose,
    load_target,
)

X = inputs(16, dtype=torch.float32, seed=101)


calibrate = calibrate_bn


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clean_model():
    """32/64 channels, statistics computed on other batches than X (fresh, off-center data).

    The refinement's BN, shared by its two calls in TinyResNet, gets one copy per call
    (a shared BN is a finding of its own: bn_shared_across_calls)."""
    model = make_model(dtype=torch.float32, width=32)
    model.refine[1][1] = copy.deepcopy(model.refine[0][1])
    return calibrate(model, [inputs(16, dtype=torch.float32, seed=s) for s in range(5)])


@pytest.fixture
def model(clean_model):
    return copy.deepcopy(clean_model)


def codes_at(report, code):
    return {f.module: f.severity for f in report.findings if f.code == code}


def test_clean_models_have_no_findings(model):
    report = diagnose(model, X)
    assert report.findings == [], report.to_table()
    assert report.ok and not report.has_errors
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
    report = diagnose(model, X, train_batch_size=3)
    values = {i.module: i.values_per_statistic for i in report.layers}
    assert values["stages.1.body.1"] == 3 * 4 * 4 and values["head.fc.1"] == 3


def test_diagnose_does_not_mutate_the_model(model):
    model.train()
    model.stem[1].eval()
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    diagnose(model, X, train_batch_size=2)
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
    assert len(found) == 9  # the refinement has one BN per call here
    assert codes_at(diagnose(model, X, expect_eval=False), "bn_training_mode") == {}


def test_batch_stats_in_eval(model):
    model.stem[1] = nn.BatchNorm2d(32, track_running_stats=False)
    model.eval()
    assert codes_at(diagnose(model, X), "batch_stats_in_eval") == {"stem.1": "warning"}


def test_tiny_batch_statistic_is_judged_in_training_only(model):
    x2 = inputs(2, dtype=torch.float32, seed=7)
    # Eval mode uses running statistics: a batch of 2 at evaluation is no problem.
    assert codes_at(diagnose(model, x2), "tiny_batch_statistic") == {}
    # Asked about training at batch 2/4/8: the (N, C) head BN has N values.
    found = codes_at(diagnose(model, x2, train_batch_size=2), "tiny_batch_statistic")
    assert found == {"head.fc.1": "error"}
    found = codes_at(diagnose(model, x2, train_batch_size=4), "tiny_batch_statistic")
    assert found == {"head.fc.1": "warning"}
    assert codes_at(diagnose(model, x2, train_batch_size=8), "tiny_batch_statistic") == {}
    # A model in training mode is judged at the example's batch size.
    found = codes_at(diagnose(model.train(), x2), "tiny_batch_statistic")
    assert found == {"head.fc.1": "error"}
    # A 1×1 map: batch 2 gives 2 values per statistic at a conv BN too.
    small = inputs(2, size=2, dtype=torch.float32, seed=8)
    found = codes_at(diagnose(model.train(), small), "tiny_batch_statistic")
    assert found["stages.1.body.1"] == "error" and "stem.1" not in found  # 2 × 2×2 = 8: ok


def test_tiny_batch_statistic_thresholds(model):
    # stem.1 sees a 2×2 map at size 2: batch 1 gives 4 values (warning), batch 2 gives 8 (ok).
    small = inputs(2, size=2, dtype=torch.float32, seed=9)
    found = codes_at(diagnose(model, small, train_batch_size=1), "tiny_batch_statistic")
    assert found["stem.1"] == "warning" and found["stages.1.body.1"] == "error"
    found = codes_at(diagnose(model, small, train_batch_size=2), "tiny_batch_statistic")
    assert "stem.1" not in found and found["stages.1.body.1"] == "error"
    report = diagnose(model, small, train_batch_size=1)
    message = next(f.message for f in report.findings if f.code == "tiny_batch_statistic")
    assert "train batch size 1" in message


def test_degenerate_and_tiny_instance_statistics():
    pooled = [nn.Conv2d(3, 64, 3), nn.AdaptiveAvgPool2d(1)]
    net = nn.Sequential(
        *pooled,
        nnl.GroupNorm(64, 64),  # 1 channel per group on a 1×1 map: 1 value
        nn.GroupNorm(64, 64),
        nnl.GroupNorm(32, 64),  # 2 channels per group: 2 values
        nnl.FilterResponseNorm2d(64),  # 1×1: about sign(x)
        nnl.EvoNormS0_2d(64, groups=32),  # 2 values per group
        nnl.GroupNorm(8, 64),  # 8 values: fine
    ).eval()
    report = diagnose(net, X)
    assert codes_at(report, "degenerate_statistic") == {"2": "error", "3": "error"}
    assert codes_at(report, "tiny_instance_statistic") == {
        "4": "warning",
        "5": "warning",
        "6": "warning",
    }
    frn = next(f for f in report.findings if f.module == "5")
    assert "1 value(s)" in frn.detail and "sign" in frn.message
    # Same layers on an 8×8 map: nothing to report, in either mode.
    big = nn.Sequential(
        nn.Conv2d(3, 64, 1), nnl.FilterResponseNorm2d(64), nnl.EvoNormS0_2d(64, groups=32)
    )
    assert diagnose(big.eval(), X).findings == []
    assert diagnose(big.train(), X).findings == []


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


@pytest.mark.parametrize(
    "layer",
    [nn.BatchNorm2d(32), nnl.BatchNorm2d(32), nnl.FrozenBatchNorm2d(32)],
    ids=["torch_bn", "normlab_bn", "frozen_bn"],
)
def test_running_var_negative_is_an_error_naming_the_channels(layer):
    net = nn.Sequential(nn.Conv2d(3, 32, 1), layer, nn.ReLU(), nn.Conv2d(32, 8, 1))
    net = calibrate(net, [inputs(16, dtype=torch.float32, seed=s) for s in range(3)])
    with torch.no_grad():
        net[1].running_var[[2, 9]] = torch.tensor([-0.25, -1e-3])
    report = diagnose(net.eval(), X)
    negative = [f for f in report.findings if f.code == "running_var_negative"]
    assert [(f.module, f.severity) for f in negative] == [("1", "error")]
    assert "2 of 32 channel(s)" in negative[0].detail and "2, 9" in negative[0].detail
    assert "recalibrate" in negative[0].fix and "corrupt" in negative[0].message
    assert codes_at(report, "running_var_near_zero") == {}  # negative is not "near zero"
    assert report.has_errors


def test_near_zero_variance_of_a_dead_channel_is_not_reported():
    net = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32))
    with torch.no_grad():
        net[0].weight[0] = 0.0  # channel 0 is constant: running_var 0 is right there
        net[0].bias[0] = 0.3
    x = inputs(8, dtype=torch.float32, seed=11)
    calibrate(net, [x, inputs(8, dtype=torch.float32, seed=12)])
    assert float(net[1].running_var[0]) == 0.0
    assert diagnose(net, x).findings == []


def test_stale_running_stats(model):
    with torch.no_grad():
        bn = model.stages[1].body[1]
        bn.running_mean += 2 * bn.running_var.sqrt()
    found = codes_at(diagnose(model, X), "stale_running_stats")
    assert found["stages.1.body.1"] == "warning"  # (downstream layers may follow)
    assert "stem.1" not in found
    # Training overwrites the running statistics: not judged for a model in training mode.
    assert codes_at(diagnose(model.train(), X), "stale_running_stats") == {}


def fresh_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32)
    )


def test_uncalibrated_model_is_one_finding():
    net = fresh_net()
    x = inputs(8, dtype=torch.float32, seed=13)
    report = diagnose(net.eval(), x)
    assert [(f.code, f.severity, f.module) for f in report.findings] == [
        ("uncalibrated_running_stats", "warning", "")
    ]
    assert "All 2 layer(s)" in report.findings[0].detail
    report = diagnose(net.train(), x)
    assert [(f.code, f.severity) for f in report.findings] == [
        ("uncalibrated_running_stats", "info")
    ]
    assert report.ok
    # One layer added to a calibrated model: that layer only.
    calibrate(net, [inputs(8, dtype=torch.float32, seed=s) for s in (14, 15)])
    net.append(nn.BatchNorm2d(32).eval())
    assert codes_at(diagnose(net, x), "uncalibrated_running_stats") == {"5": "warning"}
    assert codes_at(diagnose(net.train(), x), "uncalibrated_running_stats") == {}


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
        self.running_var.add_(0.1)  # and leaks: two findings, one module in the group
        return x * self.weight[:, None, None]


def test_frozen_bn_changes():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), LeakyFrozenBatchNorm2d(4), TrainableFrozenBN(4)).eval()
    report = diagnose(net, X)
    assert codes_at(report, "frozen_bn_changes") == {"1": "error", "2": "error"}
    assert len(report.findings) == 3 and report.groups[0].modules == ["1", "2"]
    ok = nn.Sequential(nn.Conv2d(3, 4, 1), nnl.FrozenBatchNorm2d(4)).train()
    assert diagnose(ok, X).findings == []


def test_bn_params_frozen_stats_not(model):
    model.stem[1].weight.requires_grad_(False)
    model.stem[1].bias.requires_grad_(False)
    # Evaluated: the flags do not matter.
    assert codes_at(diagnose(model, X), "bn_params_frozen_stats_not") == {}
    # Asked about training (model.train() will put the layer in training mode): found.
    found = codes_at(diagnose(model, X, train_batch_size=16), "bn_params_frozen_stats_not")
    assert found == {"stem.1": "warning"}
    model.train()
    assert codes_at(diagnose(model, X), "bn_params_frozen_stats_not") == {"stem.1": "warning"}
    model.stem[1].eval()  # frozen the usual way: eval() after train()
    assert codes_at(diagnose(model, X), "bn_params_frozen_stats_not") == {}


def test_dropout_before_bn():
    net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.BatchNorm1d(32))
    x = torch.randn(16, 8) + 0.7
    calibrate(net, [x, torch.randn(16, 8) + 0.7])
    found = codes_at(diagnose(net.eval(), x), "dropout_before_bn")
    assert found == {"2": "warning"}
    assert "1" in next(f.detail for f in diagnose(net, x).findings if f.code == "dropout_before_bn")


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.6])
def test_momentum_extreme(model, momentum):
    model.stem[1].momentum = momentum
    assert codes_at(diagnose(model, X), "momentum_extreme") == {"stem.1": "warning"}


def test_momentum_none_is_fine(model):
    model.stem[1].momentum = None
    assert diagnose(model, X).findings == []


def test_groupnorm32_blocked_is_one_line():
    model = calibrate(make_model(dtype=torch.float32, width=8), [inputs(16, dtype=torch.float32)])
    report = diagnose(model, X)
    found = codes_at(report, "groupnorm32_blocked")
    assert found["stem.1"] == "info" and len(found) == 8
    table = report.to_table()
    lines = [line for line in table.splitlines() if line.startswith("info ")]
    assert len(lines) == 1 and "stem.1" in lines[0] and "and 5 more" in lines[0], table
    verbose = report.to_table(verbose=True)
    assert all(f"- {m} [info]" in verbose for m in found) and "VALUES/STAT" in verbose
    assert "VALUES/STAT" not in table


def test_report_json_and_table(model):
    model.stem[1].momentum = 0.0
    model.head.fc[1].momentum = 0.9
    report = diagnose(model, X)
    data = json.loads(report.to_json())
    assert data["counts"] == {"error": 0, "warning": 2, "info": 0} and not data["ok"]
    assert data["mode"] == "eval" and data["train_batch_size"] is None
    [group] = data["groups"]
    assert group["code"] == "momentum_extreme" and group["modules"] == ["stem.1", "head.fc.1"]
    assert group["count"] == 2 and group["fix"]
    assert {f["module"] for f in data["findings"]} == {"stem.1", "head.fc.1"}
    assert set(data["findings"][0]) == {"code", "severity", "module", "message", "fix", "detail"}
    assert "momentum=0.9" in data["findings"][1]["detail"]
    assert data["layers"][0]["module"] == "stem.1"
    table = report.to_table()
    assert "momentum_extreme" in table and "fix:" in table and "2 warning(s)" in table
    assert str(report) == table
    empty = Report()
    assert "no findings" in empty.to_table() and empty.ok


def test_messages_are_self_contained():
    """No finding points at a file users do not have, and every code has a why and a fix."""
    for code, (why, fix) in CODES.items():
        for text in (why, fix):
            assert text and "NOTES" not in text and ".md" not in text, code
    f = Finding("x", "info", "m", "msg", "fix")
    assert f.detail == ""


class ImageListModel(nn.Module):
    """Takes a list of (C, H, W) images of different sizes, like torchvision's detectors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, images):
        assert isinstance(images, list)
        return [self.bn(self.conv(im[None])) for im in images]


def test_input_structures_and_failures():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(32)

        def forward(self, x, y=0):
            return self.bn(x + y)

    net = Pair().eval()
    x = torch.randn(16, 32) + 0.4
    assert diagnose(net, (x, 0.0)).layers[0].values_per_statistic == 16
    assert diagnose(net, {"x": x, "y": 1.0}).layers[0].input_shape == (16, 32)
    images = [torch.rand(3, 12, 10) + 0.2, torch.rand(3, 9, 14) + 0.2]
    report = diagnose(ImageListModel().eval(), images)
    assert report.layers[0].input_shape in ((1, 8, 10, 8), (1, 8, 7, 12))
    with pytest.raises(DoctorForwardError, match="running the model on example_inputs failed"):
        diagnose(net, torch.randn(2, 3))
    assert issubclass(DoctorForwardError, RuntimeError)
    with pytest.raises(TypeError, match="nn.Module"):
        diagnose("not a model", x)
    with pytest.raises(ValueError, match="train_batch_size must be >= 1"):
        diagnose(net, x, train_batch_size=0)
    with pytest.raises(TypeError, match="train_batch_size"):
        diagnose(net, x, train_batch_size=2.5)


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


def test_load_target(tmp_path):
    (tmp_path / "helper_mod.py").write_text("WIDTH = 32\n")
    (tmp_path / "target.py").write_text(FACTORY)
    model, example = load_target(f"{tmp_path / 'target.py'}:build")
    assert isinstance(model, nn.Sequential) and example.shape == (4, 3, 8, 8)
    assert diagnose(model, example).codes == {"uncalibrated_running_stats"}

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
            load_target(target)
        assert info.value.part == part, (part, str(info.value))
    with pytest.raises(DoctorTargetError, match="build, broken, not_a_pair|broken, build"):
        load_target(f"{tmp_path / 'target.py'}:nope")
    with pytest.raises(DoctorTargetError) as info:
        load_target("normlab_no_such_module:build")
    assert info.value.part == "import"
