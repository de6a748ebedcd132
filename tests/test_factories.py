"""norm_layer(): the ``norm_layer=`` argument of torchvision and timm model constructors."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from normlab import registry
from normlab.registry import norm_layer


def test_positional_channels_and_bound_keywords():
    make = norm_layer("gn", num_groups=4)
    layer = make(16)
    assert type(layer) is nnl.GroupNorm and layer.num_groups == 4 and layer.num_channels == 16
    assert type(norm_layer("frn", rank=3)(8)) is nnl.FilterResponseNorm3d
    assert type(norm_layer(nnl.BatchNorm2d, rank=1)(8)) is nnl.BatchNorm1d
    assert pickle.loads(pickle.dumps(make))(8).num_groups == 4


def test_timm_style_calls():
    make = norm_layer("bn")
    # timm accepts only a class, a function or a partial, and rebinds a partial's keywords
    assert (
        isinstance(make, functools.partial)
        and make.func is registry._build_norm_layer
        and not make.args
    )
    rebound = functools.partial(make.func, **make.keywords)
    layer = rebound(8, device=None, dtype=torch.float64)
    assert type(layer) is nnl.BatchNorm2d and layer.weight.dtype == torch.float64


def test_norm_act_protocol_needs_a_bound_activation():
    with pytest.raises(TypeError, match=r"act_layer=torch.nn.SiLU"):
        norm_layer("gn")(16, inplace=True)
    make = norm_layer("gn", act_layer=nn.SiLU, num_groups=4)
    layer = make(16, inplace=True)
    assert list(layer._modules) == ["norm", "act"] and isinstance(layer.act, nn.SiLU)
    assert layer.act.inplace
    assert isinstance(make(16, apply_act=False).act, nn.Identity)
    x = torch.randn(2, 16, 4, 4) + 0.3
    assert torch.allclose(layer(x.clone()), nn.functional.silu(layer.norm(x)))


def test_bad_names_and_keywords_fail_clearly():
    with pytest.raises(KeyError, match="known names"):
        norm_layer("nope")
    with pytest.raises(ValueError, match="rank"):
        norm_layer("gn", rank=4)
    with pytest.raises(TypeError, match=r"norm_layer\('gn'\).*momentum"):
        norm_layer("gn")(16, momentum=0.1)


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x).float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 32, generator=g) + torch.linspace(-0.4, 0.6, 3).reshape(1, 3, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gn", "frn_linear"])
def test_torchvision_resnet50(name):
    from zoo._zoo import require

    tv = require("torchvision")
    model = tv.models.resnet50(weights=None, num_classes=10, norm_layer=norm_layer(name))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert type(model.layer1[0].bn3).__module__.startswith("normlab")
    _train_step(model, _images())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gn", "frn_linear"])
def test_timm_resnet50(name):
    from zoo._zoo import require

    require("torchvision")  # timm imports torchvision, which needs the zoo's op shim here
    timm = require("timm")
    model = timm.create_model("resnet50", num_classes=10, norm_layer=norm_layer(name))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _train_step(model, _images())


@pytest.mark.slow
def test_timm_efficientnet_keeps_its_activations():
    from zoo._zoo import require

    require("torchvision")
    timm = require("timm")
    reference = timm.create_model("efficientnet_b0", num_classes=10)
    model = timm.create_model(
        "efficientnet_b0", num_classes=10, norm_layer=norm_layer("gn", act_layer=nn.SiLU)
    )
    silu = [sum(isinstance(m, nn.SiLU) for m in n.modules()) for n in (model, reference)]
    assert silu[0] == silu[1] > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(_images(1))).all()
