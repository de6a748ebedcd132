"""normlab's classic layers against their torch.nn twins, in every mode.

Outputs, input and parameter gradients, running statistics after several
training steps and eval outputs; fp64 to 1e-10 and fp32 to 1e-5.
"""

from __future__ import annotations

import copy
import io
import itertools

import numpy as np
import pytest
import torch

import normlab.nn as nnl
from _testing import assert_close, offcenter
from normlab import functional as NF
from normlab import reference as R
from normlab.catalogue import randomize

DTYPES = [torch.float64, torch.float32]

BN_MODES = list(
    itertools.product([True, False], [True, False], [0.1, None])
)  # affine, track_running_stats, momentum
BN_KINDS = [
    (nnl.BatchNorm1d, torch.nn.BatchNorm1d, (7, 5)),
    (nnl.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 6)),
    (nnl.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 4, 3)),
    (nnl.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 2, 3)),
]


def _pair(ours_cls, torch_cls, dtype, *args, **kwargs):
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ref = torch_cls(*args, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p_o, p_t in zip(ours.parameters(), ref.parameters(), strict=True):
            v = (0.5 + torch.rand(p_o.shape, generator=g, dtype=torch.float64)).to(dtype)
            p_o.copy_(v)
            p_t.copy_(v)
    return ours, ref


def _step_and_compare(ours, ref, x, dtype):
    xo = x.clone().requires_grad_(True)
    xt = x.clone().requires_grad_(True)
    yo, yt = ours(xo), ref(xt)
    assert_close(yo, yt, dtype)
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yt.backward(dy)
    assert_close(xo.grad, xt.grad, dtype)
    for po, pt in zip(ours.parameters(), ref.parameters(), strict=True):
        assert_close(po.grad, pt.grad, dtype)
    for (n, bo), (_, bt) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
        assert bo.dtype == bt.dtype, n
        if torch.is_floating_point(bo):
            assert_close(bo, bt, dtype)
        else:
            assert torch.equal(bo, bt), n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,track,momentum", BN_MODES)
@pytest.mark.parametrize("kind", BN_KINDS, ids=lambda k: f"{k[0].__name__}{k[2]}")
def test_batch_norm_matches_torch_in_every_mode(kind, affine, track, momentum, dtype):
    ours_cls, torch_cls, shape = kind
    ours, ref = _pair(
        ours_cls,
        torch_cls,
        dtype,
        shape[1],
        affine=affine,
        track_running_stats=track,
        momentum=momentum,
    )
    for step in range(3):  # several training steps: running statistics accumulate
        _step_and_compare(ours, ref, offcenter(*shape, dtype=dtype, seed=step), dtype)
    ours.eval()
    ref.eval()
    for step in range(2):
        _step_and_compare(ours, ref, offcenter(*shape, dtype=dtype, seed=10 + step), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,track", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize(
    "kind",
    [
        (nnl.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 5, 7)),
        (nnl.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 5, 4, 3)),
        (nnl.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 3, 3, 2, 3)),
        (nnl.InstanceNorm2d, torch.nn.InstanceNorm2d, (5, 4, 3)),  # unbatched
    ],
    ids=lambda k: f"{k[0].__name__}{k[2]}",
)
def test_instance_norm_matches_torch(kind, affine, track, dtype):
    ours_cls, torch_cls, shape = kind
    c = shape[1] if len(shape) > 3 or ours_cls is nnl.InstanceNorm1d else shape[0]
    ours, ref = _pair(ours_cls, torch_cls, dtype, c, affine=affine, track_running_stats=track)
    for step in range(3):
        x = offcenter(*shape, dtype=dtype, seed=step)
        xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yo, yt = ours(xo), ref(xt)
        assert_close(yo, yt, dtype)
        dy = torch.randn_like(yo)
        yo.backward(dy)
        yt.backward(dy)
        assert_close(xo.grad, xt.grad, dtype)
        if track:
            assert_close(ours.running_mean, ref.running_mean, dtype)
            assert_close(ours.running_var, ref.running_var, dtype)
    ours.eval()
    ref.eval()
    x = offcenter(*shape, dtype=dtype, seed=9)
    assert_close(ours(x), ref(x), dtype)


