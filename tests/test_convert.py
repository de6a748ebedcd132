"""Model surgery: convert_norms, freeze_bn / unfreeze_bn, fuse_conv_bn on a ResNet-style model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model, randomize_bn
from _testing import assert_close
from normlab.convert import (
    convert_norms,
    freeze_bn,
    fuse_conv_bn,
    is_batch_norm,
    is_frozen_batch_norm,
    unfreeze_bn,
)
from normlab.kinds import activation_tail, is_norm_act, overrides_forward
from normlab.registry import NORM_LAYERS, group_norm_layer

N_BN = 8  # distinct BatchNorm modules in TinyResNet (one of them registered twice)


def bn_paths(model):
    return [p for p, m in model.named_modules() if is_batch_norm(m)]


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's layout and math, without importing torchvision."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d layout: BN, then ``drop``, then ``act`` (no timm import)."""

    def __init__(self, n: int, act: bool = True) -> None:
        super().__init__(n)
        self.drop, self.act = nn.Dropout(0.0), (nn.SiLU() if act else nn.Identity())

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does more than BN."""

    def forward(self, x):
        return 2 * super().forward(x)


def silu(model: nn.Module) -> int:
    return sum(isinstance(m, nn.SiLU) for m in model.modules())


def norm_act_model() -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 1), BatchNormAct2d(8, False)]
    return randomize_bn(nn.Sequential(*layers)).double().eval()


# ----------------------------------------------------------------------------- convert_norms


def test_convert_to_gn_replaces_every_bn_and_reports_it():
    model = make_model()
    model.stages[1].body[1].train(False)
    gamma = model.stem[1].weight.detach().clone()
    model.stem[1].weight.requires_grad_(False)
    model, report = convert_norms(model, "gn")
    assert bn_paths(model) == []
    assert len(report) == N_BN
    # the shared BN became ONE GroupNorm, registered in both places
    assert model.refine[0][1] is model.refine[1][1]
    shared = next(r for r in report.replacements if r.path == "refine.0.1")
    assert shared.aliases == ("refine.1.1",)
    stem = next(r for r in report.replacements if r.path == "stem.1")
    assert stem.old_type == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert stem.new_type == "normlab.nn.group_norm.GroupNorm"
    assert stem.details["num_groups"] == 8 and "32 does not divide" in stem.details["groups_reason"]
    # γ, dtype, training flag and requires_grad carried
    gn = model.stem[1]
    assert_close(gn.weight, gamma)
    assert gn.weight.dtype == torch.float64 and not gn.weight.requires_grad
    assert model.stages[1].body[1].training is False and model.stem[1].training is True
    assert "refine.0.1 (also refine.1.1)" in str(report)
    # BatchNorm1d(16) -> GroupNorm(16, 16) on (N, C) input normalizes single values
    assert any("head.fc.1" in w and "1 channel per group" in w for w in report.warnings)
    assert report.to_dict()["replacements"][0]["path"] == "stem.1"


def test_gn_uses_32_groups_when_possible():
    model = make_model(width=32)
    model, report = convert_norms(model, "gn")
    assert {r.details["num_groups"] for r in report.replacements} == {32}
    assert {r.details["groups_reason"] for r in report.replacements} == {"32 divides C"}


def test_converted_model_trains():
    model, report = convert_norms(make_model(dtype=torch.float32, width=32), "gn", num_groups=8)
    assert report.warnings == []
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = inputs(8, dtype=torch.float32), torch.arange(8) % 5
    before = copy.deepcopy(model.state_dict())
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(before["stem.1.weight"], model.state_dict()["stem.1.weight"])


def test_convert_to_normlab_bn_keeps_outputs():
    model = make_model().eval()
    x = inputs()
    want = model(x)
    converted, report = convert_norms(copy.deepcopy(model), "bn")
    assert type(converted.stem[1]) is nnl.BatchNorm2d
    assert type(converted.head["fc"][1]) is nnl.BatchNorm1d  # rank matched
    assert all(r.details.get("running_stats") == "copied" for r in report.replacements)
    assert_close(converted(x), want)
    # and back to torch's classes through a class target
    back, _ = convert_norms(converted, nn.BatchNorm2d)
    assert type(back.head["fc"][1]) is nn.BatchNorm1d
    assert_close(back(x), want)


def test_convert_to_frozen_equals_eval_bn():
    model = make_model().eval()
    x = inputs()
    frozen, _ = convert_norms(copy.deepcopy(model), "frozen_bn")
    assert type(frozen.head["fc"][1]) is nnl.FrozenBatchNorm1d
    assert_close(frozen(x), model(x))


def test_convert_with_partial_and_eps():
    model = make_model()
    model.stem[1].eps = 1e-3
    model, report = convert_norms(model, functools.partial(group_norm_layer, num_groups=2))
    assert model.stem[1].num_groups == 2
    assert report.replacements[0].details["groups_reason"] == "as given"
    assert model.stem[1].eps == 1e-3


def test_convert_syncbn_and_root_bn():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SyncBatchNorm(8))
    model, report = convert_norms(model, "gn")
    assert type(model[1]) is nnl.GroupNorm and len(report) == 1
    root, report = convert_norms(nn.BatchNorm2d(4), "in")
    assert type(root) is nnl.InstanceNorm2d and report.replacements[0].path == ""


def test_model_without_bn_gives_a_warning_not_a_crash():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    same, report = convert_norms(model, "gn")
    assert same is model and len(report) == 0
    assert "no BatchNorm" in report.warnings[0]


def test_unknown_target_and_failing_target():
    with pytest.raises(KeyError, match="known names"):
        convert_norms(make_model(), "nope")
    with pytest.raises(KeyError, match="convert_norms: unknown norm 'resnet'; known names") as e:
        convert_norms(make_model(), "resnet")
    assert all(name in str(e.value) for name in NORM_LAYERS)
    with pytest.raises(ValueError, match="stem.1"):
        convert_norms(make_model(), "gn", num_groups=3)  # 3 does not divide 8


@pytest.mark.parametrize("model", ["resnet", None, [nn.BatchNorm2d(4)]])
def test_a_model_that_is_not_a_module_says_what_is_expected(model):
    with pytest.raises(TypeError, match=r"model must be an nn.Module.*convert_norms\(model, to\)"):
        convert_norms(model, "gn")
    with pytest.raises(TypeError, match="convert_norms: to: expected a norm name"):
        convert_norms(make_model(), 3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- freeze / unfreeze


def test_freeze_is_exact_and_survives_train():
    model = make_model().eval()
    x = inputs()
    want = model(x)
    frozen = freeze_bn(copy.deepcopy(model))
    assert bn_paths(frozen) == []
    assert type(frozen.stem[1]) is nnl.FrozenBatchNorm2d
    assert type(frozen.head["fc"][1]) is nnl.FrozenBatchNorm1d
    assert frozen.refine[0][1] is frozen.refine[1][1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(frozen.stem[1], name), getattr(model.stem[1], name))
    assert_close(frozen(x), want)
    frozen.train()
    state = copy.deepcopy(frozen.state_dict())
    assert_close(frozen(x), want)  # still uses the running statistics
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any("stem.1" in n for n, _ in frozen.named_parameters())


def test_freeze_refuses_bn_without_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze_bn(model)
    assert type(model[1]) is nn.BatchNorm2d


def test_unfreeze_round_trip():
    model = make_model().eval()
    x = inputs()
    thawed = unfreeze_bn(freeze_bn(copy.deepcopy(model)))
    assert type(thawed.stem[1]) is nnl.BatchNorm2d
    assert type(thawed.head["fc"][1]) is nnl.BatchNorm1d
    assert isinstance(thawed.stem[1].weight, nn.Parameter)
    assert int(thawed.stem[1].num_batches_tracked) == 0
    assert_close(thawed(x), model(x))


def test_torchvision_style_frozen_bn_is_accepted():
    layer = FrozenBatchNorm2d(4)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
    assert is_frozen_batch_norm(layer)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer).double()
    x = inputs(2)
    want = model(x)
    thawed = unfreeze_bn(copy.deepcopy(model)).eval()
    assert type(thawed[1]) is nnl.BatchNorm2d
    assert_close(thawed(x), want)
    fused = fuse_conv_bn(copy.deepcopy(model))
    assert isinstance(fused[1], nn.Identity)
    assert_close(fused(x), want)


# ----------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_model_equals_original_in_eval(dtype):
    model = make_model(dtype=dtype).eval()
    x = inputs(dtype=dtype)
    want = model(x)
    fused = fuse_conv_bn(copy.deepcopy(model), check_inputs=x)
    assert bn_paths(fused) == []  # every BN here follows a conv or linear in a Sequential
    assert isinstance(fused.stem[1], nn.Identity)
    assert fused.stem[0].bias is not None  # the bias-free conv got one
    assert isinstance(fused.head["fc"][1], nn.Identity)  # Linear + BatchNorm1d
    assert_close(fused(x), want, dtype=dtype)


def test_fuse_frozen_model_and_conv3d():
    model = freeze_bn(make_model()).train()  # frozen layers fuse whatever the mode
    x = inputs()
    want = model(x)
    assert_close(fuse_conv_bn(model)(x), want)
    net = nn.Sequential(nn.Conv3d(2, 3, 2, bias=False), nn.BatchNorm3d(3)).double()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x3 = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64)
    want = net(x3)
    assert_close(fuse_conv_bn(net)(x3), want)


def test_fuse_refuses_training_bn():
    model = make_model().train()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        fuse_conv_bn(model)
    assert type(model.stem[1]) is nn.BatchNorm2d  # untouched


def test_fuse_refuses_shared_conv():
    conv = nn.Conv2d(3, 4, 1)
    model = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Sequential(conv)).eval()
    with pytest.raises(ValueError, match="registered in 2 places"):
        fuse_conv_bn(model)


def test_fuse_refuses_bn_without_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        fuse_conv_bn(model)


def test_fuse_check_inputs_mismatch_restores_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    model[2].train()  # random outputs: the check must fail
    with pytest.raises(RuntimeError, match="restored"):
        fuse_conv_bn(model, check_inputs=torch.randn(2, 3, 4, 4))
    assert type(model[1]) is nn.BatchNorm2d and model[0].bias is not None


def test_kinds_recognise_norm_act_and_custom_forward():
    assert is_norm_act(layer := BatchNormAct2d(4)) and overrides_forward(layer)
    assert (
        list((tail := activation_tail(layer))._modules) == ["drop", "act"] and tail.act is layer.act
    )
    assert activation_tail(nn.BatchNorm2d(4)) is None and not is_norm_act(nn.BatchNorm2d(4))
    assert not any(map(overrides_forward, [nn.SyncBatchNorm(4), nnl.BatchNorm2d(4), nn.ReLU()]))
    assert overrides_forward(ScaledBatchNorm2d(4)) and not is_norm_act(ScaledBatchNorm2d(4))


def test_freeze_and_unfreeze_keep_the_activation_exactly():
    model, x = norm_act_model(), inputs(2)
    want, frozen = model(x), freeze_bn(copy.deepcopy(model))
    assert silu(frozen) == silu(model) == 1
    assert type(frozen[1].norm) is nnl.FrozenBatchNorm2d and isinstance(frozen[3].act, nn.Identity)
    assert "1.norm.running_var" in frozen.state_dict() and "1.norm.weight" in frozen.state_dict()
    assert_close(frozen(x), want)
    thawed = unfreeze_bn(frozen).eval()
    assert type(thawed[1].norm) is nnl.BatchNorm2d and silu(thawed) == 1
    assert_close(thawed(x), want)


def test_convert_keeps_the_activation_and_says_so():
    model = norm_act_model()
    act, (converted, report) = model[1].act, convert_norms(model, "gn", num_groups=2)
    assert type(converted[1].norm) is nnl.GroupNorm and converted[1].act is act
    assert report.replacements[0].new_type.endswith("GroupNorm + SiLU")
    assert report.replacements[0].details["activation"].startswith("kept (SiLU)")
    model, x = norm_act_model(), inputs(2)
    as_bn, _ = convert_norms(copy.deepcopy(model), "bn")
    assert silu(as_bn) == 1 and type(as_bn[1].norm) is nnl.BatchNorm2d
    assert_close(as_bn(x), model(x))


@pytest.mark.parametrize("tool", [freeze_bn, lambda m: convert_norms(m, "gn")])
def test_custom_batchnorm_forward_is_refused(tool):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4))
    with pytest.raises(ValueError, match=r"1 \(ScaledBatchNorm2d\).*own forward"):
        tool(model)
    assert type(model[1]) is ScaledBatchNorm2d


def test_frozen_bn_is_named_and_converted_on_request():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    same, report = convert_norms(model, "gn")
    assert type(same[1]) is FrozenBatchNorm2d and [s.path for s in report.skipped] == ["1"]
    assert "frozen=True" in report.warnings[0] and "1" in report.warnings[0]
    assert "left in place" in str(report) and report.to_dict()["skipped"][0]["path"] == "1"
    weight, (converted, report) = (
        model[1].weight.clone(),
        convert_norms(model, "gn", frozen=True, num_groups=2),
    )
    assert type(converted[1]) is nnl.GroupNorm and report.replacements[0].details["was_frozen"]
    assert torch.equal(converted[1].weight.detach(), weight)
    assert report.skipped == [] and report.warnings == []


def test_added_nonlinearity_is_reported_with_the_linear_layers():
    model, report = convert_norms(make_model(), "frn")
    assert len(report.added_nonlinearity) == N_BN
    after = {r.path: r.details["activation_after_bn"] for r in report.replacements}
    assert after["stem.1"] and after["head.fc.1"]  # followed by nn.ReLU
    assert not after["stages.0.body.3.1"]  # residual-branch end
    assert not after["stages.1.shortcut.1"]  # projection shortcut
    assert "head.fc.1" in report.warnings[0] and "(N, C)" in report.warnings[0]  # FRN1d
    assert "frn_linear" in report.warnings[1] and "stages.0.body.3.1" in report.warnings[1]
    d = report.to_dict()
    assert d["added_nonlinearity"] == report.added_nonlinearity and "warning: " in str(report)
    assert "TLU" in d["replacements"][0]["details"]["nonlinearity"] and d["skipped"] == []
    model, report = convert_norms(make_model(), "frn_linear")
    assert model.stem[1].tau is None and type(model.head["fc"][1]) is nnl.FilterResponseNorm1d
    assert report.added_nonlinearity == [] and len(report.warnings) == 1


def test_narrow_groups_are_named_with_their_channels():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 64, 1))
    model.append(nn.BatchNorm2d(64))
    assert convert_norms(copy.deepcopy(model), "gn", num_groups=4)[1].warnings == []
    _, report = convert_norms(model, "gn")
    (warning,) = report.warnings
    assert "1 (C=16, 16 groups)" in warning and "3 (C=64, 32 groups)" in warning
    assert report.replacements[0].details["channels_per_group"] == 1


@pytest.mark.parametrize("target", ["evonorm_b0", "evonorm_s0"])
def test_2d_only_target_on_3d_and_1d_bn_is_refused(target):
    model = nn.Sequential(nn.Conv3d(1, 8, 1), nn.BatchNorm3d(8), nn.Flatten(), nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match=r"1 is a BatchNorm3d.*5-D.*Nothing was changed") as e:
        convert_norms(model, target)
    assert type(model[1]) is nn.BatchNorm3d
    hint = str(e.value).split("Pick a target that takes it (")[1].split(")")[0]
    assert "'gn'" in hint and "'rms'" in hint and "evonorm" not in hint  # from the registry
    with pytest.raises(ValueError, match=r"BatchNorm1d"):  # EvoNorm has no 1-D variant either
        convert_norms(nn.Sequential(nn.BatchNorm1d(8)), target)
    converted, _ = convert_norms(model, "frn_linear")
    assert type(converted[1]) is nnl.FilterResponseNorm3d and converted[1].tau is None
