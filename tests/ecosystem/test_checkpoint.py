"""Checkpoints: torch.save / torch.load(weights_only=True), and torch.nn <-> normlab twins."""

from __future__ import annotations

import pytest
import torch
from _eco_cases import CASES, make_input
from torch import nn

import normlab.nn as nnl
from _testing import assert_close
from normlab.catalogue import randomize


def test_save_load_weights_only_every_layer(tmp_path):
    model = nn.ModuleList([case.build() for case in CASES])
    # Train a step so that running statistics, counters and MABN windows are non-trivial.
    model.train()
    for case, layer in zip(CASES, model, strict=True):
        layer(make_input(case, seed=1).requires_grad_()).sum().backward()
    path = tmp_path / "all_layers.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = nn.ModuleList([case.build() for case in CASES])
    fresh.load_state_dict(state)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    model.eval()
    fresh.eval()
    for case, a, b in zip(CASES, model, fresh, strict=True):
        x = make_input(case, seed=2)
        assert torch.equal(a(x), b(x)), case.name


TWINS = [
    ("BatchNorm2d", lambda: nn.BatchNorm2d(6), lambda: nnl.BatchNorm2d(6), (3, 6, 5, 4)),
    ("BatchNorm1d", lambda: nn.BatchNorm1d(6), lambda: nnl.BatchNorm1d(6), (5, 6)),
    ("GroupNorm", lambda: nn.GroupNorm(3, 6), lambda: nnl.GroupNorm(3, 6), (3, 6, 5, 4)),
    ("LayerNorm", lambda: nn.LayerNorm([5, 4]), lambda: nnl.LayerNorm([5, 4]), (3, 6, 5, 4)),
    (
        "InstanceNorm2d",
        lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        lambda: nnl.InstanceNorm2d(6, affine=True, track_running_stats=True),
        (3, 6, 5, 4),
    ),
]


@pytest.mark.parametrize("name,make_torch,make_ours,shape", TWINS, ids=[t[0] for t in TWINS])
def test_torch_state_dict_round_trip(name, make_torch, make_ours, shape):
    theirs = randomize(make_torch())
    x = 3.0 + 2.0 * torch.randn(*shape)
    theirs.train()(x)  # non-trivial running statistics and num_batches_tracked
    ours = make_ours()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys, same shapes
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = make_torch()
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    theirs.eval()
    ours.eval()
    assert_close(ours(x), theirs(x), torch.float32, rtol=1e-4, atol=1e-4)


def test_frozen_batchnorm_loads_torch_batchnorm_checkpoint():
    bn = randomize(nn.BatchNorm2d(6)).eval()
    frozen = nnl.FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())
    x = 3.0 + 2.0 * torch.randn(3, 6, 5, 4)
    assert_close(frozen(x), bn(x), torch.float32, rtol=1e-4, atol=1e-4)
