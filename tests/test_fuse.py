"""fuse_conv_bn on small nets: pairs found by data flow, the report, the checks, restore."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nnl
from _models import randomize_bn
from _testing import assert_close, offcenter
from normlab.fuse import compare_outputs, fuse_conv_bn


def ready(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, random BN state, eval."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.3)
    return randomize_bn(model.double(), seed).eval()


def snapshot(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, Tensor]]:
    mods = [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)]
    return mods, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, snap: tuple[list[tuple[str, int]], dict[str, Tensor]]) -> None:
    mods, state = snap
    assert [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)] == mods
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())


class ConvBN(nn.Module):
    """Custom forward: ``relu(bn(conv(x)))``, never an nn.Sequential."""

    def __init__(self, cin: int, cout: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    """torchvision-style basic block with a projection shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.a = ConvBN(cin, cout, 2)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, affine=False)
        self.down_conv = nn.Conv2d(cin, cout, 1, 2)
        self.down_bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.a(x)))
        return torch.relu(out + self.down_bn(self.down_conv(x)))


class SkipNet(nn.Module):
    """The conv's output also feeds a skip: folding the BN would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x + 1))


class Mixed(nn.Module):
    """Linear + BatchNorm1d, Conv1d + BN1d, Conv3d + BN3d, a dict/tuple/list output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn_fc = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.c1, self.bn1 = nn.Conv1d(2, 4, 3, bias=False), nn.BatchNorm1d(4)
        self.c3, self.bn3 = nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)

    def forward(self, v: Tensor, s: Tensor, vol: Tensor) -> dict[str, object]:
        out = (self.bn1(self.c1(s)), [self.bn3(self.c3(vol))])
        return {"fc": self.bn_fc(self.fc(v)), "seq": out}


def mixed_inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    return offcenter(4, 6, seed=seed), offcenter(2, 2, 9, seed=seed + 1), offcenter(2, 2, 4, 4, 4)


def test_custom_forward_pairs_and_residual_block_fold_in_place():
    model = ready(nn.Sequential(Residual(3, 6), Residual(6, 8)))
    x = offcenter(2, 3, 16, 16)
    want = model(x)
    block = model[0]
    fused, report = fuse_conv_bn(model, x, return_report=True)
    assert fused is model and type(model[0]) is Residual and model[0] is block
    assert (report.total_bns, report.folded_bns, report.skipped) == (6, 6, [])
    assert isinstance(block.a.bn, nn.Identity) and isinstance(block.bn2, nn.Identity)
    assert block.a.conv.bias is not None  # the bias-free conv got one
    assert report.traced == ["<model>"] and report.untraced == []
    assert {(p.conv, p.bn) for p in report.fused} >= {("0.a.conv", "0.a.bn"), ("1.conv2", "1.bn2")}
    assert_close(model(x), want)


def test_conv_feeding_a_skip_is_not_folded_and_the_reason_is_reported():
    model = ready(SkipNet())
    x = offcenter(2, 3, 8, 8)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    assert type(model.bn) is nn.BatchNorm2d
    [skip] = report.skipped
    assert (skip.bn, skip.reason) == ("bn", "conv_output_reused")
    assert "add" in skip.detail and "conv_output_reused" in str(report)
    assert_close(model(x), want)


def test_shared_conv_raises_when_strict_and_is_reported_otherwise():
    model = ready(SharedConv())
    with pytest.raises(ValueError, match="called 2 times.*untie"):
        fuse_conv_bn(model)
    x = offcenter(2, 3, 5, 5)
    want = model(x)
    _, report = fuse_conv_bn(model, x, strict=False, return_report=True)
    assert report.counts() == {"conv_shared": 2}
    assert_close(model(x), want)


def test_linear_conv1d_conv3d_affine_free_bn_and_nested_outputs():
    model = ready(Mixed())
    model.bn3 = nn.BatchNorm3d(3, affine=False).double().eval()
    randomize_bn(model.bn3)
    xs = mixed_inputs()
    want = model(*xs)
    _, report = fuse_conv_bn(model, xs, return_report=True)
    assert report.folded_bns == 3 and not report.skipped
    assert all(isinstance(getattr(model, n), nn.Identity) for n in ("bn_fc", "bn1", "bn3"))
    got = model(*xs)
    assert_close(got["fc"], want["fc"])
    assert_close(got["seq"][0], want["seq"][0])
    assert_close(got["seq"][1][0], want["seq"][1][0])


