"""Impossible stored statistics: a negative running_var is refused in eval, never clamped.

Every layer that normalizes with a stored variance in eval (BatchNorm, FrozenBatchNorm,
tracked InstanceNorm, BatchRenorm, MABN, EvoNorm-B0, SwitchableNorm) raises on CPU in
eager mode, naming the channels and the fix; where reading the values is not allowed
(torch.compile, the doctor's probe) those channels are NaN, as in torch. Computed batch
variances keep their clamp (training is unaffected by a corrupt running_var).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.functional as NF
import normlab.nn as nnl
from normlab._core.checks import stored_variance, stored_variance_as_nan

C = 8
BAD = (2, 5)


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(shape, generator=g)  # off-center


LAYERS = {
    "BatchNorm1d": (lambda: nnl.BatchNorm1d(C), (4, C)),
    "BatchNorm2d": (lambda: nnl.BatchNorm2d(C), (2, C, 5, 5)),
    "BatchNorm3d": (lambda: nnl.BatchNorm3d(C), (2, C, 3, 3, 3)),
    "FrozenBatchNorm2d": (lambda: nnl.FrozenBatchNorm2d(C), (2, C, 5, 5)),
    "InstanceNorm2d": (lambda: nnl.InstanceNorm2d(C, track_running_stats=True), (2, C, 5, 5)),
    "BatchRenorm2d": (lambda: nnl.BatchRenorm2d(C), (2, C, 5, 5)),
    "MovingAverageBatchNorm2d": (lambda: nnl.MovingAverageBatchNorm2d(C), (2, C, 5, 5)),
    "EvoNormB0_2d": (lambda: nnl.EvoNormB0_2d(C), (2, C, 5, 5)),
    "SwitchableNorm2d": (lambda: nnl.SwitchableNorm2d(C), (2, C, 5, 5)),
}


def _corrupt(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.running_var[list(BAD)] = torch.tensor([-0.25, -1e-7])
    return layer.eval()


@pytest.mark.parametrize("name", list(LAYERS))
def test_negative_running_var_is_refused_in_eval(name):
    make, shape = LAYERS[name]
    layer = _corrupt(make())
    with pytest.raises(ValueError, match="running_var is negative in 2 of 8") as info:
        layer(_x(shape))
    message = str(info.value)
    assert "channel(s) 2, 5" in message and "min -0.25" in message
    assert "corrupt" in message and "recalibrate" in message and "doctor" in message


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_doctor_probe_sees_nan_in_the_corrupt_channels_only(name):
    make, shape = LAYERS[name]
    layer = _corrupt(make())
    with stored_variance_as_nan():
        y = layer(_x(shape))
    bad = torch.zeros(C, dtype=torch.bool)
    bad[list(BAD)] = True
    per_channel = y.transpose(0, 1).reshape(C, -1)
    assert bool(torch.isnan(per_channel[bad]).all())
    assert bool(torch.isfinite(per_channel[~bad]).all())
    # Outside the context the check is back.
    with pytest.raises(ValueError, match="negative"):
        layer(_x(shape))


def test_eval_bn_with_negative_var_matches_torch_nan_pattern():
    """Where normlab may not raise it gives torch's answer: NaN in those channels."""
    ref = nn.BatchNorm2d(C).eval()
    ours = nnl.BatchNorm2d(C).eval()
    with torch.no_grad():
        for m in (ref, ours):
            m.running_mean.copy_(torch.linspace(2.0, 4.0, C))
            m.running_var.copy_(torch.linspace(0.5, 4.0, C))
            m.running_var[1] = -0.5
    x = _x((2, C, 4, 4), seed=3)
    with stored_variance_as_nan():
        y = ours(x)
    expected = ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    torch.testing.assert_close(y.nan_to_num(), expected.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_zero_and_tiny_running_var_are_still_accepted():
    """Only negative stored variances are impossible; 0 (a dead channel) is torch's answer."""
    ours, ref = nnl.BatchNorm2d(C).eval(), nn.BatchNorm2d(C).eval()
    with torch.no_grad():
        for m in (ours, ref):
            m.running_var[0] = 0.0
            m.running_var[1] = 1e-12
    x = _x((2, C, 4, 4), seed=4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-4)


def test_training_ignores_a_corrupt_running_var_and_overwrites_it():
    """Training normalizes with the batch variance; the running one is replaced (as in torch)."""
    ours, ref = nnl.BatchNorm2d(C, momentum=1.0), nn.BatchNorm2d(C, momentum=1.0)
    with torch.no_grad():
        ours.running_var[2] = ref.running_var[2] = -1.0
    x = _x((4, C, 4, 4), seed=5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert bool((ours.running_var > 0).all())


def test_functional_refuses_too():
    x = _x((2, C, 4, 4))
    mean, var = torch.zeros(C), torch.ones(C)
    var[7] = -2.0
    with pytest.raises(ValueError, match=r"batch_norm: running_var is negative .*channel\(s\) 7"):
        NF.batch_norm(x, mean, var, training=False)
    w, b = torch.ones(C), torch.zeros(C)
    with pytest.raises(ValueError, match=r"frozen_batch_norm: .*channel\(s\) 7"):
        NF.frozen_batch_norm(x, w, b, mean, var)


def test_under_compile_negative_channels_are_nan_without_graph_breaks():
    """torch.compile cannot read values without a graph break: NaN there, as in torch."""
    bn = _corrupt(nnl.BatchNorm2d(C))
    x = _x((2, C, 4, 4), seed=6)
    y = torch.compile(bn, fullgraph=True, backend="eager")(x)
    per_channel = y.transpose(0, 1).reshape(C, -1)
    assert bool(torch.isnan(per_channel[list(BAD)]).all())
    good = [c for c in range(C) if c not in BAD]
    assert bool(torch.isfinite(per_channel[good]).all())


def test_stored_variance_passes_a_valid_tensor_through_unchanged():
    var = torch.rand(C) + 0.1
    assert stored_variance("layer", var) is var
