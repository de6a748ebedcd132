"""include= / exclude= on every whole-model tool: one resolver, reports of what was left out."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model
from normlab.convert import (
    convert_norms,
    freeze_bn,
    is_stats_frozen,
    select_modules,
    unfreeze_bn,
)
from normlab.distributed import convert_sync, is_sync_layer, revert_sync
from normlab.fuse import fuse_conv_bn
from normlab.kinds import is_batch_norm, is_frozen_batch_norm
from normlab.recalibrate import recalibrate

#: TinyResNet's BatchNorm paths
STAGE0 = {"stages.0.body.1", "stages.0.body.3.1"}


def _bn_paths(model: nn.Module) -> set[str]:
    return {p for p, m in model.named_modules() if is_batch_norm(m)}


def test_a_pattern_selects_the_modules_inside_its_matches():
    model = make_model()
    for pattern in ("stages.0", "stages.0.*", ["stages.0.body"], ("stages.0.body.1", "*.3.1")):
        sel = select_modules(model, pattern, candidates=is_batch_norm)
        chosen = {p for p, m in model.named_modules() if sel(m)}
        want = (
            STAGE0
            if pattern != ("stages.0.body.1", "*.3.1")
            else {
                "stages.0.body.1",
                "stages.0.body.3.1",
                "stages.1.body.3.1",
            }
        )
        assert chosen == want, pattern
        assert set(sel.left_out) == _bn_paths(model) - want


def test_exclude_and_predicates():
    model = make_model()
    sel = select_modules(model, exclude="stages.*", candidates=is_batch_norm)
    chosen = {p for p, m in model.named_modules() if sel(m)}
    assert chosen == {p for p in _bn_paths(model) if not p.startswith("stages.")}
    sel = select_modules(
        model,
        lambda name, m: isinstance(m, nn.Sequential) and name.endswith("body"),
        exclude=lambda name, m: name.endswith(".3"),
        candidates=is_batch_norm,
    )
    chosen = {p for p, m in model.named_modules() if sel(m)}
    assert chosen == {"stages.0.body.1", "stages.1.body.1"}


def test_a_typo_is_an_error_naming_close_matches():
    model = make_model()
    for kw in ({"include": "stage.0"}, {"exclude": ["stages.0", "stems"]}):
        with pytest.raises(ValueError, match="matches no module") as e:
            freeze_bn(model, **kw)
        assert "Close matches" in str(e.value)
    assert not any(is_frozen_batch_norm(m) for m in model.modules())  # nothing changed
    with pytest.raises(ValueError, match="predicate returned False for every module"):
        convert_norms(model, "gn", include=lambda name, m: False)
    with pytest.raises(ValueError, match="leave none of the"):
        freeze_bn(model, include="stem.0")  # a conv: no BatchNorm inside
    with pytest.raises(TypeError, match="glob pattern, a list of patterns or a predicate"):
        freeze_bn(model, include=3)
    assert _bn_paths(model) == _bn_paths(make_model())


def test_convert_norms_reports_what_the_filter_left_out():
    model = make_model()
    all_bns = _bn_paths(model)
    model, report = convert_norms(model, "gn", include="stages.0")
    assert {r.path for r in report.replacements} == STAGE0
    left = {s.path for s in report.skipped}
    assert left == all_bns - STAGE0 and _bn_paths(model) == left
    assert all("include= / exclude=" in s.reason for s in report.skipped)
    assert type(model.stages[0].body[1]).__name__ == "GroupNorm"


def test_freeze_and_unfreeze_with_filters():
    model = make_model()
    model, report = freeze_bn(model, exclude="stages.0", return_report=True)
    assert _bn_paths(model) == STAGE0 == {s.path for s in report.skipped}
    model, report = unfreeze_bn(model, include="head", return_report=True)
    assert {r.path for r in report.replacements} == {
        p for p in _bn_paths(make_model()) if p.startswith("head.")
    }
    model = freeze_bn(make_model(), stats_only=True, include=["stem", "stages.0"])
    frozen = {p for p, m in model.named_modules() if is_stats_frozen(m)}
    assert frozen == STAGE0 | {"stem.1"}


def test_fuse_reports_filtered_bns():
    model = make_model().eval()
    x = inputs()
    want = model(x)
    model, report = fuse_conv_bn(model, x, include="stages.*", return_report=True)
    filtered = {s.bn for s in report.skipped if s.reason == "filtered"}
    assert filtered == {p for p in _bn_paths(make_model()) if not p.startswith("stages.")}
    assert {p.bn for p in report.fused} <= {
        p for p in _bn_paths(make_model()) if p.startswith("stages.")
    }
    assert report.fused and _bn_paths(model) >= filtered
    torch.testing.assert_close(model(x), want)


def test_recalibrate_touches_only_the_selected_layers():
    model = make_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [inputs(seed=s) for s in range(3)]
    report = recalibrate(model, batches, include="stages.0", return_report=True)
    assert set(report.recalibrated) == STAGE0
    assert set(report.filtered) == _bn_paths(model) - STAGE0
    for k, v in model.state_dict().items():
        inside = any(k.startswith(p + ".") for p in STAGE0)
        statistic = "running" in k or "num_batches" in k
        assert torch.equal(v, before[k]) != (inside and statistic), k


def test_recalibrate_counts_stats_frozen_layers_as_frozen():
    model = freeze_bn(make_model().eval(), stats_only=True, include="stages.0")
    model.train()
    report = recalibrate(model, [inputs()], return_report=True)
    assert set(report.frozen) == STAGE0 and not set(report.recalibrated) & STAGE0
    assert all(is_stats_frozen(model.get_submodule(p)) for p in STAGE0)
    assert model.training and model.stem[1].training  # modes put back as asked


def test_convert_sync_and_revert_sync_with_filters():
    model = make_model()
    convert_sync(model, include="stages.0")
    synced = {p for p, m in model.named_modules() if is_sync_layer(m) and m.process_group}
    assert synced == STAGE0
    convert_sync(model)
    revert_sync(model, exclude="head")
    still = {p for p, m in model.named_modules() if is_sync_layer(m) and m.process_group}
    assert still == {p for p in _bn_paths(model) if p.startswith("head.")}


def test_convert_sync_keeps_a_stats_only_freeze():
    model = freeze_bn(make_model(), stats_only=True)
    model.train()
    ref = copy.deepcopy(model)
    convert_sync(model)
    assert all(is_stats_frozen(m) for m in model.modules() if is_batch_norm(m))
    before = {k: v.clone() for k, v in model.named_buffers()}
    torch.testing.assert_close(model(inputs()), ref(inputs()))  # normlab's BN: rounding
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    revert_sync(model)
    assert all(is_stats_frozen(m) for m in model.modules() if is_batch_norm(m))


def test_convert_norms_keeps_a_stats_only_freeze_for_a_bn_target():
    model = freeze_bn(make_model(), stats_only=True)
    model, report = convert_norms(model, nnl.BatchNorm2d, include="stages")
    assert all(r.details["running_stats_frozen"] == "kept" for r in report.replacements)
    assert all(is_stats_frozen(m) for m in model.modules() if is_batch_norm(m))
