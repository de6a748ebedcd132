"""normlab.distributed: synced batch statistics equal one process on the concatenated batch.

The multi-process tests spawn a gloo world on 127.0.0.1 *once* per scenario and
run every check inside it: each rank builds the same layers and the same global
batch from fixed seeds, computes the single-process reference itself (no
communication), runs the synced layer on its own slice, and compares outputs,
input gradients, parameter gradients (summed over ranks), running statistics
and the number of collectives. The parent only collects "ok" or a traceback,
with a deadline; a rank that fails or hangs is killed and reported.
"""

from __future__ import annotations

import copy
import datetime
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _testing import assert_close, offcenter
from normlab import nn as nnl
from normlab.convert import convert_norms
from normlab.distributed import (
    WORLD,
    convert_sync,
    resolve_process_group,
    revert_sync,
    sync_active,
)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

F64 = torch.float64

# ----------------------------------------------------------------------------- the harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, scenario: Any, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            (SCENARIOS[scenario] if isinstance(scenario, str) else scenario)(rank, world)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", ""))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def run_world(
    scenario: str | Callable[[int, int], None], world: int, timeout: float = 150.0
) -> None:
    """Run ``SCENARIOS[scenario]`` (or ``scenario`` itself, a module-level function of
    another test module) on ``world`` spawned gloo ranks; raise on any failure.

    Always returns with every child ended: a rank that reports an error, exits
    without reporting, or outlives ``timeout`` gets the others killed and a
    RuntimeError / TimeoutError naming it.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world, port, scenario, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    ok: set[int] = set()
    try:
        while len(ok) < world:
            try:
                rank, status, info = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in ok and p.exitcode is not None]
                if dead:
                    try:  # a report may still be in flight from a rank that just exited
                        rank, status, info = results.get(timeout=2.0)
                    except queue.Empty:
                        r = dead[0]
                        raise RuntimeError(
                            f"rank {r} of {scenario!r} exited with code {procs[r].exitcode} "
                            "without reporting"
                        ) from None
                elif time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{scenario!r}: ranks {sorted(set(range(world)) - ok)} did not finish "
                        f"within {timeout:.0f} s (killed)"
                    ) from None
                else:
                    continue
            if status != "ok":
                failures = {rank: info}
                stop = time.monotonic() + 2.0  # the others' reports, to name the first cause
                while time.monotonic() < stop and len(failures) + len(ok) < world:
                    try:
                        r, st, inf = results.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if st != "ok":
                        failures[r] = inf
                raise RuntimeError(
                    "\n".join(
                        f"rank {r} of {scenario!r} failed:\n{failures[r]}" for r in sorted(failures)
                    )
                )
            ok.add(rank)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        results.join_thread()


# ----------------------------------------------------------------------------- counting

_COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
)


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives (patched in the child only)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.paused = False
        self._orig: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._orig[name] = fn

            def wrapped(*args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
                if not self.paused:
                    self.calls.append(_name)
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)

    def uninstall(self) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


# ----------------------------------------------------------------------------- layer scenario

SPLITS = {3: [(2, 2, 2), (1, 4, 2), (3, 0, 2)]}


def _brn(cls: type) -> Callable[[int], nn.Module]:
    def make(c: int) -> nn.Module:
        m = cls(
            c,
            r_max=1.5,
            d_max=0.5,
            warmup_iters=0,
            r_max_rampup_iters=0,
            d_max_rampup_iters=0,
            dtype=F64,
        )
        with torch.no_grad():  # running stats far from the batch's: r and d get clipped
            m.running_mean.copy_(torch.linspace(2.0, 4.0, c, dtype=F64))
            m.running_var.copy_(torch.linspace(0.5, 9.0, c, dtype=F64))
        return m

    return make


# (name, factory(C), per-sample shape (C, *spatial), training steps)
LAYER_CASES: list[tuple[str, Callable[[int], nn.Module], tuple[int, ...], int]] = [
    ("bn1d_nc", lambda c: nnl.BatchNorm1d(c, dtype=F64), (3,), 2),
    ("bn1d_ncl", lambda c: nnl.BatchNorm1d(c, momentum=None, dtype=F64), (3, 5), 2),
    ("bn2d", lambda c: nnl.BatchNorm2d(c, dtype=F64), (3, 4, 3), 2),
    (
        "bn2d_no_stats",
        lambda c: nnl.BatchNorm2d(c, affine=False, track_running_stats=False, dtype=F64),
        (2, 3, 3),
        1,
    ),
    ("bn3d", lambda c: nnl.BatchNorm3d(c, dtype=F64), (2, 2, 3, 2), 1),
    ("sn1d", lambda c: nnl.SwitchableNorm1d(c, dtype=F64), (4,), 2),
    ("sn2d", lambda c: nnl.SwitchableNorm2d(c, dtype=F64), (3, 3, 4), 2),
    (
        "mabn2d",
        lambda c: nnl.MovingAverageBatchNorm2d(c, window=2, warmup_iters=1, dtype=F64),
        (3, 3, 3),
        3,
    ),
    (
        "mabn1d",
        lambda c: nnl.MovingAverageBatchNorm1d(c, window=3, warmup_iters=0, dtype=F64),
        (4,),
        2,
    ),
    ("brn2d", _brn(nnl.BatchRenorm2d), (3, 3, 3), 2),
    ("brn1d", _brn(nnl.BatchRenorm1d), (4,), 2),
    ("evonorm_b0", lambda c: nnl.EvoNormB0_2d(c, dtype=F64), (3, 3, 4), 2),
]


def _check(rank: int, what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    try:
        assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
        if actual.numel():
            assert_close(actual, expected)
    except AssertionError as e:
        raise AssertionError(f"rank {rank}: {what}: {e}") from None


def _layer_case(
    rank: int,
    counter: CollectiveCounter,
    name: str,
    make: Callable[[int], nn.Module],
    sample: tuple[int, ...],
    steps: int,
    split: tuple[int, ...],
) -> None:
    torch.manual_seed(0)
    ref = make(sample[0])
    synced = copy.deepcopy(ref)
    convert_sync(synced)  # process_group="world" on this normlab layer
    assert synced.process_group == WORLD
    n_all = sum(split)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    tag = f"{name} split={split}"
    for step in range(steps):
        x = offcenter(n_all, *sample, seed=100 * step + 1)
        w = offcenter(n_all, *sample, seed=100 * step + 2, loc=0.5, scale=1.0)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        (yr * w).sum().backward()

        xl = x[lo:hi].clone().requires_grad_()
        counter.take()
        y = synced(xl)
        fwd = counter.take()
        (y * w[lo:hi]).sum().backward()
        bwd = counter.take()
        assert len(fwd) == 1, f"{tag}: {len(fwd)} collectives in forward: {fwd}"
        assert len(bwd) == 1, f"{tag}: {len(bwd)} collectives in backward: {bwd}"

        _check(rank, f"{tag} step {step} output", y, yr.detach()[lo:hi])
        counter.paused = True
        try:
            for pname, p in synced.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g)
                _check(rank, f"{tag} step {step} grad {pname}", g, ref.get_parameter(pname).grad)
        finally:
            counter.paused = False
        _check(rank, f"{tag} step {step} input grad", xl.grad, xr.grad[lo:hi])
        for bname, b in synced.named_buffers():
            _check(rank, f"{tag} step {step} buffer {bname}", b, ref.get_buffer(bname))
    if getattr(synced, "running_var", None) is None or hi == lo:
        return  # eval normalizes with the local batch (as torch's SyncBatchNorm does)
    # eval: running statistics, no communication
    synced.eval()
    ref.eval()
    x = offcenter(n_all, *sample, seed=7)
    counter.take()
    with torch.no_grad():
        y = synced(x[lo:hi])
    assert counter.take() == [], f"{tag}: eval communicated"
    _check(rank, f"{tag} eval output", y, ref(x)[lo:hi])


def scenario_layers(rank: int, world: int) -> None:
    counter = CollectiveCounter()
    counter.install()
    try:
        for split in SPLITS[world]:
            for name, make, sample, steps in LAYER_CASES:
                _layer_case(rank, counter, name, make, sample, steps, split)

        # Off-center fp32 data (mean 1e4, std 1e-2): the merge keeps the digits.
        x = offcenter(9, 3, 4, loc=1e4, scale=1e-2, dtype=torch.float32, seed=3)
        split = (4, 0, 5)
        lo, hi = sum(split[:rank]), sum(split[: rank + 1])
        bn = nnl.BatchNorm2d(3, process_group=WORLD)
        y = bn(x[lo:hi].unsqueeze(-1))
        ref = nnl.BatchNorm2d(3, dtype=F64)(x.double().unsqueeze(-1))[lo:hi]
        assert_close(y, ref, torch.float32, rtol=1e-4, atol=1e-4)

        # process_group=None and one-process groups: local, no communication.
        counter.paused = True
        singles = [dist.new_group([r]) for r in range(world)]
        counter.paused = False
        for group in (None, singles[rank]):
            assert resolve_process_group(group) is None
            local = nnl.BatchNorm2d(3, dtype=F64, process_group=group)
            plain = nnl.BatchNorm2d(3, dtype=F64)
            x = offcenter(4, 3, 2, 2, seed=rank)
            counter.take()
            _check(rank, f"group={group} output", local(x), plain(x))
            assert counter.take() == []
            _check(rank, f"group={group} running_var", local.running_var, plain.running_var)
        assert sync_active(WORLD)

        # A global batch of one value per channel is refused on every rank (no hang).
        bn = nnl.BatchNorm1d(3, process_group=WORLD)
        x = torch.randn(1 if rank == 0 else 0, 3)
        try:
            bn(x)
        except ValueError as e:
            assert "over all processes" in str(e), str(e)
        else:
            raise AssertionError("a global batch of 1 was accepted")
    finally:
        counter.uninstall()


# ----------------------------------------------------------------------------- DDP scenario


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False),
            nnl.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3, bias=False),
            nn.BatchNorm2d(5),  # torch's: convert_sync makes it a synced normlab BN
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def scenario_ddp(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref = TinyCNN().double()
    model = convert_sync(copy.deepcopy(ref))
    assert isinstance(model.body[4], nnl.BatchNorm2d) and model.body[4].process_group == WORLD
    ddp = DDP(model)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step, split in enumerate([(3, 5, 2), (4, 0, 3), (2, 2, 2)]):
        n_all = sum(split)
        lo, hi = sum(split[:rank]), sum(split[: rank + 1])
        x = offcenter(n_all, 2, 6, 6, seed=step)
        target = torch.arange(n_all) % 3
        loss_ref = nn.functional.cross_entropy(ref(x), target)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        # DDP averages gradients over ranks: scale each rank's summed loss by world/N
        # so the average is the gradient of the global mean loss, for uneven batches too.
        out = ddp(x[lo:hi])
        loss = nn.functional.cross_entropy(out, target[lo:hi], reduction="sum") * (world / n_all)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            _check(rank, f"ddp step {step} parameter {name}", p, q)
        for (name, b), c in zip(model.named_buffers(), ref.buffers(), strict=True):
            _check(rank, f"ddp step {step} buffer {name}", b, c)
    # revert_sync gives back torch's BatchNorm2d, sharing the trained tensors.
    plain = revert_sync(model)
    assert type(plain.body[4]) is nn.BatchNorm2d and plain.body[1].process_group is None


def scenario_crash(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.all_reduce(torch.ones(1))  # would wait forever for rank 1


SCENARIOS: dict[str, Callable[[int, int], None]] = {
    "layers": scenario_layers,
    "ddp": scenario_ddp,
    "crash": scenario_crash,
}


def scenario_layers_and_ddp(rank: int, world: int) -> None:
    scenario_layers(rank, world)
    scenario_ddp(rank, world)


SCENARIOS["layers_and_ddp"] = scenario_layers_and_ddp


@pytest.mark.slow
def test_synced_layers_and_ddp_match_one_process_on_three_ranks() -> None:
    """Every synced layer (even, uneven, empty-rank splits), collective counts, DDP."""
    run_world("layers_and_ddp", 3)


@pytest.mark.slow
def test_a_crashed_rank_is_reported_not_hung() -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 'crash' failed(.|\n)*deliberate"):
        run_world("crash", 2, timeout=60)
    assert time.monotonic() - t0 < 55


# ----------------------------------------------------------------------------- single process

SYNC_LAYERS = [
    (lambda **k: nnl.BatchNorm2d(3, **k), (4, 3, 2, 2)),
    (lambda **k: nnl.SwitchableNorm2d(3, **k), (4, 3, 2, 2)),
    (lambda **k: nnl.MovingAverageBatchNorm2d(3, warmup_iters=0, **k), (4, 3, 2, 2)),
    (lambda **k: nnl.BatchRenorm2d(3, warmup_iters=0, **k), (4, 3, 2, 2)),
    (lambda **k: nnl.EvoNormB0_2d(3, **k), (4, 3, 2, 2)),
]


@pytest.mark.parametrize("case", range(len(SYNC_LAYERS)))
def test_without_a_process_group_sync_is_a_no_op(case: int) -> None:
    assert not dist.is_initialized()
    make, shape = SYNC_LAYERS[case]
    torch.manual_seed(0)
    plain = make(dtype=F64)
    torch.manual_seed(0)
    synced = make(dtype=F64, process_group=WORLD)
    x = offcenter(*shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), synced(xb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for a, b in zip(plain.buffers(), synced.buffers(), strict=True):
        assert torch.equal(a, b)


def test_a_bad_process_group_is_a_clear_error() -> None:
    bn = nnl.BatchNorm2d(3, process_group="everyone")
    with pytest.raises(TypeError, match="process_group must be None"):
        bn(torch.randn(2, 3, 2, 2))
    with pytest.raises(TypeError, match="process_group must be None"):
        convert_sync(nn.Sequential(nnl.BatchNorm2d(3)), process_group=3)


def test_convert_sync_and_revert_sync_carry_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.SyncBatchNorm(4, eps=1e-3),
        nnl.SwitchableNorm2d(4),
        nnl.GroupNorm(2, 4),
    )
    model[1].running_mean.fill_(0.5)
    model[1].eval()
    weight, rm = model[1].weight, model[1].running_mean
    convert_sync(model)
    assert type(model[1]) is nnl.BatchNorm2d and model[1].process_group == WORLD
    assert model[1].weight is weight and model[1].running_mean is rm  # shared, not copied
    assert model[1].momentum == 0.3 and not model[1].training and model[2].training
    assert model[1].process_group == WORLD
    assert type(model[2]) is nnl.BatchNorm2d and model[2].eps == 1e-3
    assert model[3].process_group == WORLD
    assert type(model[4]) is nnl.GroupNorm
    x = offcenter(2, 3, 2, 2, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    revert_sync(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight
    assert type(model[2]) is nnl.BatchNorm2d and model[2].process_group is None
    assert model[3].process_group is None
    with torch.no_grad():  # torch's eval kernel vs normlab's: equal up to rounding
        assert_close(model(x), before, torch.float32)
    # A bare BatchNorm is replaced as the root, and back.
    bn = convert_sync(nn.BatchNorm1d(4, affine=False))
    assert type(bn) is nnl.BatchNorm1d and bn.weight is None and bn.process_group == WORLD
    assert type(revert_sync(bn)) is nn.BatchNorm1d


def test_convert_norms_sync() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model, report = convert_norms(model, "sn", sync=True)
    assert model[1].process_group == WORLD
    assert report.replacements[0].details["sync"] == WORLD
    with pytest.raises(ValueError, match="sync=True"):
        convert_norms(nn.Sequential(nn.BatchNorm2d(4)), "gn", sync=True)
