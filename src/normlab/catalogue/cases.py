"""The layer catalogue: every layer in each mode, with its float64 reference adapter.

Each :class:`LayerCase` says how to build a layer, what input it takes and how
the NumPy reference (:mod:`normlab.reference`) computes its output and
gradients from the layer's own parameters and buffers. :data:`CATALOGUE` is the
table of cases; :mod:`normlab.catalogue.selfcheck` runs it, and the test suite drives its
reference and gradcheck tests from the same table. Kept apart from the runner
so that adding a layer touches only this table and its adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .. import nn as nnl
from ..nn.traits import traits_of
from .refs import (
    Reference,
    bn_ref,
    brn_ref,
    cbn_ref,
    evonorm_b0_ref,
    evonorm_s0_ref,
    frn_ref,
    frozen_ref,
    gn_ref,
    in_ref,
    ln2d_ref,
    ln_ref,
    lrn_ref,
    mabn_ref,
    rms2d_ref,
    rms_ref,
    sn_ref,
    tlu_ref,
)

__all__ = ["LayerCase", "CATALOGUE"]


@dataclass(frozen=True)
class LayerCase:
    """One layer in one mode: how to build it, its input shape, its reference."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    reference: Reference
    training: bool = True
    # The layer is inside its warm-up, where it trains as BatchNorm does.
    warm_up: bool = False

    @property
    def exact_gradient(self) -> bool:
        """Finite differences can check the backward: eval mode, a warm-up step, or a layer
        whose traits say so (not BRN, not MABN). The reference check pins every backward."""
        if not self.training or self.warm_up:
            return True
        traits = traits_of(self.build())
        return traits is None or traits.exact_gradient


def _small_batch_cases() -> list[LayerCase]:
    brn = {"warmup_iters": 0, "r_max_rampup_iters": 0, "d_max_rampup_iters": 0}
    return [
        LayerCase(
            "SwitchableNorm2d train", "sn", lambda: nnl.SwitchableNorm2d(5), (3, 5, 4, 3), sn_ref
        ),
        LayerCase(
            "SwitchableNorm2d eval",
            "sn",
            lambda: nnl.SwitchableNorm2d(5),
            (3, 5, 4, 3),
            sn_ref,
            False,
        ),
        LayerCase(
            "SwitchableNorm1d (LN, BN)", "sn", lambda: nnl.SwitchableNorm1d(6), (5, 6), sn_ref
        ),
        LayerCase(
            "SwitchableNorm3d no BN",
            "sn",
            lambda: nnl.SwitchableNorm3d(3, using_bn=False),
            (2, 3, 3, 2, 2),
            sn_ref,
        ),
        LayerCase(
            "FilterResponseNorm2d + TLU",
            "frn",
            lambda: nnl.FilterResponseNorm2d(5),
            (3, 5, 4, 3),
            frn_ref,
        ),
        LayerCase(
            "FilterResponseNorm1d no TLU",
            "frn",
            lambda: nnl.FilterResponseNorm1d(4, tlu=False),
            (2, 4, 7),
            frn_ref,
        ),
        LayerCase(
            "FilterResponseNorm3d + TLU",
            "frn",
            lambda: nnl.FilterResponseNorm3d(3),
            (2, 3, 3, 2, 2),
            frn_ref,
        ),
        LayerCase(
            "BatchRenorm3d train",
            "brn",
            lambda: nnl.BatchRenorm3d(3, **brn),
            (2, 3, 3, 2, 2),
            brn_ref,
        ),
        LayerCase(
            "MovingAverageBatchNorm1d warm-up (exact BN gradient)",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm1d(5, warmup_iters=10**9),
            (6, 5, 3),
            mabn_ref,
            warm_up=True,
        ),
        LayerCase(
            "MovingAverageBatchNorm3d train",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm3d(3, warmup_iters=0),
            (2, 3, 3, 2, 2),
            mabn_ref,
        ),
        LayerCase("TLU", "frn", lambda: nnl.TLU(5), (3, 5, 4, 3), tlu_ref),
        LayerCase(
            "BatchRenorm2d train (r, d clipped)",
            "brn",
            lambda: nnl.BatchRenorm2d(5, **brn),
            (3, 5, 4, 3),
            brn_ref,
        ),
        LayerCase(
            "BatchRenorm1d eval",
            "brn",
            lambda: nnl.BatchRenorm1d(5, **brn),
            (6, 5),
            brn_ref,
            False,
        ),
        LayerCase(
            "EvoNormB0_2d train",
            "evonorm",
            lambda: nnl.EvoNormB0_2d(6),
            (3, 6, 4, 3),
            evonorm_b0_ref,
        ),
        LayerCase(
            "EvoNormB0_2d eval",
            "evonorm",
            lambda: nnl.EvoNormB0_2d(6),
            (3, 6, 4, 3),
            evonorm_b0_ref,
            False,
        ),
        LayerCase(
            "EvoNormS0_2d G=3",
            "evonorm",
            lambda: nnl.EvoNormS0_2d(6, groups=3),
            (2, 6, 4, 3),
            evonorm_s0_ref,
        ),
        LayerCase(
            "MovingAverageBatchNorm2d train",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm2d(5, warmup_iters=0),
            (3, 5, 4, 3),
            mabn_ref,
        ),
        LayerCase(
            "MovingAverageBatchNorm2d eval",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm2d(5),
            (3, 5, 4, 3),
            mabn_ref,
            False,
        ),
        # Alone (no convolution before it) CBN trains on this batch only; the pooled
        # steps are checked against the reference in tests/test_cross_iteration_batch_norm.py.
        LayerCase(
            "CrossIterationBatchNorm2d burn-in",
            "cbn",
            lambda: nnl.CrossIterationBatchNorm2d(5, burnin=10**9),
            (3, 5, 4, 3),
            cbn_ref,
            warm_up=True,
        ),
        LayerCase(
            "CrossIterationBatchNorm2d eval",
            "cbn",
            lambda: nnl.CrossIterationBatchNorm2d(5),
            (2, 5, 3, 3),
            cbn_ref,
            False,
        ),
    ]


