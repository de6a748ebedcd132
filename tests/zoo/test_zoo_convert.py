"""convert_norms / freeze_bn / unfreeze_bn on real architectures from torchvision, timm, smp, MONAI.

Every target is trained for one step (forward, backward, SGD step, eval forward)
on at least three models (see MATRIX): all of them on the MONAI U-Nets (the
3-D one: every target with a 3-D variant) and on timm EfficientNet-B0 (fused
norm + activation layers), three on each other model. Freezing must keep
eval outputs and every activation; frozen BatchNorm from torchvision must be
named and convertible on request; targets without a 3-D variant must be refused
on a 3-D U-Net; the report must count the nonlinearities a target adds where
the BatchNorm had no activation after it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from _models import randomize_bn
from normlab.convert import convert_norms, freeze_bn, unfreeze_bn
from normlab.feed import feed
from normlab.kinds import is_batch_norm, is_frozen_batch_norm
from zoo._zoo import ZOO, outputs, require, zoo_params

ALL = [
    "bn", "frozen_bn", "gn", "ln", "in", "sn", "frn", "frn_linear", "mabn", "brn",
    "evonorm_b0", "evonorm_s0",
]  # fmt: skip
MATRIX: dict[str, list[str]] = {
    "monai_unet_2d": ALL,
    "monai_unet_3d": [t for t in ALL if not t.startswith("evonorm")],  # no 3-D EvoNorm
    "timm_efficientnet_b0": ALL,
    "tv_resnet50": ["gn", "frn", "frozen_bn"],
    "tv_resnext50_32x4d": ["ln", "brn", "evonorm_b0"],
    "tv_mobilenet_v3_large": ["in", "mabn", "frn_linear"],
    "tv_efficientnet_b0": ["sn", "evonorm_s0", "bn"],
    "tv_regnet_y_400mf": ["bn", "ln", "mabn"],
    "tv_densenet121": ["gn", "frozen_bn", "frn_linear"],
    "tv_deeplabv3_resnet50": ["gn", "bn", "ln"],
    "tv_fasterrcnn_bn": ["gn", "frozen_bn", "sn"],
    "tv_fasterrcnn_frozen": ["gn", "bn", "frn_linear"],
    "timm_resnet50d": ["frn_linear", "evonorm_b0", "mabn"],
    "smp_unet_resnet34": ["gn", "in", "evonorm_s0"],
}
_ACTS = {"relu", "relu6", "silu", "swish", "gelu", "hardswish", "hardsigmoid", "sigmoid", "prelu"}


def _needs_imports(entry: Any) -> None:
    if entry.name.startswith(("tv_", "timm_")):
        require("torchvision")  # timm imports torchvision, which needs the zoo's op shim


def activations(model: nn.Module) -> int:
    """Activation modules (torch's and timm's), each counted once."""
    return sum(type(m).__name__.lower() in _ACTS for m in model.modules())


def loss_of(entry: Any, model: nn.Module, seed: int) -> torch.Tensor:
    if entry.detector:
        images = entry.batch(seed)
        targets = [
            {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [20.0, 10.0, 60.0, 50.0]]),
             "labels": torch.tensor([1, 3])}
            for _ in images
        ]  # fmt: skip
        return sum(feed(model, (images, targets)).values())
    outs = [t for t in outputs(feed(model, entry.batch(seed))) if t.is_floating_point()]
    return sum(t.float().square().mean() for t in outs)


def eval_outputs(entry: Any, model: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in outputs(feed(model.eval(), entry.batch(1))) if t.is_floating_point()]


_CASES = [
    pytest.param(ZOO[name], target, id=f"{name}-{target}", marks=pytest.mark.slow)
    for name, targets in MATRIX.items()
    for target in targets
]


@pytest.mark.parametrize("entry, target", _CASES)
def test_converted_model_trains_a_step(entry, target):
    _needs_imports(entry)
    model = entry.build()
    acts = activations(model)
    frozen = entry.name.endswith("frozen")
    model, report = convert_norms(model, target, frozen=frozen)
    assert len(report) > 0
    assert not any(is_batch_norm(m) or is_frozen_batch_norm(m) for m in model.modules()) or (
        target in ("bn", "frozen_bn")
    )
    assert activations(model) == acts  # norm + activation layers keep theirs
    model.train()
    loss = loss_of(entry, model, 0)
    assert torch.isfinite(loss)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    torch.optim.SGD(params, lr=1e-3).step()
    outs = eval_outputs(entry, model)
    assert outs and all(torch.isfinite(t).all() for t in outs)


_FREEZE = ["timm_efficientnet_b0", "timm_resnet50d", "tv_mobilenet_v3_large", "monai_unet_3d"]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Equal up to float32 rounding (a frozen BN computes x·scale + shift, BN (x − μ)·γ/σ + β)."""
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("entry", zoo_params(_FREEZE))
def test_freeze_and_unfreeze_keep_eval_outputs_and_activations(entry):
    _needs_imports(entry)
    model = randomize_bn(entry.build(), seed=3).eval()
    want, acts = eval_outputs(entry, model), activations(model)
    frozen = freeze_bn(copy.deepcopy(model))
    assert not any(is_batch_norm(m) for m in frozen.modules())
    assert activations(frozen) == acts
    assert_same(eval_outputs(entry, frozen), want)
    frozen.train()  # frozen layers ignore the mode; dropout does not, so it stays in eval
    for m in frozen.modules():
        m.training = m.training and "Drop" not in type(m).__name__
    with torch.no_grad():
        assert_same(outputs(feed(frozen, entry.batch(1))), want)
    thawed = unfreeze_bn(frozen)
    assert not any(is_frozen_batch_norm(m) for m in thawed.modules())
    assert activations(thawed) == acts
    assert_same(eval_outputs(entry, thawed), want)


