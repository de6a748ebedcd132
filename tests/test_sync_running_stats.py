"""normlab.distributed.sync_running_stats: every rank ends with the same running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab import nn as nnl
from normlab.distributed import sync_running_stats
from test_distributed import run_world


def _model(extra: bool = False) -> nn.Module:
    layers = [
        nn.BatchNorm2d(3),
        nnl.BatchNorm2d(4),
        nnl.MovingAverageBatchNorm2d(2),
        nn.InstanceNorm2d(3, track_running_stats=True),
        nn.GroupNorm(1, 3),  # no running statistics: untouched
    ]
    if extra:
        layers.append(nn.BatchNorm1d(5))
    return nn.Sequential(*layers)


def _fill(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Rank-dependent, off-center values in every buffer; returns them."""
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.dtype.is_floating_point:
                buf.copy_(1e3 + torch.rand(buf.shape, generator=g, dtype=torch.float64))
            else:
                buf.fill_(10 + rank * rank)  # 10, 11, 14: a mean that rounds
    return {k: v.clone() for k, v in model.state_dict().items()}


def scenario_reduce_and_broadcast(rank: int, world: int) -> None:
    model = _model()
    mine = _fill(model, rank)
    everyone = [_fill(_model(), r) for r in range(world)]
    synced = sync_running_stats(model, "reduce")
    assert "0.running_mean" in synced and "3.num_batches_tracked" in synced
    assert not any(n.startswith("4.") for n in synced)
    for key, value in model.state_dict().items():
        stack = torch.stack([s[key] for s in everyone])
        if key in synced and value.dtype.is_floating_point:
            expected = stack.double().mean(0).to(value.dtype)
        elif key in synced:
            expected = stack.sum(0).div(world, rounding_mode="floor")
        else:
            expected = mine[key]
        assert torch.equal(value, expected), (rank, key, value, expected)
    _fill(model, rank)
    sync_running_stats(model, "broadcast")
    for key, value in model.state_dict().items():
        expected = everyone[0][key] if key in synced else mine[key]
        assert torch.equal(value, expected), (rank, key)


def scenario_different_models(rank: int, world: int) -> None:
    model = _model(extra=rank == 1)
    with pytest.raises(RuntimeError, match="different running buffers"):
        sync_running_stats(model)


def scenario_both(rank: int, world: int) -> None:
    scenario_reduce_and_broadcast(rank, world)
    scenario_different_models(rank, world)


@pytest.mark.slow
def test_reduce_and_broadcast_on_three_gloo_ranks() -> None:
    run_world(scenario_both, 3)


def test_one_process_is_a_no_op() -> None:
    model = _model()
    before = _fill(model, 0)
    assert sync_running_stats(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reduce"):
        sync_running_stats(_model(), "mean")
    with pytest.raises(TypeError, match="nn.Module"):
        sync_running_stats([nn.BatchNorm2d(2)])  # type: ignore[arg-type]
