"""bn_shared_across_calls: a batch-statistics layer that runs more than once per forward."""

from __future__ import annotations

import torch

from _models import make_model
from _testing import calibrate_bn
from normlab.convert import convert_norms, freeze_bn
from normlab.doctor import diagnose
from zoo._heads import LEVELS, SharedHeadFPN


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 16, 16, generator=g) + torch.linspace(-0.4, 0.6, 3).view(1, 3, 1, 1)


def _shared(report) -> dict[str, str]:
    return {f.module: f.detail for f in report.findings if f.code == "bn_shared_across_calls"}


def test_a_head_shared_by_three_levels_is_named_with_its_count():
    model = calibrate_bn(SharedHeadFPN(), [_images(s) for s in range(3)])
    for m in (model.eval(), model.train()):  # eval mixes the levels' statistics too
        report = diagnose(m, _images(9))
        assert list(_shared(report)) == ["norms.0"]
        assert f"runs {LEVELS} times in one forward" in _shared(report)["norms.0"]
        [f] = [f for f in report.findings if f.code == "bn_shared_across_calls"]
        assert f.severity == "warning" and "convert_norms(model, 'gn', include=" in f.fix


def test_the_fixes_are_quiet():
    per_level = calibrate_bn(SharedHeadFPN(per_level_norm=True), [_images(s) for s in range(3)])
    assert _shared(diagnose(per_level, _images(9))) == {}
    gn, report = convert_norms(SharedHeadFPN(), "gn", include="norms")
    assert len(report.replacements) == 1
    assert _shared(diagnose(gn.eval(), _images(9))) == {}
    frozen = freeze_bn(SharedHeadFPN())  # frozen statistics: no batch statistics to mix
    assert _shared(diagnose(frozen, _images(9))) == {}


def test_tiny_resnet_shared_refinement_bn():
    """TinyResNet registers one BN in two refinement blocks: the doctor names it."""
    model = make_model(dtype=torch.float32).eval()
    x = torch.rand(2, 3, 8, 8) + 0.3
    assert list(_shared(diagnose(model, x))) == ["refine.0.1"]
    assert "runs 2 times" in _shared(diagnose(model, x))["refine.0.1"]
