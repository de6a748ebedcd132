"""The ecosystem case table: every module of ``normlab.nn`` with a small input.

Each :class:`EcoCase` builds one layer in float32 (with random, non-trivial
parameters and running statistics), names its input shape and says which
ecosystem paths its design allows. ``test_table_covers_every_module`` (in
``test_cases.py``) fails when a module of ``normlab.nn.__all__`` is missing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import normlab.nn as nnl
from normlab.catalogue import randomize
from normlab.nn.traits import traits_of


@dataclass(frozen=True)
class EcoCase:
    """One layer configuration.

    ``stateful``: training updates buffers in forward (or backward); from the
    layer's traits (:mod:`normlab.nn.traits`).
    ``batch_independent``: the output of one sample does not depend on the others
    in both modes, so ``vmap`` over samples / parameter sets is meaningful.
    ``vmap_eval_only``: batch-independent only in eval (BatchNorm-like layers
    with running statistics).
    """

    name: str
    cls: type
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    batch_independent: bool = False
    vmap_eval_only: bool = False

    @property
    def stateful(self) -> bool:
        if not getattr(traits_of(self.cls), "stateful", False):
            return False  # decided by the class: nothing is built
        return bool(getattr(traits_of(self.build()), "stateful", False))


def _bn_like(cls: type, **kw) -> Callable[[], nn.Module]:
    return lambda: randomize(cls(6, **kw).float())


C = 6
SHAPES = {1: (4, C, 5), 2: (3, C, 5, 4), 3: (2, C, 3, 4, 2)}


def _mabn(cls: type) -> Callable[[], nn.Module]:
    # warmup_iters=1: the second training step already uses the moving averages.
    return lambda: randomize(cls(C, window=3, warmup_iters=1).float())


def _brn(cls: type) -> Callable[[], nn.Module]:
    # Fixed limits: r and d are clipped from the first step on.
    return lambda: randomize(
        cls(C, r_max=1.5, d_max=0.5, warmup_iters=0, r_max_rampup_iters=0, d_max_rampup_iters=0)
    )


CASES: list[EcoCase] = []
for _r in (1, 2, 3):
    _s = SHAPES[_r]
    _bn = getattr(nnl, f"BatchNorm{_r}d")
    CASES += [
        EcoCase(f"BatchNorm{_r}d", _bn, _bn_like(_bn), _s, vmap_eval_only=True),
        EcoCase(
            f"FrozenBatchNorm{_r}d",
            getattr(nnl, f"FrozenBatchNorm{_r}d"),
            _bn_like(getattr(nnl, f"FrozenBatchNorm{_r}d")),
            _s,
            batch_independent=True,
        ),
        EcoCase(
            f"InstanceNorm{_r}d",
            getattr(nnl, f"InstanceNorm{_r}d"),
            _bn_like(getattr(nnl, f"InstanceNorm{_r}d"), affine=True),
            _s,
            batch_independent=True,
        ),
        EcoCase(
            f"FilterResponseNorm{_r}d",
            getattr(nnl, f"FilterResponseNorm{_r}d"),
            _bn_like(getattr(nnl, f"FilterResponseNorm{_r}d")),
            _s,
            batch_independent=True,
        ),
        EcoCase(
            f"MovingAverageBatchNorm{_r}d",
            getattr(nnl, f"MovingAverageBatchNorm{_r}d"),
            _mabn(getattr(nnl, f"MovingAverageBatchNorm{_r}d")),
            _s,
            vmap_eval_only=True,
        ),
        EcoCase(
            f"BatchRenorm{_r}d",
            getattr(nnl, f"BatchRenorm{_r}d"),
            _brn(getattr(nnl, f"BatchRenorm{_r}d")),
            _s,
            vmap_eval_only=True,
        ),
    ]
CASES += [
    # CBN's pooled steps need a conv's autograd graph and autograd.grad in forward, which
    # compile, tracing and torch.func refuse (tests/test_cross_iteration_batch_norm.py);
    # the case is its BatchNorm configuration (buffer_size=0) and its eval mode.
    EcoCase(
        "CrossIterationBatchNorm2d",
        nnl.CrossIterationBatchNorm2d,
        _bn_like(nnl.CrossIterationBatchNorm2d, buffer_size=0),
        SHAPES[2],
        vmap_eval_only=True,
    ),
    EcoCase(
        "BatchNorm2d-momentumNone",
        nnl.BatchNorm2d,
        _bn_like(nnl.BatchNorm2d, momentum=None),
        SHAPES[2],
        vmap_eval_only=True,
    ),
    EcoCase(
        "BatchNorm1d-2d-input",
        nnl.BatchNorm1d,
        _bn_like(nnl.BatchNorm1d),
        (5, C),
        vmap_eval_only=True,
    ),
    EcoCase(
        "BatchNorm2d-untracked",
        nnl.BatchNorm2d,
        _bn_like(nnl.BatchNorm2d, track_running_stats=False),
        SHAPES[2],
    ),
    EcoCase(
        "InstanceNorm2d-tracked",
        nnl.InstanceNorm2d,
        _bn_like(nnl.InstanceNorm2d, affine=True, track_running_stats=True),
        SHAPES[2],
        vmap_eval_only=True,
    ),
    EcoCase(
        "GroupNorm",
        nnl.GroupNorm,
        lambda: randomize(nnl.GroupNorm(3, C)),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "GroupNorm-3d",
        nnl.GroupNorm,
        lambda: randomize(nnl.GroupNorm(2, C)),
        SHAPES[3],
        batch_independent=True,
    ),
    EcoCase(
        "LayerNorm",
        nnl.LayerNorm,
        lambda: randomize(nnl.LayerNorm([5, 4])),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "LayerNorm2d",
        nnl.LayerNorm2d,
        lambda: randomize(nnl.LayerNorm2d(C)),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "RMSNorm",
        nnl.RMSNorm,
        lambda: randomize(nnl.RMSNorm([5, 4])),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "RMSNorm2d",
        nnl.RMSNorm2d,
        lambda: randomize(nnl.RMSNorm2d(C)),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "LocalResponseNorm",
        nnl.LocalResponseNorm,
        lambda: nnl.LocalResponseNorm(3, alpha=0.05, beta=0.75, k=2.0),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "SwitchableNorm1d",
        nnl.SwitchableNorm1d,
        _bn_like(nnl.SwitchableNorm1d),
        (5, C),
        vmap_eval_only=False,
    ),
    EcoCase(
        "SwitchableNorm2d",
        nnl.SwitchableNorm2d,
        _bn_like(nnl.SwitchableNorm2d),
        SHAPES[2],
    ),
    EcoCase(
        "SwitchableNorm3d",
        nnl.SwitchableNorm3d,
        _bn_like(nnl.SwitchableNorm3d),
        SHAPES[3],
    ),
    EcoCase(
        "FilterResponseNorm2d-learnable-eps",
        nnl.FilterResponseNorm2d,
        _bn_like(nnl.FilterResponseNorm2d, learnable_eps=True, tlu=False),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase("TLU", nnl.TLU, lambda: randomize(nnl.TLU(C)), SHAPES[2], batch_independent=True),
    EcoCase(
        "CenteredConv2d",
        nnl.CenteredConv2d,
        lambda: randomize(nnl.CenteredConv2d(C, 4, 3, padding=1)),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "WSConv2d",
        nnl.WSConv2d,
        lambda: randomize(nnl.WSConv2d(C, 4, 3, padding=1)),
        SHAPES[2],
        batch_independent=True,
    ),
    EcoCase(
        "EvoNormB0_2d",
        nnl.EvoNormB0_2d,
        _bn_like(nnl.EvoNormB0_2d),
        SHAPES[2],
        vmap_eval_only=True,
    ),
    EcoCase(
        "EvoNormS0_2d",
        nnl.EvoNormS0_2d,
        lambda: randomize(nnl.EvoNormS0_2d(C, groups=3)),
        SHAPES[2],
        batch_independent=True,
    ),
]

BY_NAME = {c.name: c for c in CASES}


def make_input(case: EcoCase, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Off-center input for ``case``."""
    g = torch.Generator().manual_seed(seed)
    return (3.0 + 2.0 * torch.randn(*case.shape, generator=g, dtype=torch.float64)).to(dtype)


def module_classes() -> set[type]:
    """Every ``nn.Module`` class exported by ``normlab.nn``."""
    out = set()
    for name in nnl.__all__:
        obj = getattr(nnl, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            out.add(obj)
    return out
