"""normlab.guard: a step that GradScaler skips leaves every running statistic as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab import nn as nlnn
from normlab.guard import snapshot_running_stats, step_skipped


def _net(norm):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )


NORMS = {
    "torch_bn": nn.BatchNorm2d,
    "torch_in": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
    "bn": nlnn.BatchNorm2d,
    "brn": nlnn.BatchRenorm2d,
    "mabn": nlnn.MovingAverageBatchNorm2d,
    "sn": nlnn.SwitchableNorm2d,
    "evonorm_b0": nlnn.EvoNormB0_2d,
}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 + 2 * torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)


def _step(model, opt, scaler, x, y, *, poison=False):
    """One AMP step; ``poison`` injects an inf into the loss's gradient path."""
    saved = snapshot_running_stats(model)
    scale = scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    if poison:
        loss = loss * torch.tensor(float("inf"))
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    skipped = step_skipped(scaler, scale)
    if skipped:
        saved.restore()
    return skipped


@pytest.mark.parametrize("name", list(NORMS))
def test_a_skipped_step_leaves_running_stats_and_weights_as_they_were(name):
    model = _net(NORMS[name]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _batch(0)
    assert not _step(model, opt, scaler, x, y)  # a real step moves the statistics
    before = copy.deepcopy(model.state_dict())
    x2, _ = _batch(1)
    assert _step(model, opt, scaler, x2, y, poison=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # and the next clean step trains and updates again
    assert not _step(model, opt, scaler, x2, y)
    stats = [k for k in before if "running" in k or "num_batches" in k or "pre_" in k]
    assert stats and any(not torch.equal(before[k], model.state_dict()[k]) for k in stats)


def test_snapshot_names_every_running_buffer_and_what_changed():
    model = _net(nn.BatchNorm2d).train()
    saved = snapshot_running_stats(model)
    assert saved.names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert saved.changed() == []
    model(_batch()[0])
    assert saved.changed() == saved.names
    live = model[1].running_mean
    saved.restore()
    assert saved.changed() == [] and model[1].running_mean is live  # restored in place


def test_snapshot_sees_nan_written_by_a_bad_batch():
    model = _net(nn.BatchNorm2d).train()
    saved = snapshot_running_stats(model)
    x = _batch()[0]
    x[0, 0, 0, 0] = float("nan")
    model(x)
    assert "1.running_mean" in saved.changed()
    saved.restore()
    assert torch.isfinite(model[1].running_mean).all()


def test_layers_without_running_stats_are_not_copied():
    model = nn.Sequential(nn.GroupNorm(2, 8), nn.BatchNorm2d(8, track_running_stats=False))
    assert snapshot_running_stats(model).names == []


def test_step_skipped_on_a_disabled_scaler_and_bad_arguments():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert step_skipped(scaler, 1.0) is False
    with pytest.raises(TypeError, match="GradScaler"):
        step_skipped(object(), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        snapshot_running_stats(torch.zeros(3))  # type: ignore[arg-type]
