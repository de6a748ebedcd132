"""freeze_bn(stats_only=True): running statistics fixed in every mode, γ/β train; unfreeze_bn."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from _models import inputs, make_model
from normlab.convert import freeze_bn, is_stats_frozen, unfreeze_bn
from normlab.kinds import is_batch_norm
from zoo._zoo import require

_LAYERS = {
    "torch1d": (lambda: nn.BatchNorm1d(5), (6, 5, 7)),
    "torch1d_flat": (lambda: nn.BatchNorm1d(5), (6, 5)),
    "torch2d": (lambda: nn.BatchNorm2d(5), (6, 5, 4, 3)),
    "torch3d": (lambda: nn.BatchNorm3d(5), (6, 5, 3, 2, 3)),
    "torch2d_no_affine": (lambda: nn.BatchNorm2d(5, affine=False), (6, 5, 4, 3)),
    "sync": (lambda: nn.SyncBatchNorm(5), (6, 5, 4, 3)),
    "normlab1d": (lambda: nnl.BatchNorm1d(5), (6, 5, 7)),
    "normlab2d": (lambda: nnl.BatchNorm2d(5), (6, 5, 4, 3)),
    "normlab3d": (lambda: nnl.BatchNorm3d(5), (6, 5, 3, 2, 3)),
}


def _trained(make, shape, seed=0) -> nn.Module:
    """A BN with non-trivial γ, β and running statistics (off-center data)."""
    torch.manual_seed(seed)
    bn = make().double()
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(1.0, 3.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(7)
    return bn


def _batch(shape, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 2.5


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_train_mode_is_eval_bn_and_statistics_never_move(kind):
    make, shape = _LAYERS[kind]
    ref = _trained(make, shape).eval()  # the oracle: the same BN in eval mode, γ/β trainable
    bn = freeze_bn(copy.deepcopy(ref).train(), stats_only=True)
    assert is_stats_frozen(bn) and is_batch_norm(bn)
    bn.train()
    before = _buffers(bn)
    x = _batch(shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = _batch(shape, seed=2)
    out, want = bn(x), ref(x_ref)
    assert not torch.equal(out, torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    if ref.weight is not None:
        assert bn.weight.requires_grad and bn.bias.requires_grad
        assert isinstance(bn.weight, nn.Parameter)
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=0, atol=0)
        assert bn.weight.grad.abs().sum() > 0
    for k, v in _buffers(bn).items():
        assert torch.equal(v, before[k]), k


def test_timm_batchnormact_keeps_its_activation():
    timm = require("timm")
    norm_act = timm.layers.BatchNormAct2d(5, act_layer=nn.ReLU)
    ref = _trained(lambda: norm_act, (6, 5, 4, 3)).eval()
    bn = freeze_bn(copy.deepcopy(ref), stats_only=True).train()
    assert type(bn).__name__ == "FixedStatsBatchNormAct2d" and isinstance(bn.act, nn.ReLU)
    before, x = _buffers(bn), _batch((6, 5, 4, 3))
    torch.testing.assert_close(bn(x), ref(x), rtol=0, atol=0)
    assert (bn(x) == 0).any()  # the ReLU still runs
    assert all(torch.equal(v, before[k]) for k, v in _buffers(bn).items())
    assert list(bn.state_dict()) == list(ref.state_dict())


def test_fine_tuning_loop_trains_affine_and_leaves_statistics_bitwise():
    model = make_model()
    freeze_bn(model, stats_only=True)
    model.train()  # after freezing too: the layers stay on their statistics
    stats = _buffers(model)
    affine = {
        f"{path}.{k}": p.detach().clone()
        for path, m in model.named_modules()
        if is_batch_norm(m)
        for k, p in m.named_parameters()
    }
    assert len(affine) >= 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        model(inputs(seed=10 + step)).square().mean().backward()
        opt.step()
    for k, v in _buffers(model).items():
        assert torch.equal(v, stats[k]), k
    moved = [
        k for k, p in model.named_parameters() if k in affine and not torch.equal(p, affine[k])
    ]
    assert sorted(moved) == sorted(affine)


def test_state_dict_keys_and_checkpoints_round_trip():
    plain = make_model(seed=3)
    frozen = freeze_bn(make_model(seed=4), stats_only=True)
    assert list(frozen.state_dict()) == list(plain.state_dict())
    frozen.load_state_dict(plain.state_dict())  # a normal BN checkpoint loads
    for k, v in plain.state_dict().items():
        assert torch.equal(frozen.state_dict()[k], v)
    back = make_model(seed=5)
    back.load_state_dict(frozen.state_dict())  # and back into a plain model
    x = inputs()
    torch.testing.assert_close(back.eval()(x), frozen.train()(x), rtol=0, atol=0)


def test_unfreeze_gives_ordinary_bn_in_the_models_mode():
    model = make_model()
    classes = [type(m) for m in model.modules() if is_batch_norm(m)]
    freeze_bn(model, stats_only=True)
    count = sum(is_stats_frozen(m) for m in model.modules())
    model.train()
    model, report = unfreeze_bn(model, return_report=True)
    assert count > 5 and len(report.replacements) == count and not report.skipped
    bns = [m for m in model.modules() if is_batch_norm(m)]
    assert bns and all(not is_stats_frozen(m) and m.training for m in bns)
    assert [type(m) for m in bns] == classes
    before = _buffers(model)
    model(inputs())
    assert not torch.equal(_buffers(model)["stem.1.running_mean"], before["stem.1.running_mean"])
    model = freeze_bn(model.eval(), stats_only=True)
    unfreeze_bn(model)
    assert all(not m.training for m in model.modules() if is_batch_norm(m))


def test_parameters_and_optimizer_survive_freezing():
    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    freeze_bn(model, stats_only=True)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    model.train()
    opt.zero_grad()
    model(inputs()).sum().backward()
    opt.step()  # the optimizer built before freezing still moves γ/β


def test_deepcopy_pickle_and_torch_save_keep_the_freeze():
    bn = freeze_bn(_trained(lambda: nn.BatchNorm2d(5), (2, 5, 3, 3)), stats_only=True)
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    copies = [
        copy.deepcopy(bn),
        pickle.loads(pickle.dumps(bn)),
        torch.load(buf, weights_only=False),
    ]
    x = _batch((6, 5, 3, 3))
    for c in copies:
        assert is_stats_frozen(c)
        c.train()
        before = _buffers(c)
        torch.testing.assert_close(c(x), bn.eval()(x), rtol=0, atol=0)
        assert all(torch.equal(v, before[k]) for k, v in _buffers(c).items())


def test_stats_only_is_idempotent_and_full_freeze_still_applies():
    model = freeze_bn(freeze_bn(make_model(), stats_only=True), stats_only=True)
    assert all(is_stats_frozen(m) for m in model.modules() if is_batch_norm(m))
    x = inputs()
    want = model.eval()(x)
    full = freeze_bn(model)
    assert not any(is_batch_norm(m) for m in full.modules())
    torch.testing.assert_close(full.train()(x), want)  # FrozenBN folds γ/σ: rounding


def test_stats_only_refuses_bn_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze_bn(model, stats_only=True)
    assert type(model[1]) is nn.BatchNorm2d
