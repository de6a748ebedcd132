"""The doctor on real architectures: quiet on healthy models, loud on planted problems."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _testing import calibrate_bn
from normlab.doctor import diagnose
from normlab.kinds import is_batch_norm
from zoo._zoo import ZOO, images, zoo_params

#: calibration images: enough for running statistics that describe the data at every
#: layer of these untrained models (detectors: fewer, their heads are slow on CPU)
CALIBRATION_IMAGES = 16
DETECTOR_CALIBRATION_IMAGES = 6


calibrate = calibrate_bn


#: models several tests use: calibrated once, each test gets a deep copy
_REUSED = {"tv_resnet50", "tv_deeplabv3_resnet50", "tv_fasterrcnn_bn"}
_CALIBRATED: dict[str, nn.Module] = {}


def calibrated(entry) -> nn.Module:
    """A fresh model calibrated on fresh batches (one forward of all of them for tensors)."""
    if entry.name in _CALIBRATED:
        return copy.deepcopy(_CALIBRATED[entry.name])
    model = entry.build()
    if entry.detector:
        batches = [entry.batch(100 + s) for s in range(DETECTOR_CALIBRATION_IMAGES // 2)]
    else:
        batches = [torch.cat([entry.batch(100 + s) for s in range(CALIBRATION_IMAGES // 2)])]
    calibrate(model, batches)
    if entry.name in _REUSED:
        _CALIBRATED[entry.name] = model
        return copy.deepcopy(model)
    return model


@pytest.fixture
def resnet50():
    return calibrated(ZOO["tv_resnet50"])


def finding_lines(report) -> list[str]:
    return [x for x in report.to_table().splitlines() if x.split(" ")[0] in report.counts()]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("entry", zoo_params())
def test_calibrated_eval_models_have_no_errors(entry):
    model = calibrated(entry)
    report = diagnose(model, entry.batch(0))
    assert not report.has_errors, report.to_table(verbose=True)
    # Healthy statistics: nothing but notes (channel counts for GroupNorm(32)).
    assert report.codes <= {"groupnorm32_blocked"}, report.to_table(verbose=True)
    assert len(finding_lines(report)) == len(report.codes) <= 1


@pytest.mark.parametrize("entry", zoo_params(["tv_regnet_y_400mf"]))
def test_fresh_model_is_one_note_in_either_mode(entry):
    model = entry.build()
    x = entry.batch(0)
    for training, severity in ((False, "warning"), (True, "info")):
        report = diagnose(model.train(training), x)
        fresh = [f for f in report.findings if f.code == "uncalibrated_running_stats"]
        assert [(f.severity, f.module) for f in fresh] == [(severity, "")]
        assert not report.has_errors and "stale_running_stats" not in report.codes
        assert len(finding_lines(report)) == len(report.codes) <= 2


@pytest.mark.slow
def test_planted_tiny_batch_in_training(resnet50):
    """resnet50 on 32×32 images: layer4 sees a 1×1 map, so batch 1 gives 1 value."""
    model = resnet50
    x = images(2, 3, 32, seed=5)
    assert not diagnose(model, x).has_errors  # evaluated: running statistics, fine
    report = diagnose(model.train(), x, train_batch_size=1)
    tiny = {f.module: f.severity for f in report.findings if f.code == "tiny_batch_statistic"}
    errors = {m for m, s in tiny.items() if s == "error"}
    assert errors and all(m.startswith("layer4.") for m in errors)
    assert tiny["layer4.0.bn2"] == tiny["layer4.2.bn3"] == "error"
    assert tiny["layer3.0.bn2"] == "warning"  # 2×2 map: 4 values
    assert "layer1.0.bn1" not in tiny
    [line] = [x for x in finding_lines(report) if "tiny_batch_statistic" in x]
    assert line.startswith("error") and "more" in line


@pytest.mark.parametrize("entry", zoo_params(["tv_deeplabv3_resnet50"]))
def test_deeplab_pooling_branch_is_a_training_problem_only(entry):
    model = calibrated(entry)
    x = entry.batch(0)
    assert not diagnose(model, x).has_errors  # batch 2 in eval: fine
    report = diagnose(model, x, train_batch_size=2)
    tiny = {f.module: f.severity for f in report.findings if f.code == "tiny_batch_statistic"}
    assert tiny == {"classifier.0.convs.4.2": "error"}  # ASPP pooling: 2 × 1×1 values


@pytest.mark.slow
def test_planted_frozen_affine_in_training(resnet50):
    model = resnet50
    bns = [(n, m) for n, m in model.named_modules() if is_batch_norm(m)]
    for _, m in bns:
        m.requires_grad_(False)
    x = images(2, 3, 64, seed=8)
    assert "bn_params_frozen_stats_not" not in diagnose(model, x).codes  # evaluated
    report = diagnose(model.train(), x)
    found = [f.module for f in report.findings if f.code == "bn_params_frozen_stats_not"]
    assert found == [n for n, _ in bns]
    assert sum("bn_params_frozen_stats_not" in x for x in finding_lines(report)) == 1
    for _, m in bns:
        m.eval()  # frozen properly: nothing to say
    assert "bn_params_frozen_stats_not" not in diagnose(model, x).codes


@pytest.mark.parametrize("entry", zoo_params(["tv_fasterrcnn_bn"]))
def test_planted_detector_backbone_left_in_training(entry):
    model = calibrated(entry)
    model.backbone.body.layer3.train()  # e.g. a fine-tuning loop that forgot one stage
    report = diagnose(model, entry.batch(0))  # a list of images
    found = {f.module for f in report.findings if f.code == "bn_training_mode"}
    expected = {
        n
        for n, m in model.named_modules()
        if is_batch_norm(m) and n.startswith("backbone.body.layer3")
    }
    assert found == expected and report.has_errors


@pytest.mark.slow
def test_planted_frn_on_a_1x1_map(resnet50):
    """BN → FRN in resnet50's last stage, at 32×32 images: FRN normalizes 1 value there."""
    model = resnet50
    for m in list(model.layer4.modules()):
        for child_name, child in list(m.named_children()):
            if is_batch_norm(child):
                setattr(m, child_name, nnl.FilterResponseNorm2d(child.num_features))
    x = images(2, 3, 32, seed=6)
    report = diagnose(model, x)
    frn = {f.module for f in report.findings if f.code == "tiny_instance_statistic"}
    assert len(frn) == 10 and all(m.startswith("layer4.") for m in frn)
    assert not report.has_errors
    assert "tiny_instance_statistic" not in diagnose(model, images(2, 3, 128, seed=7)).codes
