"""recalibrate(..., process_group=...): each rank's own batches, the statistics of their union.

On 2 spawned gloo ranks every rank builds the same float64 model and every rank's
batches from fixed seeds, recalibrates its copy on its own batches with
``process_group="world"``, and compares every buffer with one process (no
communication) recalibrating on the union of the ranks' batches: uneven counts, a rank
with no batch, both methods, both variances. The model holds a synced normlab layer
and torch's SyncBatchNorm, which must normalize locally during the passes.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from normlab import nn as nnl
from normlab.recalibrate import recalibrate
from test_distributed import run_world

F64 = torch.float64
CASES = list(itertools.product(("precise", "exact"), ("population", "per_batch")))
#: Batch sizes of each rank's batches: uneven, then rank 1 holding none.
SPLITS = {"uneven": ((3, 2), (4,)), "empty": ((2, 3, 1), ())}


def build(sync: bool) -> nn.Module:
    """Every recalibration kind: BN (synced and torch's), SN, MABN, BRN, tracked IN."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nnl.BatchNorm2d(6, process_group="world" if sync else None),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.SyncBatchNorm(6) if sync else nn.BatchNorm2d(6),
        nnl.SwitchableNorm2d(6),
        nn.Conv2d(6, 4, 1),
        nnl.MovingAverageBatchNorm2d(4),
        nnl.BatchRenorm2d(4),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    ).to(F64)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.copy_(0.5 + torch.rand_like(buf))  # stale statistics, never the answer
    return model.eval()


def batches(split: tuple[int, ...], rank: int) -> list[torch.Tensor]:
    out = []
    for i, n in enumerate(split):
        g = torch.Generator().manual_seed(100 * rank + i)
        out.append(3.0 + 2.0 * torch.randn(n, 3, 6, 6, generator=g, dtype=F64))
    return out


def _close(model: nn.Module, ref: nn.Module, what: str) -> None:
    for (name, got), want in zip(
        model.state_dict().items(), ref.state_dict().values(), strict=True
    ):
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{what}: {name}")
        else:
            assert torch.equal(got, want), (what, name, got, want)


def scenario_union(rank: int, world: int) -> None:
    assert world == 2
    for (split_name, split), (method, variance) in itertools.product(SPLITS.items(), CASES):
        what = f"{split_name} {method} {variance}"
        everyone = [b for r in range(world) for b in batches(split[r], r)]
        ref = recalibrate(build(sync=False), everyone, method=method, variance=variance)
        model = build(sync=True)
        synced = (model[1].process_group, model[4].forward)
        got = recalibrate(
            model, batches(split[rank], rank), method=method, variance=variance,
            process_group="world", return_report=True,
        )  # fmt: skip
        assert got.num_batches == len(everyone), what
        assert not got.unseen, what
        _close(model, ref, what)
        assert model[1].process_group == "world", what  # the sync setting is back
        assert "forward" not in model[4].__dict__ and model[4].forward == synced[1], what


def scenario_error_on_one_rank(rank: int, world: int) -> None:
    model = build(sync=False)
    before = copy.deepcopy(model.state_dict())
    good = batches((2,), rank)
    mine = [torch.randn(2, 5, 6, 6, dtype=F64)] if rank == 1 else good  # 5 channels, not 3
    expected = (RuntimeError, "rank 1 of 2 failed") if rank == 0 else (RuntimeError, "channels")
    for method in ("precise", "exact"):
        with pytest.raises(expected[0], match=expected[1]):
            recalibrate(model, mine, method=method, process_group="world")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), method
    # No rank holding a batch: refused on every rank.
    with pytest.raises(ValueError, match="no rank's `batches` yielded a batch"):
        recalibrate(model, [], process_group="world")


def scenario_all(rank: int, world: int) -> None:
    scenario_union(rank, world)
    scenario_error_on_one_rank(rank, world)


@pytest.mark.slow
def test_distributed_recalibrate_equals_one_process_on_the_union() -> None:
    run_world(scenario_all, 2, timeout=300.0)


def test_one_process_with_a_group_is_the_plain_call() -> None:
    data = batches((3, 2), 0)
    for method, variance in CASES:
        a = recalibrate(build(sync=False), data, method=method, variance=variance)
        b = recalibrate(
            build(sync=False), data, method=method, variance=variance, process_group="world"
        )
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), (method, variance)


def test_a_bad_process_group_is_refused() -> None:
    with pytest.raises(TypeError, match="process_group must be None"):
        recalibrate(build(sync=False), batches((2,), 0), process_group="everyone")
