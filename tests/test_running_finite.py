"""Running statistics are never written non-finite (issue #24 item 3).

For every normlab layer with running statistics: a training batch holding one inf,
one NaN and an all-inf channel leaves the bad channels' running statistics bitwise
unchanged (for the layers with a window per layer, MABN and CBN, every buffer:
the window, the statistics, ``num_batches_tracked``), while the finite channels of
the per-channel layers update exactly as from the clean batch (packed seeds of one
layer stay independent); the output is what the math gives (NaN where torch's layer
gives NaN), the layer warns once and counts the batch, the state_dict keys stay the
same, and the next finite batches update the state as before.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import normlab.nn as nnl
from _testing import assert_close, offcenter
from normlab._core.running import update_running_stats, watch
from normlab.doctor import diagnose

F64 = torch.float64
C = 5  # channels 0-2 are made bad, 3-4 stay finite
BAD = (0, 1, 2)
GOOD = (3, 4)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    torch_twin: Callable[[], nn.Module] | None = None
    conv: bool = False  # the input is a convolution's output (CBN pools over iterations)
    windowed: bool = False  # a window per layer (MABN, CBN): a bad batch is kept out whole
    channels_coupled: bool = False  # a bad channel reaches every output (SN's LN branch)


def _in_twin(cls: type, **kw) -> Callable[[], nn.Module]:
    return lambda: cls(C, track_running_stats=True, **kw).to(F64)


CASES = [
    Case("bn1d", lambda: nnl.BatchNorm1d(C).to(F64), (8, C), lambda: nn.BatchNorm1d(C).to(F64)),
    Case(
        "bn1d_3d", lambda: nnl.BatchNorm1d(C).to(F64), (4, C, 3), lambda: nn.BatchNorm1d(C).to(F64)
    ),
    Case(
        "bn2d", lambda: nnl.BatchNorm2d(C).to(F64), (4, C, 3, 3), lambda: nn.BatchNorm2d(C).to(F64)
    ),
    Case(
        "bn2d_cumulative",
        lambda: nnl.BatchNorm2d(C, momentum=None).to(F64),
        (4, C, 3, 3),
        lambda: nn.BatchNorm2d(C, momentum=None).to(F64),
    ),
    Case(
        "bn3d",
        lambda: nnl.BatchNorm3d(C).to(F64),
        (2, C, 2, 3, 3),
        lambda: nn.BatchNorm3d(C).to(F64),
    ),
    Case(
        "in2d",
        lambda: nnl.InstanceNorm2d(C, track_running_stats=True).to(F64),
        (3, C, 4, 4),
        _in_twin(nn.InstanceNorm2d),
    ),
    Case(
        "in1d_cumulative",
        lambda: nnl.InstanceNorm1d(C, track_running_stats=True, momentum=None).to(F64),
        (3, C, 6),
        _in_twin(nn.InstanceNorm1d, momentum=None),
    ),
    Case("sn2d", lambda: nnl.SwitchableNorm2d(C).to(F64), (4, C, 3, 3), channels_coupled=True),
    Case(
        "brn2d",
        lambda: nnl.BatchRenorm2d(C, warmup_iters=1, r_max_rampup_iters=2, d_max_rampup_iters=2).to(
            F64
        ),
        (4, C, 3, 3),
    ),
    Case(
        "mabn2d",
        lambda: nnl.MovingAverageBatchNorm2d(C, window=2, warmup_iters=1).to(F64),
        (4, C, 3, 3),
        windowed=True,
    ),
    Case(
        "mabn2d_cumulative",
        lambda: nnl.MovingAverageBatchNorm2d(C, momentum=None, window=3, warmup_iters=0).to(F64),
        (4, C, 3, 3),
        windowed=True,
    ),
    Case("evonorm_b0", lambda: nnl.EvoNormB0_2d(C).to(F64), (4, C, 3, 3)),
    Case(
        "cbn",
        lambda: nnl.CrossIterationBatchNorm2d(C, buffer_size=2, burnin=0).to(F64),
        (4, 3, 5, 5),
        conv=True,
        windowed=True,
    ),
]


def _poison(x: Tensor) -> Tensor:
    """One +inf in channel 0, one NaN in channel 1, channel 2 all +inf."""
    x = x.clone()
    x[(0, 0, *([0] * (x.dim() - 2)))] = float("inf")
    x[(1 % x.shape[0], 1, *([1] * (x.dim() - 2)))] = float("nan")
    x[:, 2] = float("inf")
    return x


class Runner:
    """A layer (behind a fixed convolution for CBN) and a step: forward, then backward."""

    def __init__(self, case: Case) -> None:
        torch.manual_seed(0)
        self.case = case
        self.layer = case.build().train()
        self.conv = nn.Conv2d(3, C, 3).to(F64) if case.conv else None

    def input(self, seed: int) -> Tensor:
        return offcenter(*self.case.shape, seed=seed)

    def forward(self, x: Tensor, poisoned: bool = False) -> Tensor:
        if self.conv is None:
            return self.layer(_poison(x) if poisoned else x)
        h = self.conv(x)
        if poisoned:  # on the convolution's output: the graph to its weight stays
            h = h + (_poison(h.detach()) - h.detach())
        return self.layer(h, self.conv.weight)

    def step(self, seed: int, poisoned: bool = False) -> Tensor:
        y = self.forward(self.input(seed).requires_grad_(), poisoned)
        y.backward(offcenter(*y.shape, seed=1000 + seed).to(y.device))
        return y.detach()

    def buffers(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.layer.named_buffers()}


def _assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(actual[k], v), k


def _skip_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "non-finite (inf/NaN)" in str(w.message)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_batch_keeps_every_buffer_and_the_next_good_batch_updates_as_before(case):
    ours, clean = Runner(case), Runner(case)
    for seed in (1, 2):  # fills CBN's window and MABN's, moves past the warm-ups
        ours.step(seed)
        clean.step(seed)
    before = ours.buffers()
    keys = list(ours.layer.state_dict())
    with pytest.warns(RuntimeWarning, match="kept its previous running statistics") as rec:
        for seed in (3, 4, 5):
            ours.step(seed, poisoned=True)
            assert ours.layer.nonfinite_batches_skipped == seed - 2
    assert len(_skip_warnings(rec.list)) == 1
    message = _skip_warnings(rec.list)[0]
    assert f"{type(ours.layer).__name__}({C})" in message and "normlab.guard" in message
    after = ours.buffers()
    for k, v in after.items():
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), k
    assert list(ours.layer.state_dict()) == keys
    assert not any("nonfinite" in k for k in keys)
    if case.windowed:
        _assert_same(after, before)
        # The next finite batches: as if the bad ones had never been seen, to the bit.
        for seed in (6, 7):
            y = ours.step(seed)
            y_clean = clean.step(seed)
            assert torch.equal(y, y_clean)
            _assert_same(ours.buffers(), clean.buffers())
    else:
        for seed in (3, 4, 5):  # the clean twin sees the same finite channels
            clean.step(seed)
        _assert_per_channel(after, before, clean.buffers())
        for seed in (6, 7):
            y, y_clean = ours.step(seed), clean.step(seed)
            assert torch.equal(y[:, list(GOOD)], y_clean[:, list(GOOD)])
        for k, v in ours.buffers().items():
            if v.dim() == 1 and v.numel() == C:
                assert torch.equal(v[list(GOOD)], clean.buffers()[k][list(GOOD)]), k
    assert ours.layer.nonfinite_batches_skipped == 3


def _assert_per_channel(
    after: dict[str, Tensor], before: dict[str, Tensor], clean: dict[str, Tensor]
) -> None:
    """Per-channel statistics: bad channels as before, good ones as the clean twin's;
    the batch counts (``num_batches_tracked`` as the clean twin's)."""
    assert after.keys() == before.keys() == clean.keys()
    for k, v in after.items():
        if v.dim() == 1 and v.numel() == C:
            assert torch.equal(v[list(BAD)], before[k][list(BAD)]), k
            assert torch.equal(v[list(GOOD)], clean[k][list(GOOD)]), k
        else:
            assert torch.equal(v, clean[k]), k


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_output_of_a_bad_batch_is_what_the_math_gives(case):
    ours = Runner(case)
    ours.step(1)
    probe = copy.deepcopy(ours)  # the same state, fed the input without the bad values
    x = ours.input(9)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = ours.forward(x, poisoned=True).detach()
    if case.torch_twin is not None:
        twin = case.torch_twin().train()
        twin.load_state_dict(probe.layer.state_dict())
        expected = twin(_poison(x))
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10, equal_nan=True)
        # torch writes the NaN into its running statistics; normlab keeps the old ones.
        assert not bool(torch.isfinite(twin.running_var).all())
        return
    if case.channels_coupled:
        assert bool(torch.isnan(y).all())  # the LN branch spreads every bad channel
        return
    for c in BAD:
        assert not bool(torch.isfinite(y[:, c]).all()), f"channel {c} hides its inf/NaN"
    y_clean = probe.forward(x).detach()
    assert_close(y[:, list(GOOD)], y_clean[:, list(GOOD)])


