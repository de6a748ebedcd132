"""Shared detector heads on real models: the doctor finds a shared BN, GN only in the head."""

from __future__ import annotations

import pytest
import torch

from normlab.convert import convert_norms, freeze_bn
from normlab.doctor import diagnose
from normlab.kinds import is_batch_norm
from zoo._heads import retinanet
from zoo._zoo import ZOO, images, zoo_params

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

#: RetinaNet v2's feature levels (P3-P7): its head runs once per level
FPN_LEVELS = 5


def _image_list(seed: int) -> list[torch.Tensor]:
    return list(images(2, 3, 64, seed=seed).clamp(0, 1).unbind(0))


def _shared(report) -> dict[str, str]:
    return {f.module: f.detail for f in report.findings if f.code == "bn_shared_across_calls"}


def test_torchvision_heads_share_no_bn_by_default():
    """RetinaNet v2's head uses GroupNorm(32) (FCOS's too): nothing to report."""
    assert _shared(diagnose(retinanet(bn_head=False).eval(), _image_list(0))) == {}


def test_retinanet_head_built_with_batchnorm_is_named():
    model = retinanet(bn_head=True).eval()
    head_bns = {p for p, m in model.named_modules() if is_batch_norm(m) and p.startswith("head.")}
    assert len(head_bns) == 8  # 4 convs in each of the two subnets
    found = _shared(diagnose(model, _image_list(0)))
    assert set(found) == head_bns
    assert all(f"runs {FPN_LEVELS} times" in d for d in found.values())


def test_gn_only_in_the_head():
    model = retinanet(bn_head=True)
    model, report = convert_norms(model, "gn", include="head")
    assert {r.path.split(".")[0] for r in report.replacements} == {"head"}
    assert len(report.replacements) == 8
    assert report.skipped and all(s.path.startswith("backbone.") for s in report.skipped)
    assert all(p.startswith("backbone.") for p, m in model.named_modules() if is_batch_norm(m))
    assert _shared(diagnose(model.eval(), _image_list(1))) == {}


def test_faster_rcnn_last_stage_to_gn_and_stem_frozen():
    model = ZOO["tv_fasterrcnn_bn"].build()
    model, report = convert_norms(model, "gn", include="backbone.body.layer4")
    assert len(report.replacements) == 10  # 3 bottlenecks x 3 BNs + the downsample's
    assert all(r.path.startswith("backbone.body.layer4.") for r in report.replacements)
    assert len(report.skipped) == 53 - 10
    model, freeze = freeze_bn(
        model,
        include=["backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"],
        return_report=True,
    )
    assert len(freeze.replacements) == 11 and len(freeze.skipped) == 53 - 10 - 11
    with torch.no_grad():
        model.eval()(_image_list(2))


@pytest.mark.parametrize("entry", zoo_params())
def test_no_zoo_model_shares_a_bn(entry):
    model = entry.build().eval()
    assert _shared(diagnose(model, entry.batch(0))) == {}
