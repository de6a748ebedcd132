"""The segmentation U-Net: shapes, every lab norm name, and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab import nn as nnl
from normlab.lab.data.scenes import silhouette_scenes
from normlab.lab.models.resnet import resolve_norm
from normlab.lab.models.unet import UNet, build_segmentation_model, segmentation_norms
from normlab.lab.tasks.seg_metrics import seg_cross_entropy


@pytest.mark.parametrize(
    ("widths", "shape"),
    [((16, 32, 64), (3, 3, 32, 32)), ((8, 16), (2, 3, 12, 20)), ((8,), (2, 1, 5, 7))],
)
def test_output_is_per_pixel_logits(widths, shape):
    torch.manual_seed(0)
    model = build_segmentation_model("gn", 5, in_channels=shape[1], widths=widths)
    out = model(torch.randn(shape) + 0.5)
    assert out.shape == (shape[0], 5, *shape[2:])


def test_size_not_divisible_is_refused():
    model = build_segmentation_model("bn", 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(2, 3, 30, 32))


def test_norm_names_cover_the_lab_2d_norms():
    names = segmentation_norms()
    for expected in ("bn", "bn+recal", "bn+sync", "gn", "ln", "in", "frn", "sn", "brn"):
        assert expected in names
    assert "bn1d" not in names and "bn3d" not in names
    with pytest.raises(ValueError, match="2-D norm"):
        build_segmentation_model("bn1d", 3)
    with pytest.raises(ValueError, match="unknown norm"):
        build_segmentation_model("nope", 3)


@pytest.mark.parametrize("norm", segmentation_norms())
def test_every_norm_trains_and_evaluates_at_batch_2(norm):
    torch.manual_seed(0)
    model = build_segmentation_model(norm, 4, widths=(8, 16, 16))
    x = torch.randn(2, 3, 16, 16) * 2 + 1
    y = torch.randint(0, 4, (2, 16, 16))
    y[0, 0] = 255
    model.train()
    loss = seg_cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss.detach())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(model.encoder[0][0][0].weight.grad.abs().sum()) > 0
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_norm_layers_come_from_the_lab():
    frn = build_segmentation_model("frn", 3)
    assert not any(isinstance(m, nn.ReLU) for m in frn.modules())  # the TLU is the activation
    assert sum(isinstance(m, nnl.FilterResponseNorm2d) for m in frn.modules()) == 10
    bn = build_segmentation_model("bn+recal", 3)
    assert resolve_norm("bn+recal") == "bn"
    assert sum(isinstance(m, nnl.BatchNorm2d) for m in bn.modules()) == 10
    assert isinstance(build_segmentation_model("gn", 3), UNet)


def test_it_learns_the_silhouette_scenes(one_thread):
    data = silhouette_scenes(n_train=32, n_test=8, image_size=16, labels="foreground", seed=5)
    torch.manual_seed(0)
    model = build_segmentation_model("gn", data.num_classes, widths=(8, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data.x_train, data.y_train
    with torch.no_grad():
        before = float(seg_cross_entropy(model(x), y))
    for step in range(30):
        idx = torch.arange(8 * (step % 4), 8 * (step % 4) + 8)
        loss = seg_cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(seg_cross_entropy(model(x), y))
    assert after < 0.6 * before