def test_transposed_conv_and_grouped_conv_fold():
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 6, 3, groups=3),
        nn.BatchNorm2d(6),
    )
    model = ready(model)
    x = offcenter(2, 4, 5, 5)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    assert report.folded_bns == 2
    assert_close(model(x), want)


def test_training_bn_and_untracked_bn_reported_when_not_strict_frozen_bn_folded_in_train():
    model = ready(nn.Sequential(ConvBN(3, 4), ConvBN(4, 4), ConvBN(4, 4)))
    model[0].bn.train()
    model[1].bn = nn.BatchNorm2d(4, track_running_stats=False).double().eval()
    frozen = nnl.FrozenBatchNorm2d(4).double()
    randomize_bn(frozen)
    model[2].bn = frozen.train()
    with pytest.raises(ValueError, match=r"0\.bn .*training mode.*model\.eval"):
        fuse_conv_bn(model)
    _, report = fuse_conv_bn(model, strict=False, return_report=True)
    assert report.counts() == {"training_mode": 1, "no_running_stats": 1}
    assert [p.bn for p in report.fused] == ["2.bn"]


def test_weight_standardized_conv_is_skipped_plain_subclass_is_folded():
    class Padded(nn.Conv2d):  # a subclass whose weight is used as is: folds
        pass

    model = ready(nn.Sequential(nnl.WSConv2d(3, 4, 3), nn.BatchNorm2d(4), Padded(4, 4, 1)))
    model.append(nn.BatchNorm2d(4).double().eval())
    randomize_bn(model)
    x = offcenter(2, 3, 6, 6)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    [skip] = report.skipped
    assert skip.reason == "conv_transforms_weight" and "WSConv2d" in skip.detail
    assert [p.conv_type for p in report.fused] == ["Padded"]
    assert_close(model(x), want)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d layout: BN, then ``drop``, then ``act`` submodules."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def test_norm_act_layer_keeps_its_activation():
    model = ready(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4)))
    x = offcenter(2, 3, 6, 6)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    assert isinstance(model[1], nn.Sequential) and isinstance(model[1].act, nn.SiLU)
    assert report.fused[0].replacement == "Sequential"
    assert_close(model(x), want)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, its children trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBN(3, 4)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), Gate(), nn.ReLU())
        self.gate, self.tail = Gate(), nn.Sequential(nn.BatchNorm2d(4), Gate())

    def forward(self, x: Tensor) -> Tensor:
        y = self.tail(self.seq(self.block(x)))
        return y if float(y.detach().mean()) > -1e9 else -y


