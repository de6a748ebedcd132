"""normlab.nn.traits: the table covers every layer class, and every trait is true to behaviour.

Each trait is checked both ways on every public layer class: a True trait must
show in the layer's behaviour, and a False one must not (or the layer must be
unable to do what the trait promises).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from normlab.catalogue import randomize
from normlab.nn.traits import LAYER_TRAITS, LayerTraits, traits_of

F64 = torch.float64
C = 4
SHAPES = {0: (6, C), 1: (5, C, 3), 2: (3, C, 5, 3), 3: (2, C, 3, 2, 3)}
Make = Callable[[int], nn.Module]

_BRN_SCHEDULE = {"warmup_iters": 2, "r_max_rampup_iters": 3, "d_max_rampup_iters": 3}


def _cases() -> dict[type, tuple[Make, int]]:
    """Layer class -> (builder for c channels, spatial rank). Builders pick a configuration
    in which each trait can show (FRN's learnable ε, tracked InstanceNorm, a short BRN ramp)."""
    cases: dict[type, tuple[Make, int]] = {}
    for r in (1, 2, 3):
        for family in ("BatchNorm", "FrozenBatchNorm", "SwitchableNorm"):
            # SwitchableNorm1d takes (N, C) only.
            rank = 0 if family == "SwitchableNorm" and r == 1 else r
            cases[getattr(nnl, f"{family}{r}d")] = (getattr(nnl, f"{family}{r}d"), rank)
        brn, mabn = getattr(nnl, f"BatchRenorm{r}d"), getattr(nnl, f"MovingAverageBatchNorm{r}d")
        cases[brn] = (lambda c, k=brn: k(c, r_max=50.0, d_max=50.0, **_BRN_SCHEDULE), r)
        cases[mabn] = (lambda c, k=mabn: k(c, window=2, warmup_iters=2), r)
        inst, frn = getattr(nnl, f"InstanceNorm{r}d"), getattr(nnl, f"FilterResponseNorm{r}d")
        cases[inst] = (lambda c, k=inst: k(c, affine=True, track_running_stats=True), r)
        cases[frn] = (lambda c, k=frn: k(c, learnable_eps=True), r)
    cases.update(
        {
            # CBN pools only after its convolution: alone it trains as BN (burn-in far
            # away, so no warning); the step-counter probe below feeds it from a conv.
            nnl.CrossIterationBatchNorm2d: (
                lambda c: nnl.CrossIterationBatchNorm2d(c, burnin=10**6),
                2,
            ),
            nnl.EvoNormB0_2d: (nnl.EvoNormB0_2d, 2),
            nnl.EvoNormS0_2d: (lambda c: nnl.EvoNormS0_2d(c, groups=c // 2), 2),
            nnl.GroupNorm: (lambda c: nnl.GroupNorm(c // 2, c), 2),
            nnl.LayerNorm: (lambda c: nnl.LayerNorm([c, 5, 3]), 2),
            nnl.LayerNorm2d: (nnl.LayerNorm2d, 2),
            nnl.RMSNorm: (lambda c: nnl.RMSNorm([c, 5, 3]), 2),
            nnl.RMSNorm2d: (nnl.RMSNorm2d, 2),
            nnl.LocalResponseNorm: (lambda c: nnl.LocalResponseNorm(3, alpha=0.5, k=1.0), 2),
            nnl.TLU: (nnl.TLU, 2),
            nnl.CenteredConv2d: (lambda c: nnl.CenteredConv2d(c, c, 3, padding=1), 2),
            nnl.WSConv2d: (lambda c: nnl.WSConv2d(c, c, 3, padding=1), 2),
        }
    )
    return cases


CASES = _cases()
IDS = [c.__name__ for c in CASES]


def _exported() -> set[type]:
    return {
        obj
        for obj in (getattr(nnl, n) for n in nnl.__all__)
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    }


def _build(cls: type, seed: int = 0, c: int = C) -> nn.Module:
    torch.manual_seed(seed)  # the convs draw their initial weights
    return randomize(CASES[cls][0](c).to(F64), seed).train()


def _input(cls: type, seed: int = 1, c: int = C) -> torch.Tensor:
    shape = list(SHAPES[CASES[cls][1]])
    shape[1] = c
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(shape, generator=g, dtype=F64)


def test_the_table_covers_every_exported_layer_class():
    missing = {c.__name__ for c in _exported() if c not in LAYER_TRAITS}
    assert not missing, f"add these classes to normlab.nn.traits.LAYER_TRAITS: {sorted(missing)}"
    assert _exported() == set(CASES), "tests/test_traits.py: CASES must cover normlab.nn"


def test_lookup_walks_the_mro_and_reads_the_user_protocol():
    class MyBN(nnl.BatchNorm2d):
        pass

    class Biased(nnl.BatchNorm2d):
        _recalibrate_unbiased = False

    class Own(nn.Module):
        _recalibrate_kind = "batch_second_moment"
        _step_counter = True

    assert traits_of(MyBN) == traits_of(nnl.BatchNorm2d)
    assert traits_of(Biased).recalibrate_unbiased is False and traits_of(Biased).batch_norm
    own = traits_of(Own())
    assert own == LayerTraits(
        batch_statistics=True,
        recalibrate_kind="batch_second_moment",
        step_counter=True,
        stateful=False,  # a module without buffers updates none
    )
    assert traits_of(nn.Conv2d(2, 2, 1)) is None and traits_of(nn.ReLU) is None

    class Unknown(nn.Module):
        _recalibrate_kind = "median"

    with pytest.raises(ValueError, match="Unknown._recalibrate_kind is 'median'.*does not know"):
        traits_of(Unknown)


def test_torch_norms_are_described():
    assert traits_of(nn.BatchNorm2d(3)).batch_norm and traits_of(nn.SyncBatchNorm(3)).batch_norm
    assert not traits_of(nn.SyncBatchNorm(3)).syncable  # torch's own process_group
    assert traits_of(nn.InstanceNorm2d(3)).recalibrate_kind == "instance_mean_var"

    class FrozenBatchNorm2d(nn.Module):  # torchvision's layout
        def __init__(self) -> None:
            super().__init__()
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(name, torch.ones(3))

    assert traits_of(FrozenBatchNorm2d()).frozen_batch_norm
    assert traits_of(FrozenBatchNorm2d) is None  # recognised by its buffers, not its class


def test_a_module_without_buffers_is_not_stateful():
    assert not traits_of(nnl.BatchNorm2d(3, track_running_stats=False)).stateful
    assert not traits_of(nnl.InstanceNorm2d(3)).stateful
    assert traits_of(nnl.InstanceNorm2d(3, track_running_stats=True)).stateful


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_syncable_means_the_constructor_takes_a_process_group(cls):
    takes = "process_group" in inspect.signature(cls).parameters
    assert traits_of(cls).syncable == takes


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_stateful_means_a_training_step_changes_buffers(cls):
    m = _build(cls)
    before = [b.clone() for b in m.buffers()]
    m(_input(cls).requires_grad_(True)).square().sum().backward()
    changed = any(not torch.equal(a, b) for a, b in zip(before, m.buffers(), strict=True))
    assert traits_of(m).stateful == changed


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_batch_statistics_means_a_sample_depends_on_the_others_in_training(cls):
    m, x = _build(cls), _input(cls)
    other = x.clone()
    other[1:] = 2.0 * other[1:] - 1.0
    with torch.no_grad():
        y, y_other = copy.deepcopy(m)(x)[0], copy.deepcopy(m)(other)[0]
    assert traits_of(cls).batch_statistics == (not torch.allclose(y, y_other, atol=1e-9))


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_step_counter_means_num_batches_tracked_changes_the_training_output(cls):
    m, x = _build(cls), _input(cls)
    if getattr(m, "num_batches_tracked", None) is None:
        assert not traits_of(cls).step_counter
        return
    late = copy.deepcopy(m)
    late.num_batches_tracked.fill_(100)
    run = _STEP_PROBES.get(cls, _no_grad_forward)
    differs = not torch.allclose(run(copy.deepcopy(m), x), run(late, x), atol=1e-9)
    assert traits_of(cls).step_counter == differs


def _no_grad_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def _cbn_after_a_conv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Three training steps of CBN behind a convolution with burn-in 1: from step 0 it
    pools the third step with the second; past burn-in (step 100) already the second."""
    m.burnin = 1
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 1, bias=False).to(F64)
    return torch.cat([m(conv(x + i)).detach() for i in range(3)])


_STEP_PROBES = {nnl.CrossIterationBatchNorm2d: _cbn_after_a_conv}


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_exact_gradient_means_finite_differences_agree(cls):
    m, x = _build(cls), _input(cls).requires_grad_(True)
    if getattr(m, "num_batches_tracked", None) is not None:
        m.num_batches_tracked.fill_(100)  # past every warm-up
    params = [p for p in m.parameters() if p.requires_grad]
    exact = torch.autograd.gradcheck(
        lambda inp, *ps: m(inp), (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, raise_exception=False
    )
    assert traits_of(cls).exact_gradient == exact


def _pack(a: nn.Module, b: nn.Module, wide: nn.Module) -> bool:
    """Load into ``wide`` the channel-wise concatenation of ``a`` and ``b``'s state; False when
    some tensor is not per channel (a per-layer value that differs, a channel-mixing shape)."""
    state = {}
    for (name, ta), tb, tw in zip(
        a.state_dict().items(), b.state_dict().values(), wide.state_dict().values(), strict=True
    ):
        if ta.shape == tw.shape:
            if not torch.equal(ta, tb):
                return False
            state[name] = ta
            continue
        dims = [d for d in range(ta.dim()) if ta.shape[d] != tw.shape[d]]
        if len(dims) != 1 or tw.shape[dims[0]] != 2 * ta.shape[dims[0]]:
            return False
        state[name] = torch.cat([ta, tb], dim=dims[0])
    wide.load_state_dict(state)
    return True


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_channel_separable_means_two_layers_side_by_side_are_one_wide_layer(cls):
    a, b, wide = _build(cls, seed=0), _build(cls, seed=1), _build(cls, c=2 * C)
    xa, xb = _input(cls, seed=2), _input(cls, seed=3)
    separable = _pack(a, b, wide)
    if separable:
        with torch.no_grad():
            y = wide(torch.cat([xa, xb], dim=1))
            separable = torch.allclose(y, torch.cat([a(xa), b(xb)], dim=1), atol=1e-9)
    assert traits_of(cls).channel_separable == separable


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_recalibrate_kind_names_what_a_training_step_stores_in_running_var(cls):
    m, x = _build(cls), _input(cls)
    kind = traits_of(cls).recalibrate_kind
    if hasattr(m, "momentum"):
        m.momentum = 1.0  # the running statistics become this batch's
    before = getattr(m, "running_var", None)
    before = None if before is None else before.clone()
    with torch.no_grad():
        m(x)
    flat = x.transpose(0, 1).reshape(C, x.shape[0], -1)
    expected = {
        "batch_mean_var": lambda: flat.reshape(C, -1).var(dim=1),
        "batch_second_moment": lambda: flat.reshape(C, -1).square().mean(dim=1),
        "instance_mean_var": lambda: flat.var(dim=2).mean(dim=1),
        None: lambda: before,
    }[kind]()
    if expected is None:
        assert getattr(m, "running_var", None) is None
    else:
        torch.testing.assert_close(m.running_var, expected, rtol=1e-9, atol=1e-9)
