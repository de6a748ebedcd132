"""`--task detection --model file.py:factory`: a torchvision Faster R-CNN, built without
weights at a small size, trains through the sweep for one tiny cell; the torchvision
detection API is checked before anything is stored; the frozen treatments keep the
factory's statistics and refuse a model that has none."""

from __future__ import annotations

import textwrap

import pytest
import torch

from normlab.cli import main
from normlab.lab.data.det_coco import load_detection_split
from normlab.lab.models.user_detector import to_rows, to_targets
from normlab.lab.models.user_model import load_factory
from normlab.lab.run.config import RunConfig
from normlab.lab.run.user_detection import UserDetectionBuilder
from normlab.lab.sweep.store import RunStore
from zoo._zoo import require

FACTORY = """
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign


def build(num_classes, norm_layer=nn.BatchNorm2d, pretrained_stats=False):
    body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
    if pretrained_stats:  # stands for loading a checkpoint: non-initial statistics
        g = torch.Generator().manual_seed(1)
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.num_features, generator=g))
    backbone = BackboneWithFPN(
        body, {"layer2": "0", "layer3": "1"}, [128, 256], out_channels=16
    )
    anchors = AnchorGenerator(((8,), (16,), (32,)), ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], 7, 2),
        box_head=TwoMLPHead(16 * 49, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        min_size=32, max_size=32,
        rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
        box_batch_size_per_image=16, box_detections_per_img=10,
    )


def pretrained(num_classes):
    return build(num_classes, pretrained_stats=True)


def no_api(num_classes):
    return resnet.resnet18(num_classes=num_classes)
"""


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory):
    require("torchvision")
    path = tmp_path_factory.mktemp("det") / "tv_det.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    argv = ["data", "export-coco", str(out), "--train", "8", "--val", "4", "--image-size", "32"]
    assert main(argv) == 0
    return out


def test_targets_and_rows_follow_torchvision_labels():
    """Class k is torchvision label k + 1 (0 is the background); padding rows are dropped;
    detections come back best-first, padded with class -1."""
    target = torch.tensor(
        [[[2, 1, 2, 9, 8], [-1, -1, -1, -1, -1]], [[0, 0, 0, 4, 4], [1, 3, 3, 6, 7]]]
    )
    t0, t1 = to_targets(target)
    assert t0["labels"].tolist() == [3] and t0["boxes"].tolist() == [[1, 2, 9, 8]]
    assert t1["labels"].tolist() == [1, 2] and t0["boxes"].dtype == torch.float32
    out = [{"scores": torch.tensor([0.2, 0.9]), "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0, 0, 2, 2], [1, 1, 5, 5]]).float()}]  # fmt: skip
    rows = to_rows(out, top_k=3)
    want = torch.tensor([[0.9, 2, 1, 1, 5, 5], [0.2, 0, 0, 0, 2, 2]])
    assert torch.equal(rows[0, :2], want)
    assert rows[0, 2, 1] == -1 and rows[0, 2, 0] == 0


def _sweep(factory_file, coco, tmp_path, norms, name="build"):
    argv = ["sweep", "--task", "detection", "--model", f"{factory_file}:{name}",
            "--norms", norms, "--batch-sizes", "2", "--seeds", "1", "--epochs", "1",
            "--image-size", "32", "--data", str(coco / "train.json"),
            "--val-data", str(coco / "val.json"), "--db", str(tmp_path / "d.db"),
            "--out", str(tmp_path / "rep"), "--workers", "1", "--quiet"]  # fmt: skip
    return main(argv)


def test_faster_rcnn_trains_through_model(factory_file, coco, tmp_path):
    assert _sweep(factory_file, coco, tmp_path, "bn,gn") == 0
    with RunStore(tmp_path / "d.db", create=False) as store:
        records = store.records()
    assert sorted(r.config.norm for r in records) == ["bn", "gn"]
    for r in records:
        assert set(r.final_metrics) == {"ap_error", "ap", "ap50", "ap75"}
        assert 0 <= r.final_metrics["ap"] <= 100
        assert r.final_error == pytest.approx(100 - r.final_metrics["ap"])
        assert r.config.model == "tv_det.py:build" and r.config.pretrain is None
        assert r.conversion["built"] > 0 and r.conversion["staleness"] is None
    gn = next(r for r in records if r.config.norm == "gn")
    assert gn.conversion["new_types"] == {"normlab.nn.group_norm.GroupNorm": 9}
    assert "Test COCO AP@[.5:.95]" in (tmp_path / "rep" / "report.md").read_text()


def test_a_model_off_the_api_gets_one_line_before_anything_is_stored(
    factory_file, coco, tmp_path, capsys
):
    assert _sweep(factory_file, coco, tmp_path, "bn", name="no_api") != 0
    err = capsys.readouterr().err.strip()
    assert "torchvision-style detector" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "d.db").exists()


def test_frozen_treatment_refuses_initial_statistics(factory_file, coco, tmp_path, capsys):
    assert _sweep(factory_file, coco, tmp_path, "frozen_bn") != 0
    err = capsys.readouterr().err
    assert "initial statistics" in err and "load pretrained weights" in err


@pytest.mark.parametrize("treatment", ["frozen_bn", "bn_eval", "bn+recal"])
def test_frozen_treatments_keep_or_reestimate_the_factorys_statistics(factory_file, treatment):
    factory = load_factory(f"{factory_file}:pretrained")
    reference = factory.factory(num_classes=4)
    split = load_detection_split(None, 32, 16)
    config = RunConfig(norm=treatment, batch_size=2, seed=0, task="detection")
    model, summary = UserDetectionBuilder(factory).summary(config, split)
    frozen = [m for m in model.modules() if hasattr(m, "running_mean")]
    ref = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(frozen) == len(ref) > 0
    same = all(
        torch.equal(a.running_mean, b.running_mean) for a, b in zip(frozen, ref, strict=True)
    )
    assert same == (treatment != "bn+recal")
    assert summary.norm == treatment and len(summary.staleness) == len(ref)
    kinds = {type(m).__name__ for m in frozen}
    trained = [p.requires_grad for m in frozen for p in m.parameters()]
    if treatment == "bn_eval":  # statistics frozen, affine trained
        assert kinds == {"FixedStatsBatchNorm2d"} and trained and all(trained)
    else:
        assert kinds == {"FrozenBatchNorm2d"} and not any(trained)