def test_a_gpu_style_count_waits_for_the_next_sync_point(monkeypatch):
    # On a GPU the flag stays on the device: counted (and warned) at .eval(),
    # state_dict() or a read of the count, never per step.
    monkeypatch.setattr("normlab.nn._base.read_at_once", lambda flag: False)
    layer = nnl.BatchNorm2d(C).to(F64).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            layer(_poison(offcenter(4, C, 3, 3, seed=seed)))
    assert layer._nonfinite_skipped == 0 and layer._nonfinite_pending is not None
    with pytest.warns(RuntimeWarning, match="non-finite") as rec:
        layer.eval()
    assert len(_skip_warnings(rec.list)) == 1
    assert layer.nonfinite_batches_skipped == 3 and layer._nonfinite_pending is None
    layer.train()
    layer(_poison(offcenter(4, C, 3, 3, seed=7)))
    layer.state_dict()  # the other sync point; warned once already
    assert layer._nonfinite_pending is None and layer.nonfinite_batches_skipped == 4


def test_a_counted_layer_copies_pickles_and_loads():
    layer = nnl.BatchNorm1d(C).to(F64).train()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(_poison(offcenter(6, C, seed=0)))
    clone = copy.deepcopy(layer)
    assert clone.nonfinite_batches_skipped == 1
    fresh = nnl.BatchNorm1d(C).to(F64)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.nonfinite_batches_skipped == 0  # a diagnostic of this object, not state