def _cases() -> list[LayerCase]:
    c: list[LayerCase] = []
    for rank_name, cls, frozen, shape in (
        ("1d", nnl.BatchNorm1d, nnl.FrozenBatchNorm1d, (6, 5, 7)),
        ("2d", nnl.BatchNorm2d, nnl.FrozenBatchNorm2d, (3, 5, 4, 3)),
        ("3d", nnl.BatchNorm3d, nnl.FrozenBatchNorm3d, (2, 3, 3, 2, 3)),
    ):
        c.append(
            LayerCase(
                f"BatchNorm{rank_name} train", "bn", lambda k=cls, s=shape: k(s[1]), shape, bn_ref
            )
        )
        c.append(
            LayerCase(
                f"BatchNorm{rank_name} eval",
                "bn",
                lambda k=cls, s=shape: k(s[1]),
                shape,
                bn_ref,
                training=False,
            )
        )
        c.append(
            LayerCase(
                f"FrozenBatchNorm{rank_name}",
                "frozen_bn",
                lambda k=frozen, s=shape: k(s[1]),
                shape,
                frozen_ref,
            )
        )
    c += [
        LayerCase("BatchNorm1d (N, C)", "bn", lambda: nnl.BatchNorm1d(5), (7, 5), bn_ref),
        LayerCase(
            "BatchNorm2d no-affine no-tracking eval",
            "bn",
            lambda: nnl.BatchNorm2d(5, affine=False, track_running_stats=False),
            (3, 5, 4, 3),
            bn_ref,
            training=False,
        ),
        LayerCase("GroupNorm G=3", "gn", lambda: nnl.GroupNorm(3, 6), (2, 6, 5, 3), gn_ref),
        LayerCase("GroupNorm G=1 (N, C)", "gn", lambda: nnl.GroupNorm(1, 6), (3, 6), gn_ref),
        LayerCase("GroupNorm G=C 3d", "gn", lambda: nnl.GroupNorm(4, 4), (2, 4, 3, 2, 2), gn_ref),
        LayerCase(
            "LayerNorm [C,H,W]", "ln", lambda: nnl.LayerNorm([5, 4, 3]), (3, 5, 4, 3), ln_ref
        ),
        LayerCase("LayerNorm [D]", "ln", lambda: nnl.LayerNorm(7), (2, 3, 7), ln_ref),
        LayerCase("LayerNorm2d", "ln", lambda: nnl.LayerNorm2d(5), (2, 5, 4, 3), ln2d_ref),
        LayerCase("RMSNorm [D]", "rms", lambda: nnl.RMSNorm(7), (2, 3, 7), rms_ref),
        LayerCase(
            "RMSNorm [H,W] eps", "rms", lambda: nnl.RMSNorm([4, 3], eps=1e-4), (3, 5, 4, 3), rms_ref
        ),
        LayerCase("RMSNorm2d", "rms", lambda: nnl.RMSNorm2d(5), (2, 5, 4, 3), rms2d_ref),
        LayerCase(
            "InstanceNorm2d affine",
            "in",
            lambda: nnl.InstanceNorm2d(5, affine=True),
            (3, 5, 4, 3),
            in_ref,
        ),
        LayerCase(
            "InstanceNorm1d tracked eval",
            "in",
            lambda: nnl.InstanceNorm1d(5, affine=True, track_running_stats=True),
            (3, 5, 6),
            in_ref,
            training=False,
        ),
        LayerCase("InstanceNorm3d", "in", lambda: nnl.InstanceNorm3d(3), (2, 3, 3, 2, 3), in_ref),
        LayerCase(
            "LocalResponseNorm size=3",
            "lrn",
            lambda: nnl.LocalResponseNorm(3, alpha=0.3, beta=0.75, k=2.0),
            (2, 6, 4, 3),
            lrn_ref,
        ),
        LayerCase(
            "LocalResponseNorm size=4 1d",
            "lrn",
            lambda: nnl.LocalResponseNorm(4, alpha=0.2, beta=0.6, k=1.5),
            (2, 5, 7),
            lrn_ref,
        ),
    ]
    return c


CATALOGUE: list[LayerCase] = _cases() + _small_batch_cases()
