"""Real architectures, built without weights at small inputs, for the model-tool tests.

Each entry builds a fresh model and fresh random, off-center example batches in the
form the model takes (a tensor, or a list of (C, H, W) images for detectors).

torchvision on these machines is a CUDA build whose C++ ops do not load beside a
CPU torch: ``import torchvision`` fails with "operator torchvision::nms does not
exist". Its model definitions are pure Python; :func:`import_torchvision` defines
the two ops its import needs (``nms`` and ``qnms``, with a plain-torch CPU NMS) and
lets ``torchvision.ops.nms`` call them. RoIAlign already falls back to Python when
the C++ ops are missing (run eagerly here, not through its lazy torch.compile).
This lives in the tests only, never in the package.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

_LIB: Any = None


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: keep boxes in descending score order, drop those overlapping a kept one."""
    order = torch.argsort(scores, descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (area[i] + area - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def import_torchvision() -> Any:
    """Import torchvision on a CPU torch whose torchvision C++ ops are missing (tests only)."""
    global _LIB
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB.impl(op, _nms, "CPU")
    for name in [m for m in list(__import__("sys").modules) if m.startswith("torchvision")]:
        del __import__("sys").modules[name]
    tv = importlib.import_module("torchvision")
    boxes = importlib.import_module("torchvision.ops.boxes")
    boxes._assert_has_ops = lambda: None
    # The Python RoIAlign fallback compiles itself with torch.compile on first use
    # (seconds per shape on CPU); the tests run it eagerly.
    roi = importlib.import_module("torchvision.ops.roi_align")
    roi._roi_align = getattr(roi._roi_align, "__wrapped__", roi._roi_align)
    return tv


def require(module: str) -> Any:
    """Import a zoo library; in CI a missing one is a failure, elsewhere a skip."""
    if module == "torchvision":
        try:
            return import_torchvision()
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip("torchvision is not installed (pip install -e '.[test]')")
    if module.split(".")[0] in ("timm", "segmentation_models_pytorch"):
        require("torchvision")  # both import torchvision, which needs the shim first
    # Import-time deprecation notices of these libraries (fvcore scripts a function with
    # torch.jit.script at import) are theirs, not ours: the tests keep warnings as errors
    # for everything they call afterwards.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if os.environ.get("CI"):
            return importlib.import_module(module)
        return pytest.importorskip(module)


def images(n: int = 2, c: int = 3, size: int = 64, *, seed: int = 0) -> Tensor:
    """Off-center random images (mean ~0.5 + per-channel offset, not zero-centred)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-0.4, 0.6, c).reshape(1, c, 1, 1)
    return torch.rand(n, c, size, size, generator=g) + offset


def volumes(n: int = 2, c: int = 1, size: int = 32, *, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, size, generator=g) * 0.7 + 0.3


@dataclass
class ZooModel:
    """One architecture: how to build it and how to make a batch it takes."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Any] = field(default=lambda seed: images(seed=seed))
    spatial: int = 2  # 3 for volumetric models
    detector: bool = False


def _tv(fn: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = require("torchvision")
        return getattr(tv.models, fn)(weights=None, **kw)

    return build


def _tv_seg(fn: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        require("torchvision")
        seg = importlib.import_module("torchvision.models.segmentation")
        return getattr(seg, fn)(weights=None, weights_backbone=None, num_classes=5, **kw)

    return build


def _fasterrcnn(frozen: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = require("torchvision")
        det = importlib.import_module("torchvision.models.detection")
        utils = importlib.import_module("torchvision.models.detection.backbone_utils")
        norm = tv.ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        backbone = utils.resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=norm, trainable_layers=5
        )
        return det.FasterRCNN(
            backbone,
            num_classes=5,
            min_size=64,
            max_size=64,
            rpn_pre_nms_top_n_train=200,
            rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_train=100,
            rpn_post_nms_top_n_test=50,
            box_detections_per_img=20,
        )

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = require("timm")
        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _smp_unet() -> nn.Module:
    smp = require("segmentation_models_pytorch")
    return smp.Unet("resnet34", encoder_weights=None, classes=3)


def _monai_unet(dims: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        nets = require("monai.networks.nets")
        return nets.UNet(
            spatial_dims=dims,
            in_channels=1,
            out_channels=2,
            channels=(8, 16, 32),
            strides=(2, 2),
            num_res_units=1,
            norm="batch",
        )

    return build


def _image_list(seed: int) -> list[Tensor]:
    return list(images(2, 3, 64, seed=seed).clamp(0, 1).unbind(0))


ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in [
        ZooModel("tv_resnet50", _tv("resnet50")),
        ZooModel("tv_resnext50_32x4d", _tv("resnext50_32x4d")),
        ZooModel("tv_mobilenet_v3_large", _tv("mobilenet_v3_large")),
        ZooModel("tv_efficientnet_b0", _tv("efficientnet_b0")),
        ZooModel("tv_regnet_y_400mf", _tv("regnet_y_400mf")),
        ZooModel("tv_densenet121", _tv("densenet121")),
        ZooModel("tv_deeplabv3_resnet50", _tv_seg("deeplabv3_resnet50")),
        ZooModel("tv_fasterrcnn_bn", _fasterrcnn(False), _image_list, detector=True),
        ZooModel("tv_fasterrcnn_frozen", _fasterrcnn(True), _image_list, detector=True),
        ZooModel("timm_efficientnet_b0", _timm("efficientnet_b0")),
        ZooModel("timm_resnet50d", _timm("resnet50d")),
        ZooModel("smp_unet_resnet34", _smp_unet),
        ZooModel("monai_unet_2d", _monai_unet(2), lambda s: images(2, 1, 32, seed=s)),
        ZooModel("monai_unet_3d", _monai_unet(3), lambda s: volumes(seed=s), spatial=3),
    ]
}


def zoo_params(names: list[str] | None = None) -> list[Any]:
    """pytest params over the zoo (all entries, or the named ones), marked slow."""
    chosen = names if names is not None else list(ZOO)
    return [pytest.param(ZOO[n], id=n, marks=pytest.mark.slow) for n in chosen]


def outputs(out: Any) -> list[Tensor]:
    """Every tensor in a model's output (tensors, tuples, lists, dicts, detection dicts)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in outputs(v)]
    return []