def test_update_running_stats_is_torchs_update_for_finite_values_and_flags_the_rest():
    g = torch.Generator().manual_seed(3)
    mean, var = torch.randn(7, generator=g), torch.rand(7, generator=g) + 0.5
    bm, bv = torch.randn(7, generator=g), torch.rand(7, generator=g) + 0.5
    rm, rv = mean.clone(), var.clone()
    with watch() as flags:
        finite = update_running_stats(rm, rv, bm, bv, 0.1)
    assert bool(finite.all()) and len(flags) == 1 and flags[0] is finite
    assert torch.equal(rm, mean.mul(0.9).add(bm, alpha=0.1))
    assert torch.equal(rv, var.mul(0.9).add(bv, alpha=0.1))
    rm0, rv0 = rm.clone(), rv.clone()
    bv[4] = float("inf")  # only channel 4's variance is bad: its mean is kept too
    finite = update_running_stats(rm, rv, bm, bv, 0.1)
    assert finite.tolist() == [True] * 4 + [False] + [True] * 2
    assert rm[4] == rm0[4] and rv[4] == rv0[4]
    others = [0, 1, 2, 3, 5, 6]
    assert torch.equal(rm[others], rm0.mul(0.9).add(bm, alpha=0.1)[others])
    assert torch.equal(rv[others], rv0.mul(0.9).add(bv, alpha=0.1)[others])
    whole = update_running_stats(rm, rv, bm, bv, 0.1, per_channel=False)  # CBN's rule
    assert whole.dim() == 0 and not bool(whole)
    assert torch.equal(rm[others], rm0.mul(0.9).add(bm, alpha=0.1)[others])
    # A float32 variance that overflows the buffers' float16 is not written either.
    half = torch.ones(2, dtype=torch.float16)
    update_running_stats(None, half, torch.zeros(2), torch.tensor([1.0, 1e6]), 0.5)
    assert torch.equal(half, torch.ones(2, dtype=torch.float16))
    assert update_running_stats(None, None, bm, bv, 0.1) is None


