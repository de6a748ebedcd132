"""freeze_bn(stats_only=True) and include= in fine-tuning loops on real architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.convert import freeze_bn, is_stats_frozen, unfreeze_bn
from normlab.kinds import is_batch_norm
from zoo._zoo import ZOO, images, outputs, zoo_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _affine(model: nn.Module, chosen) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{k}": p.detach().clone()
        for path, m in model.named_modules()
        if is_batch_norm(m) and chosen(path)
        for k, p in m.named_parameters()
    }


def _steps(model: nn.Module, batches, loss) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for batch in batches:
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()


def _moved(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    params = dict(model.named_parameters())
    return {k for k, v in before.items() if not torch.equal(params[k], v)}


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model.train()(x)


@pytest.mark.parametrize("entry", zoo_params(["tv_resnet50", "timm_efficientnet_b0"]))
def test_fine_tuning_trains_affine_and_keeps_every_statistic(entry):
    model = entry.build()
    _calibrate(model, torch.cat([entry.batch(100 + s) for s in range(2)]))
    freeze_bn(model, stats_only=True)
    stats, affine = _statistics(model), _affine(model, lambda p: True)
    assert len(affine) > 40

    def loss(m, x):
        return sum(t.float().square().mean() for t in outputs(m(x)))

    _steps(model, [entry.batch(200 + s) for s in range(2)], loss)
    assert all(torch.equal(v, stats[k]) for k, v in _statistics(model).items())
    params = dict(model.named_parameters())
    assert all(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in affine)
    # a few early γ of the deep untrained nets get updates below float32's resolution at 1.0
    assert len(_moved(model, affine)) >= 0.9 * len(affine)
    unfreeze_bn(model)  # ordinary BN again, in the model's (training) mode
    assert not any(is_stats_frozen(m) for m in model.modules())
    model(entry.batch(300))
    assert any(not torch.equal(v, stats[k]) for k, v in _statistics(model).items())


@pytest.mark.slow
def test_faster_rcnn_backbone_stats_frozen_head_trains():
    """The issue's 'done when': freeze_bn(model, stats_only=True, include='backbone.*')."""
    model = ZOO["tv_fasterrcnn_bn"].build()
    model, report = freeze_bn(model, stats_only=True, include="backbone.*", return_report=True)
    bns = [p for p, m in model.named_modules() if is_batch_norm(m)]
    assert len(report.replacements) == len(bns) > 40  # every BN of this model is in the backbone
    stats, affine = _statistics(model), _affine(model, lambda p: True)
    imgs = [t.clamp(0, 1) for t in images(2, 3, 64, seed=7).unbind(0)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 60.0, 30.0]]), "labels": torch.tensor([3])},
    ]

    def loss(m, batch):
        return sum(m(*batch).values())

    _steps(model, [(imgs, targets)], loss)
    assert all(torch.equal(v, stats[k]) for k, v in _statistics(model).items())
    assert _moved(model, affine)


@pytest.mark.slow
def test_freeze_at_2_on_resnet50():
    """detectron2's FREEZE_AT=2: the stem and the first stage frozen, the rest trains."""
    model = ZOO["tv_resnet50"].build()
    frozen = ["conv1", "bn1", "layer1"]
    model, report = freeze_bn(model, include=frozen, return_report=True)
    assert {r.path for r in report.replacements} == {
        p for p, m in model.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"
    }
    assert all(r.path == "bn1" or r.path.startswith("layer1.") for r in report.replacements)
    assert len(report.replacements) == 1 + 10  # bn1; layer1: 3 blocks x 3 + downsample
    assert all(s.path.split(".")[0] in {"layer2", "layer3", "layer4"} for s in report.skipped)
    trainable = [p for p, m in model.named_modules() if is_batch_norm(m)]
    assert len(trainable) == 53 - 11 and len(report.skipped) == 42