def test_instance_norm_momentum_none_is_cumulative_average():
    """Documented difference: torch's InstanceNorm never updates with momentum=None."""
    m = nnl.InstanceNorm2d(4, track_running_stats=True, momentum=None, dtype=torch.float64)
    rm, rv, n = np.zeros(4), np.ones(4), 0
    for step in range(3):
        x = offcenter(2, 4, 3, 5, seed=step)
        m(x)
        rm, rv, n = R.instance_norm_update_running(
            x.numpy(), rm, rv, momentum=None, num_batches_tracked=n
        )
    assert_close(m.running_mean, rm)
    assert_close(m.running_var, rv)
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "groups,shape",
    [(3, (2, 6, 5, 3)), (1, (3, 6)), (6, (2, 6, 7)), (2, (1, 4, 3, 2, 2)), (5, (1, 10, 1, 1))],
)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(groups, shape, affine, dtype):
    ours, ref = _pair(nnl.GroupNorm, torch.nn.GroupNorm, dtype, groups, shape[1], affine=affine)
    _step_and_compare(ours, ref, offcenter(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "normalized,shape", [([5, 4, 3], (3, 5, 4, 3)), (7, (2, 3, 7)), ([3, 7], (3, 7))]
)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_matches_torch(normalized, shape, affine, bias, dtype):
    ours, ref = _pair(
        nnl.LayerNorm, torch.nn.LayerNorm, dtype, normalized, elementwise_affine=affine, bias=bias
    )
    _step_and_compare(ours, ref, offcenter(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,shape", [(3, (2, 6, 4, 3)), (4, (2, 5, 7)), (1, (1, 3, 2, 2, 2))])
def test_local_response_norm_matches_torch(size, shape, dtype):
    ours = nnl.LocalResponseNorm(size, alpha=0.3, beta=0.75, k=2.0)
    ref = torch.nn.LocalResponseNorm(size, alpha=0.3, beta=0.75, k=2.0)
    _step_and_compare(ours, ref, offcenter(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm2d_is_layer_norm_over_channels(dtype):
    x = offcenter(2, 5, 4, 3, dtype=dtype)
    ours, ref = _pair(nnl.LayerNorm2d, torch.nn.LayerNorm, dtype, 5)
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yo = ours(xo)
    yt = ref(xt.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert_close(yo, yt, dtype)
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yt.backward(dy)
    assert_close(xo.grad, xt.grad, dtype)
    assert_close(ours.weight.grad, ref.weight.grad, dtype)


# ----------------------------------------------------------------- equivalences


def test_group_norm_one_group_is_layer_norm():
    x = offcenter(3, 6, 4, 5)
    assert_close(NF.group_norm(x, 1), NF.layer_norm(x, [6, 4, 5]))


def test_group_norm_c_groups_is_instance_norm():
    x = offcenter(3, 6, 4, 5)
    assert_close(NF.group_norm(x, 6), NF.instance_norm(x))


def test_frozen_bn_is_bn_eval():
    bn = nnl.BatchNorm2d(5, dtype=torch.float64)
    for step in range(3):
        bn(offcenter(4, 5, 3, 3, seed=step))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    frozen = nnl.FrozenBatchNorm2d(5, dtype=torch.float64)
    frozen.load_state_dict(bn.state_dict())
    frozen.train()  # stays frozen
    x = offcenter(2, 5, 3, 3, seed=9)
    assert_close(frozen(x), bn(x))
    before = copy.deepcopy(frozen.state_dict())
    frozen(offcenter(2, 5, 3, 3, seed=10))
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])
    assert list(frozen.parameters()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_bn_is_exact_identity_when_built(dtype):
    x = offcenter(2, 5, 3, 3, dtype=dtype)
    assert torch.equal(nnl.FrozenBatchNorm2d(5, dtype=dtype)(x), x)


def test_frozen_bn_loads_torch_batchnorm_checkpoint():
    bn = torch.nn.BatchNorm2d(4)
    bn(offcenter(3, 4, 2, 2, dtype=torch.float32))
    frozen = nnl.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # strict, num_batches_tracked ignored
    assert torch.equal(frozen.running_mean, bn.running_mean)


# ------------------------------------------------------------ layouts and dtypes

LAYOUT_MODULES = [
    lambda: nnl.BatchNorm2d(6),
    lambda: nnl.GroupNorm(3, 6),
    lambda: nnl.LayerNorm2d(6),
    lambda: nnl.InstanceNorm2d(6, affine=True),
    lambda: nnl.LocalResponseNorm(3),
    lambda: nnl.FrozenBatchNorm2d(6),
]


@pytest.mark.parametrize("build", LAYOUT_MODULES)
def test_channels_last_same_values(build):
    m = build()
    x = offcenter(2, 6, 5, 3, dtype=torch.float32)
    xc = x.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    x.requires_grad_(True)
    y, yc = m(x), m(xc)
    assert_close(yc, y, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    yc.backward(dy)
    assert_close(xc.grad, x.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("build", LAYOUT_MODULES)
def test_half_inputs_within_tolerance_of_fp64(build, dtype):
    m = build()
    x = offcenter(2, 6, 5, 3, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    expected = copy.deepcopy(m).to(torch.float64)(x.to(torch.float64))
    assert_close(y, expected, dtype)
    for name, b in m.named_buffers():
        if torch.is_floating_point(b):
            assert b.dtype == torch.float32, name


def test_half_gradients_within_tolerance():
    m = nnl.GroupNorm(3, 6)
    x = offcenter(2, 6, 5, 3, dtype=torch.bfloat16).requires_grad_(True)
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    dy = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    m(x).backward(dy.to(torch.bfloat16))
    copy.deepcopy(m).to(torch.float64)(x64).backward(dy)
    assert x.grad.dtype == torch.bfloat16
    assert_close(x.grad, x64.grad, torch.bfloat16, atol=5e-2)


CT_CASES = [
    ("bn", lambda: nnl.BatchNorm2d(4)),
    ("bn_eval", lambda: nnl.BatchNorm2d(4)),
    ("gn", lambda: nnl.GroupNorm(2, 4)),
    ("ln", lambda: nnl.LayerNorm([4, 6, 5])),
    ("ln2d", lambda: nnl.LayerNorm2d(4)),
    ("in", lambda: nnl.InstanceNorm2d(4)),
]


@pytest.mark.parametrize("name,build", CT_CASES)
def test_off_center_data_in_fp32(name, build):
    """CT-like data (mean 1e4, std 1e-2): fp32 within 1e-3 of fp64 on the same input."""
    x = offcenter(3, 4, 6, 5, dtype=torch.float32, loc=1e4, scale=1e-2)
    m = build()
    if name == "bn_eval":
        with torch.no_grad():
            m.running_mean.fill_(1e4)
            m.running_var.fill_(1e-4)
        m.eval()
    m64 = copy.deepcopy(m).to(torch.float64)
    y = m(x)
    expected = m64(x.to(torch.float64))
    err = (y.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-3, float(err)
    if name == "bn":
        assert_close(m.running_mean, m64.running_mean, torch.float32, rtol=1e-6, atol=0)
        assert_close(m.running_var, m64.running_var, torch.float32, rtol=1e-3, atol=0)


# ------------------------------------------------------------------- plumbing

ALL_MODULES = [
    (lambda: nnl.BatchNorm1d(5), (3, 5, 2)),
    (lambda: nnl.BatchNorm2d(5, momentum=None), (2, 5, 3, 2)),
    (lambda: nnl.BatchNorm3d(5, affine=False), (2, 5, 2, 2, 2)),
    (lambda: nnl.FrozenBatchNorm2d(5), (2, 5, 3, 2)),
    (lambda: nnl.GroupNorm(5, 5), (3, 5, 2)),
    (lambda: nnl.LayerNorm([5, 2]), (3, 5, 2)),
    (lambda: nnl.LayerNorm2d(5), (2, 5, 3, 2)),
    (lambda: nnl.InstanceNorm2d(5, affine=True, track_running_stats=True), (2, 5, 3, 2)),
    (lambda: nnl.LocalResponseNorm(2), (3, 5, 2)),
]


@pytest.mark.parametrize("build,shape", ALL_MODULES)
def test_state_dict_repr_deepcopy_save_load(build, shape):
    m = randomize(build(), seed=4)
    m(offcenter(*shape, dtype=torch.float32, seed=1))  # a training step moves buffers
    assert repr(m).startswith(type(m).__name__ + "(")
    twin = build()
    twin.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
    clone = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    loaded = build()
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    x = offcenter(*shape, dtype=torch.float32, seed=2)
    for mod in (m, clone, loaded):
        mod.eval()
    assert torch.equal(clone(x), m(x))
    assert torch.equal(loaded(x), m(x))


def test_torch_batchnorm_checkpoint_round_trip():
    t = torch.nn.BatchNorm2d(6)
    for s in range(2):
        t(offcenter(3, 6, 2, 2, dtype=torch.float32, seed=s))
    ours = nnl.BatchNorm2d(6)
    ours.load_state_dict(t.state_dict())
    back = torch.nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    assert int(back.num_batches_tracked) == 2
    x = offcenter(2, 6, 2, 2, dtype=torch.float32, seed=5)
    assert_close(ours.eval()(x), t.eval()(x), torch.float32)


def test_old_checkpoint_without_num_batches_tracked_loads():
    m = nnl.BatchNorm2d(3)
    sd = m.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    m.load_state_dict(sd)


# ------------------------------------------------------------------ bad input


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"30 channels are not divisible by 32 groups.*15"):
        nnl.GroupNorm(32, 30)
    with pytest.raises(ValueError, match=r"not divisible"):
        NF.group_norm(offcenter(2, 6, 3, 3), 4)
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected a 4-D input.*3-D"):
        nnl.BatchNorm2d(4)(offcenter(2, 4, 3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*GroupNorm"):
        nnl.BatchNorm2d(4)(offcenter(1, 4, 1, 1, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        nnl.BatchNorm1d(4)(offcenter(1, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        nnl.BatchNorm2d(4, eps=0)(offcenter(2, 4, 3, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        nnl.GroupNorm(2, 4, eps=-1e-5)
    with pytest.raises(ValueError, match=r"eps must be >= 0 and finite"):
        NF.layer_norm(offcenter(2, 3), 3, eps=float("nan"))
    with pytest.raises(ValueError, match=r"eps must be >= 0 and finite"):
        nnl.InstanceNorm2d(4, eps=float("inf"))
    with pytest.raises(TypeError, match=r"floating-point.*x.float\(\)"):
        nnl.BatchNorm2d(4)(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"floating-point"):
        nnl.GroupNorm(2, 4)(torch.ones(2, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"input has 5 channels.*num_features=4"):
        nnl.BatchNorm2d(4)(offcenter(2, 5, 3, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"5 channels.*num_features=4"):
        nnl.InstanceNorm2d(4)(offcenter(2, 5, 3, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"5 channels.*num_features=4"):
        nnl.FrozenBatchNorm2d(4)(offcenter(2, 5, 3, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"5 channels"):
        nnl.GroupNorm(2, 4)(offcenter(2, 5, 3, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"normalized_shape=\[4\].*last 1 dims"):
        nnl.LayerNorm(4)(offcenter(2, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"more than 1 spatial element"):
        nnl.InstanceNorm2d(4)(offcenter(2, 4, 1, 1, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        NF.group_norm(offcenter(2, 4, 3), 2, backend="cuda")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        nnl.BatchNorm2d(4, momentum=1.5)
    with pytest.raises(ValueError, match=r"LocalResponseNorm: expected"):
        nnl.LocalResponseNorm(2)(offcenter(2, 4))


def test_bn_eval_with_one_value_is_fine():
    """Eval with running statistics needs no batch variance: batch 1, 1×1 map is legal."""
    m = nnl.BatchNorm2d(4).eval()
    y = m(offcenter(1, 4, 1, 1, dtype=torch.float32))
    assert torch.isfinite(y).all()


def test_no_nan_for_constant_groups():
    x = torch.full((2, 4, 3, 3), 7.0)
    for m in (nnl.BatchNorm2d(4), nnl.GroupNorm(2, 4), nnl.LayerNorm2d(4), nnl.InstanceNorm2d(4)):
        y = m(x)
        assert torch.isfinite(y).all() and y.abs().max() == 0


def test_frozen_bn_loads_batchnorm_without_bias_or_affine():
    """A BatchNorm built with bias=False (or affine=False) loads as β = 0 (and γ = 1)."""
    x = offcenter(2, 3, 4, 4, dtype=torch.float64, seed=3)
    for kwargs in ({"bias": False}, {"affine": False}):
        bn = torch.nn.BatchNorm2d(3, dtype=torch.float64, **kwargs)
        randomize(bn, seed=4)
        bn.eval()
        frozen = nnl.FrozenBatchNorm2d(3, dtype=torch.float64)
        frozen.load_state_dict(bn.state_dict())
        assert_close(frozen(x), bn(x))


def test_shape_errors_are_value_and_runtime_errors():
    """normlab.NormShapeError: caught by code written for torch (RuntimeError) or normlab."""
    import pickle

    import normlab

    x = offcenter(2, 5, 3, dtype=torch.float32)
    for bad in (
        lambda: nnl.BatchNorm1d(4)(x),
        lambda: nnl.GroupNorm(2, 4)(x),
        lambda: nnl.LayerNorm(4)(x),
        lambda: NF.batch_norm(x, torch.zeros(4), torch.ones(4), training=True),
    ):
        with pytest.raises(normlab.NormShapeError) as info:
            bad()
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    err = pickle.loads(pickle.dumps(normlab.NormShapeError("m")))
    assert type(err) is normlab.NormShapeError and str(err) == "m"