@pytest.mark.slow
def test_compiled_fullgraph_keeps_the_guard():
    torch._dynamo.reset()
    eager = nnl.BatchNorm2d(C).train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = offcenter(4, C, 3, 3, dtype=torch.float32, seed=0)
    assert_close(compiled(x), eager(x), torch.float32)
    kept = compiled_layer.running_mean.clone(), compiled_layer.running_var.clone()
    y = compiled(_poison(x))  # compiled: guarded, not counted nor warned
    assert bool(torch.isnan(y[:, 1]).all())
    bad, good = list(BAD), list(GOOD)
    assert torch.equal(compiled_layer.running_mean[bad], kept[0][bad])
    assert torch.equal(compiled_layer.running_var[bad], kept[1][bad])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        eager(_poison(x))
    assert_close(compiled_layer.running_mean[good], eager.running_mean[good], torch.float32)
    x2 = offcenter(4, C, 3, 3, dtype=torch.float32, seed=1)
    assert_close(compiled(x2), eager(x2), torch.float32)
    assert_close(compiled_layer.running_mean, eager.running_mean, torch.float32)
    assert_close(compiled_layer.running_var, eager.running_var, torch.float32)


def test_the_doctor_reports_skipped_batches_by_module_path():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nnl.BatchNorm2d(8), nn.ReLU(), nnl.BatchNorm2d(8))
    x = offcenter(4, 3, 4, 4, dtype=torch.float32, seed=0)
    for seed in range(3):
        net(offcenter(4, 3, 4, 4, dtype=torch.float32, seed=seed))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        net(bad)
        net(bad)
    report = diagnose(net.eval(), x)
    found = [f for f in report.findings if f.code == "nonfinite_batches_skipped"]
    assert [(f.module, f.severity) for f in found] == [("1", "warning"), ("3", "warning")]
    assert "2 training batch(es)" in found[0].detail and "normlab.guard" in found[0].fix
    assert not [f for f in report.findings if f.code == "running_stats_nonfinite"]
    clean = nn.Sequential(nn.Conv2d(3, 8, 1), nnl.BatchNorm2d(8))
    clean(x)
    assert not [f for f in diagnose(clean.eval(), x).findings if f.code.startswith("nonfinite")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_on_a_gpu_the_guard_never_syncs_and_the_count_comes_at_eval(case):
    if case.name.endswith("cumulative"):
        pytest.skip("momentum=None reads num_batches_tracked on the host by design")
    ours = Runner(case)
    ours.layer.cuda()
    if ours.conv is not None:
        ours.conv.cuda()
    ours.input = lambda seed: offcenter(*case.shape, seed=seed).cuda()  # type: ignore[method-assign]
    ours.step(1)
    ours.step(2)
    torch.cuda.synchronize()
    before = ours.buffers()
    # Some layers read the host by design (CBN's step count); the guard must add none.
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            for seed in (3, 4):
                y = ours.forward(ours.input(seed), poisoned=True)
                y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours_files = ("_core/running.py", "nn/_base.py")
    assert not [w for w in syncs if w.filename.replace("\\", "/").endswith(ours_files)]
    assert not _skip_warnings(syncs)  # counted on the device, not yet read
    _assert_same(ours.buffers(), before)
    with pytest.warns(RuntimeWarning, match="non-finite") as rec:
        ours.layer.eval()
    assert len(_skip_warnings(rec.list)) == 1 and ours.layer.nonfinite_batches_skipped == 2