@pytest.mark.parametrize("entry", zoo_params(["tv_fasterrcnn_frozen"]))
def test_foreign_frozen_bn_is_named_and_converted_on_request(entry):
    _needs_imports(entry)
    model = entry.build()
    frozen = [p for p, m in model.named_modules() if is_frozen_batch_norm(m)]
    assert len(frozen) == 53
    same, report = convert_norms(model, "gn")
    assert len(report) == 0 and [s.path for s in report.skipped] == frozen
    (warning,) = report.warnings
    assert "53 frozen BatchNorm" in warning and "backbone.body.bn1" in warning
    assert "frozen=True" in warning
    same, report = convert_norms(same, "gn", frozen=True)
    assert len(report) == 53 and report.skipped == []
    assert all(r.details["was_frozen"] for r in report.replacements)
    thawed = unfreeze_bn(entry.build())
    assert sum(is_batch_norm(m) for m in thawed.modules()) == 53


@pytest.mark.parametrize("entry", zoo_params(["monai_unet_3d"]))
@pytest.mark.parametrize("target", ["evonorm_b0", "evonorm_s0"])
def test_2d_only_target_is_refused_on_3d_bn(entry, target):
    model = entry.build()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"BatchNorm3d.*5-D.*Nothing was changed"):
        convert_norms(model, target)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize(
    "entry, total, linear",
    [
        pytest.param(ZOO["tv_resnet50"], 53, 20, id="tv_resnet50", marks=pytest.mark.slow),
        pytest.param(
            ZOO["tv_mobilenet_v3_large"], 46, 15, id="tv_mobilenet_v3_large",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ZOO["timm_efficientnet_b0"], 49, 16, id="timm_efficientnet_b0",
            marks=pytest.mark.slow,
        ),
        # BN -> DropBlock (identity) -> act, and MONAI's norm -> dropout -> PReLU: followed
        pytest.param(ZOO["timm_resnet50d"], 55, 20, id="timm_resnet50d", marks=pytest.mark.slow),
        pytest.param(ZOO["monai_unet_2d"], 6, 0, id="monai_unet_2d", marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_added_nonlinearity_is_counted(entry, total, linear):
    _needs_imports(entry)
    _, report = convert_norms(entry.build(), "frn")
    assert len(report.added_nonlinearity) == total
    no_act = [r.path for r in report.replacements if not r.details["activation_after_bn"]]
    assert len(no_act) == linear
    assert f"{linear} of them had no activation" in report.warnings[0]
    _, report = convert_norms(entry.build(), "frn_linear")
    assert report.added_nonlinearity == [] and not any("nonlinearity" in w for w in report.warnings)
