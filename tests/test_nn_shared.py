"""The helpers that normlab.nn's layers share: each pinned on every layer that calls it.

``NormBase._batch_norm_args`` (torch's rule for which buffers a BatchNorm-style forward
passes, including ``track_running_stats`` switched off after construction),
``UpgradesStateDict`` (old and foreign checkpoints) and ``options_repr``.
"""

from __future__ import annotations

import pytest
import torch

import normlab.nn as nnl


def _x(seed=0):
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 2 + 1


@pytest.mark.parametrize("cls", [nnl.BatchNorm2d, nnl.CrossIterationBatchNorm2d])
def test_tracking_switched_off_after_construction_is_torchs(cls):
    ours, theirs = cls(3), torch.nn.BatchNorm2d(3)
    ours(_x(0))
    theirs(_x(0))
    before = [b.clone() for b in (ours.running_mean, ours.running_var)]
    ours.track_running_stats = theirs.track_running_stats = False
    ours(_x(1))  # training: batch statistics, the buffers left as they are
    theirs(_x(1))
    assert torch.equal(before[0], ours.running_mean)
    assert torch.equal(before[1], ours.running_var)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(_x(2)), theirs(_x(2)))  # eval: the buffers, which still exist


def test_a_checkpoint_without_num_batches_tracked_loads():
    bn = nnl.BatchNorm2d(3)
    bn.num_batches_tracked.fill_(7)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]  # torch < 0.4.1
    fresh = nnl.BatchNorm2d(3)
    fresh.load_state_dict(sd)
    assert int(fresh.num_batches_tracked) == 0


def test_frozen_batch_norm_loads_a_batch_norm_checkpoint_without_affine():
    bn = nnl.BatchNorm2d(3, affine=False)
    bn.running_mean.fill_(0.5)
    frozen = nnl.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())
    assert torch.equal(frozen.running_mean, bn.running_mean)
    assert torch.equal(frozen.weight, torch.ones(3)) and torch.equal(frozen.bias, torch.zeros(3))


@pytest.mark.parametrize(
    "layer, tail",
    [
        (nnl.GroupNorm(2, 4, act="silu", backend="torch"), ", act='silu', backend='torch'"),
        (nnl.FrozenBatchNorm2d(4, act="relu"), ", act='relu'"),
        (nnl.FilterResponseNorm2d(4, backend="torch"), ", backend='torch'"),
        (nnl.SwitchableNorm2d(4, backend="torch"), ", backend='torch'"),
        (nnl.GroupNorm(2, 4), ", affine=True"),
    ],
)
def test_the_options_show_only_where_they_differ_from_the_defaults(layer, tail):
    assert layer.extra_repr().endswith(tail)
