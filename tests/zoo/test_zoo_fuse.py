"""fuse_conv_bn on real architectures: every BN fed by a conv is folded, outputs unchanged.

Each model runs in float64 on one cropped sample (float64 grouped convolutions
are slow on CPU). The expected counts are the architecture's: every BN whose
input is a conv's output, and only densenet121's BNs after a concatenation or
pooling are left (62 of 121). Detectors are checked on their deterministic part
(transform + backbone, where all their BNs are); their full output check, where
detections may reorder with rounding, is exercised in float32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normlab.feed import feed
from normlab.fuse import fuse_conv_bn
from normlab.kinds import is_batch_norm, is_frozen_batch_norm
from zoo._zoo import ZOO, outputs, zoo_params

# model: (BNs, folded, skipped by reason)
EXPECTED: dict[str, tuple[int, int, dict[str, int]]] = {
    "tv_resnet50": (53, 53, {}),
    "tv_resnext50_32x4d": (53, 53, {}),
    "tv_mobilenet_v3_large": (46, 46, {}),
    "tv_efficientnet_b0": (49, 49, {}),
    "tv_regnet_y_400mf": (53, 53, {}),
    "tv_densenet121": (121, 59, {"not_fed_by_conv": 62}),
    "tv_deeplabv3_resnet50": (60, 60, {}),
    "tv_fasterrcnn_bn": (53, 53, {}),
    "tv_fasterrcnn_frozen": (53, 53, {}),
    "timm_efficientnet_b0": (49, 49, {}),
    "timm_resnet50d": (55, 55, {}),
    "smp_unet_resnet34": (46, 46, {}),
    "monai_unet_2d": (6, 6, {}),
    "monai_unet_3d": (6, 6, {}),
}


def _batch(entry: Any) -> Any:
    batch = entry.batch(3)
    if entry.detector:
        return [t.double() for t in batch[:1]]
    if entry.spatial == 3:
        return batch[:1].double()
    return batch[:1, :, :32, :32].double()


def _backbone(model: nn.Module, images: list[Tensor]) -> Any:
    """A detector's deterministic part: resize/normalize, then backbone + FPN features."""
    return model.backbone(model.transform(images)[0].tensors)


def _bn_count(model: nn.Module) -> int:
    return len({id(m) for m in model.modules() if is_batch_norm(m) or is_frozen_batch_norm(m)})


def test_every_zoo_model_has_an_expectation():
    assert set(EXPECTED) == set(ZOO)


@pytest.mark.parametrize("entry", zoo_params())
def test_fuse_folds_every_conv_fed_bn_and_keeps_outputs(entry):
    model = entry.build().eval().double()
    cls = type(model)
    batch = _batch(entry)
    seen: list[tuple[Any, Any]] = []

    def capture(before: Any, after: Any) -> None:  # before: the unfused model's output
        seen.append((before, after))

    forward_fn = (lambda m, b: _backbone(m, b)) if entry.detector else None
    _, report = fuse_conv_bn(
        model, batch, compare=capture, forward_fn=forward_fn, return_report=True
    )
    total, folded, skipped = EXPECTED[entry.name]
    assert (report.total_bns, report.folded_bns, report.counts()) == (total, folded, skipped), str(
        report
    )
    assert type(model) is cls and _bn_count(model) == total - folded
    assert report.check.startswith(f"site check: {len(report.fused)} of {len(report.fused)}")
    [(before, after)] = seen
    want, got = outputs(before), outputs(after)
    assert want and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_detector_check_passes_in_float32_although_detections_may_reorder():
    entry = ZOO["tv_fasterrcnn_bn"]
    model = entry.build().eval()
    images = entry.batch(4)[:1]
    with torch.no_grad():
        want = _backbone(model, images)
    _, report = fuse_conv_bn(model, images, return_report=True)
    assert report.folded_bns == 53 and report.check.endswith("outputs compared")
    with torch.no_grad():
        got = _backbone(model, images)
        dets = feed(model, images)
    assert {"boxes", "scores", "labels"} <= set(dets[0])
    for g, w in zip(outputs(got), outputs(want), strict=True):  # float32 rounding, to scale
        assert float((g - w).abs().max()) <= 1e-4 * max(1.0, float(w.abs().max()))