class Gate(nn.Module):
    """Untraceable, and hides a conv + BN pair from the tracer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) if float(x.detach().sum()) != 0.5 else x


def test_untraceable_model_traces_submodules_and_falls_back_to_sequential_order():
    model = ready(Untraceable())
    x = offcenter(2, 3, 6, 6)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    assert {p for p, _ in report.untraced} == {"<model>", "seq", "seq.2", "gate", "tail", "tail.1"}
    assert report.traced == ["block"] and report.sequential_fallback == ["seq", "tail"]
    assert {p.bn for p in report.fused} == {"block.bn", "seq.1"}
    skipped = {(s.bn, s.reason) for s in report.skipped}
    assert skipped == {(p, "not_analysed") for p in ("seq.2.bn", "gate.bn", "tail.0", "tail.1.bn")}
    assert_close(model(x), want)


def test_shared_bn_fed_by_two_convs_is_folded_into_both():
    class TwoConvs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.a(x)) * self.bn(self.b(x))

    model = ready(TwoConvs())
    x = offcenter(2, 3, 5, 5)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    assert (report.folded_bns, len(report.fused)) == (1, 2)
    assert_close(model(x), want)


def test_failed_output_check_restores_the_model_exactly():
    model = ready(nn.Sequential(ConvBN(3, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model.append(nn.Dropout(0.5).train())  # random outputs: the output check must fail
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="differs by up to .*restored"):
        fuse_conv_bn(model, offcenter(2, 3, 5, 5))
    assert_same(model, snap)
    # compare=False: only the site check runs, which this model passes
    fuse_conv_bn(model, offcenter(2, 3, 5, 5), compare=False)
    assert isinstance(model[2], nn.Identity)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_exception_while_checking_restores_the_model(failure):
    model = ready(nn.Sequential(ConvBN(3, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    snap = snapshot(model)
    calls = []

    def forward_fn(m: nn.Module, batch: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise failure("boom")
        return m(batch)

    with pytest.raises(RuntimeError if failure is RuntimeError else failure, match="boom"):
        fuse_conv_bn(model, offcenter(2, 3, 5, 5), forward_fn=forward_fn)
    assert_same(model, snap)


def test_compare_callable_sees_outputs_and_can_fail():
    model = ready(Mixed())
    xs = mixed_inputs()
    seen = []

    def compare(before, after):
        seen.append((before, after))
        return "custom says no"

    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="custom says no.*restored"):
        fuse_conv_bn(model, xs, compare=compare)
    assert_same(model, snap)
    before, after = seen[0]
    assert set(before) == {"fc", "seq"} and set(after) == {"fc", "seq"}
    with pytest.raises(RuntimeError, match="compare returned False"):
        fuse_conv_bn(model, xs, compare=lambda a, b: False)
    assert_same(model, snap)
    fuse_conv_bn(model, xs, compare=lambda a, b: torch.allclose(a["fc"], b["fc"]))
    assert isinstance(model.bn_fc, nn.Identity)


def test_compare_outputs_structure_tolerance_and_detections():
    a = {"x": torch.ones(3, dtype=torch.float64), "n": torch.tensor([1, 2]), "k": [1.0]}
    assert compare_outputs(a, copy.deepcopy(a)) is None
    assert "differs" in compare_outputs(a, {**a, "x": a["x"] + 1e-6})
    assert compare_outputs(a, {**a, "x": a["x"] + 1e-6}, rtol=1e-5, atol=1e-5) is None
    assert "values differ" in compare_outputs(a, {**a, "n": torch.tensor([1, 3])})
    assert "keys" in compare_outputs(a, {"x": a["x"]})
    assert "shape" in compare_outputs([a["x"]], [a["x"][:2]])
    assert "items" in compare_outputs((a["x"],), (a["x"], a["x"]))
    dets = [{"boxes": torch.rand(4, 4), "scores": torch.rand(4), "labels": torch.arange(4)}]
    shuffled = [{k: v.flip(0)[:3] for k, v in dets[0].items()}]
    assert compare_outputs(dets, shuffled) is None  # order and count may change with rounding


def test_site_check_catches_a_bn_variant_the_probe_misses():
    class Clamped(nn.BatchNorm2d):  # standard on small inputs, not on real ones
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x.clamp(max=20.0))

    model = ready(nn.Sequential(nn.Conv2d(3, 4, 1), Clamped(4)))
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="0 folded with 1 differs.*not modified"):
        fuse_conv_bn(model, offcenter(2, 3, 4, 4, loc=200.0))
    assert_same(model, snap)


def test_site_check_drops_a_pair_whose_traced_wiring_does_not_hold():
    class TwoFaced(nn.Module):  # traces as bn(conv(x)); runs as bn(x) + conv(x)
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: Tensor) -> Tensor:
            if not isinstance(x, Tensor):
                return self.bn(self.conv(x))
            return self.bn(x) + self.conv(x)

    model = ready(TwoFaced())
    x = offcenter(2, 3, 4, 4)
    want = model(x)
    _, report = fuse_conv_bn(model, x, return_report=True)
    assert report.counts() == {"runtime_wiring": 1} and not report.fused
    assert_close(model(x), want)


def test_report_text_and_dict():
    model = ready(nn.Sequential(SkipNet(), ConvBN(3, 4)))
    _, report = fuse_conv_bn(model, return_report=True)
    d = json.loads(json.dumps(report.to_dict()))
    assert (d["total_bns"], d["folded_bns"]) == (2, 1)
    assert d["skipped_by_reason"] == {"conv_output_reused": 1}
    text = str(report)
    assert "folded 1 of 2" in text and "0.bn (BatchNorm2d): conv_output_reused" in text
    assert "1.conv <- 1.bn" in text


def test_bad_compare_argument_and_model_that_is_a_bn():
    model = ready(ConvBN(3, 4))
    with pytest.raises(TypeError, match="compare must be a callable"):
        fuse_conv_bn(model, offcenter(1, 3, 4, 4), compare="strict")
    assert type(model.bn) is nn.BatchNorm2d
    bn = nn.BatchNorm2d(3).eval()
    _, report = fuse_conv_bn(bn, return_report=True)
    assert report.counts() == {"model_is_bn": 1}
