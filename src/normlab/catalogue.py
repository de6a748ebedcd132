"""The layer catalogue: every layer in each mode, with its float64 reference adapter.

Each :class:`LayerCase` says how to build a layer, what input it takes and how
the NumPy reference (:mod:`normlab.reference`) computes its output and
gradients from the layer's own parameters and buffers. :data:`CATALOGUE` is the
table of cases; :mod:`normlab.selfcheck` runs it, and the test suite drives its
reference and gradcheck tests from the same table. Kept apart from the runner
so that adding a layer touches only this table and its adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import nn as nnl
from . import reference as R
from .nn.traits import traits_of

__all__ = ["LayerCase", "CATALOGUE"]

Backward = Callable[[np.ndarray], dict]
Reference = Callable[[np.ndarray, nn.Module], tuple[np.ndarray, Backward]]


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


def _a(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def _bn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.batch_norm_forward(
        x,
        _a(m.weight),
        _a(m.bias),
        running_mean=_a(m.running_mean),
        running_var=_a(m.running_var),
        training=m.training or m.running_mean is None,
        eps=m.eps,
    )
    return y, lambda dy: R.batch_norm_backward(dy, cache)


def _frozen_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.frozen_batch_norm_forward(
        x, _a(m.weight), _a(m.bias), _a(m.running_mean), _a(m.running_var), m.eps
    )
    return y, lambda dy: R.frozen_batch_norm_backward(dy, cache)


def _gn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.group_norm_forward(x, m.num_groups, _a(m.weight), _a(m.bias), m.eps)
    return y, lambda dy: R.group_norm_backward(dy, cache)


def _ln_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.layer_norm_forward(x, m.normalized_shape, _a(m.weight), _a(m.bias), m.eps)
    return y, lambda dy: R.layer_norm_backward(dy, cache)


def _ln2d_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.layer_norm2d_forward(x, _a(m.weight), _a(m.bias), m.eps)
    return y, lambda dy: R.layer_norm2d_backward(dy, cache)


def _in_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    use_input = m.training or not m.track_running_stats
    y, cache = R.instance_norm_forward(
        x,
        _a(m.weight),
        _a(m.bias),
        running_mean=_a(m.running_mean),
        running_var=_a(m.running_var),
        use_input_stats=use_input,
        eps=m.eps,
    )
    return y, lambda dy: R.instance_norm_backward(dy, cache)


def _lrn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.local_response_norm_forward(x, m.size, m.alpha, m.beta, m.k)
    return y, lambda dy: R.local_response_norm_backward(dy, cache)


def _sn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.switchable_norm_forward(
        x,
        _a(m.mean_weight),
        _a(m.var_weight),
        _a(m.weight),
        _a(m.bias),
        running_mean=_a(m.running_mean),
        running_var=_a(m.running_var),
        training=m.training or m.running_mean is None,
        eps=m.eps,
        using_bn=m.using_bn,
    )
    return y, lambda dy: R.switchable_norm_backward(dy, cache)


def _frn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    tau = _a(m.tau) if m.tlu else None
    eps = float(m.effective_eps())
    y, cache = R.filter_response_norm_forward(x, _a(m.weight), _a(m.bias), eps=eps, tau=tau)
    return y, lambda dy: R.filter_response_norm_backward(dy, cache)


def _tlu_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.tlu_forward(x, _a(m.tau))
    return y, lambda dy: R.tlu_backward(dy, cache)


def _brn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    r_max, d_max = (float(t) for t in m.renorm_limits())
    y, cache = R.batch_renorm_forward(
        x,
        _a(m.weight),
        _a(m.bias),
        running_mean=_a(m.running_mean),
        running_var=_a(m.running_var),
        training=m.training,
        eps=m.eps,
        r_max=r_max,
        d_max=d_max,
    )
    return y, lambda dy: R.batch_renorm_backward(dy, cache)


def _evonorm_b0_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.evonorm_b0_forward(
        x,
        _a(m.v),
        _a(m.weight),
        _a(m.bias),
        running_var=_a(m.running_var),
        training=m.training or m.running_var is None,
        eps=m.eps,
    )
    return y, lambda dy: R.evonorm_b0_backward(dy, cache)


def _evonorm_s0_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.evonorm_s0_forward(x, m.groups, _a(m.v), _a(m.weight), _a(m.bias), eps=m.eps)
    return y, lambda dy: R.evonorm_s0_backward(dy, cache)


def _mabn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.moving_average_batch_norm_forward(
        x,
        _a(m.weight),
        _a(m.bias),
        running_var=_a(m.running_var),
        chi_window=_a(m.chi_window),
        psi_window=_a(m.psi_window),
        psi_filled=int(m.psi_filled),
        num_batches_tracked=int(m.num_batches_tracked),
        training=m.training,
        momentum=m.momentum,
        eps=m.eps,
        warmup_iters=m.warmup_iters,
        r_clip=m.r_clip,
    )
    return y, lambda dy: R.moving_average_batch_norm_backward(dy, cache)


def _small_batch_cases() -> list[LayerCase]:
    brn = {"warmup_iters": 0, "r_max_rampup_iters": 0, "d_max_rampup_iters": 0}
    return [
        LayerCase(
            "SwitchableNorm2d train", "sn", lambda: nnl.SwitchableNorm2d(5), (3, 5, 4, 3), _sn_ref
        ),
        LayerCase(
            "SwitchableNorm2d eval",
            "sn",
            lambda: nnl.SwitchableNorm2d(5),
            (3, 5, 4, 3),
            _sn_ref,
            False,
        ),
        LayerCase(
            "SwitchableNorm1d (LN, BN)", "sn", lambda: nnl.SwitchableNorm1d(6), (5, 6), _sn_ref
        ),
        LayerCase(
            "SwitchableNorm3d no BN",
            "sn",
            lambda: nnl.SwitchableNorm3d(3, using_bn=False),
            (2, 3, 3, 2, 2),
            _sn_ref,
        ),
        LayerCase(
            "FilterResponseNorm2d + TLU",
            "frn",
            lambda: nnl.FilterResponseNorm2d(5),
            (3, 5, 4, 3),
            _frn_ref,
        ),
        LayerCase(
            "FilterResponseNorm1d no TLU",
            "frn",
            lambda: nnl.FilterResponseNorm1d(4, tlu=False),
            (2, 4, 7),
            _frn_ref,
        ),
        LayerCase(
            "FilterResponseNorm3d + TLU",
            "frn",
            lambda: nnl.FilterResponseNorm3d(3),
            (2, 3, 3, 2, 2),
            _frn_ref,
        ),
        LayerCase(
            "BatchRenorm3d train",
            "brn",
            lambda: nnl.BatchRenorm3d(3, **brn),
            (2, 3, 3, 2, 2),
            _brn_ref,
        ),
        LayerCase(
            "MovingAverageBatchNorm1d warm-up (exact BN gradient)",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm1d(5, warmup_iters=10**9),
            (6, 5, 3),
            _mabn_ref,
            warm_up=True,
        ),
        LayerCase(
            "MovingAverageBatchNorm3d train",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm3d(3, warmup_iters=0),
            (2, 3, 3, 2, 2),
            _mabn_ref,
        ),
        LayerCase("TLU", "frn", lambda: nnl.TLU(5), (3, 5, 4, 3), _tlu_ref),
        LayerCase(
            "BatchRenorm2d train (r, d clipped)",
            "brn",
            lambda: nnl.BatchRenorm2d(5, **brn),
            (3, 5, 4, 3),
            _brn_ref,
        ),
        LayerCase(
            "BatchRenorm1d eval",
            "brn",
            lambda: nnl.BatchRenorm1d(5, **brn),
            (6, 5),
            _brn_ref,
            False,
        ),
        LayerCase(
            "EvoNormB0_2d train",
            "evonorm",
            lambda: nnl.EvoNormB0_2d(6),
            (3, 6, 4, 3),
            _evonorm_b0_ref,
        ),
        LayerCase(
            "EvoNormB0_2d eval",
            "evonorm",
            lambda: nnl.EvoNormB0_2d(6),
            (3, 6, 4, 3),
            _evonorm_b0_ref,
            False,
        ),
        LayerCase(
            "EvoNormS0_2d G=3",
            "evonorm",
            lambda: nnl.EvoNormS0_2d(6, groups=3),
            (2, 6, 4, 3),
            _evonorm_s0_ref,
        ),
        LayerCase(
            "MovingAverageBatchNorm2d train",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm2d(5, warmup_iters=0),
            (3, 5, 4, 3),
            _mabn_ref,
        ),
        LayerCase(
            "MovingAverageBatchNorm2d eval",
            "mabn",
            lambda: nnl.MovingAverageBatchNorm2d(5),
            (3, 5, 4, 3),
            _mabn_ref,
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
                f"BatchNorm{rank_name} train", "bn", lambda k=cls, s=shape: k(s[1]), shape, _bn_ref
            )
        )
        c.append(
            LayerCase(
                f"BatchNorm{rank_name} eval",
                "bn",
                lambda k=cls, s=shape: k(s[1]),
                shape,
                _bn_ref,
                training=False,
            )
        )
        c.append(
            LayerCase(
                f"FrozenBatchNorm{rank_name}",
                "frozen_bn",
                lambda k=frozen, s=shape: k(s[1]),
                shape,
                _frozen_ref,
            )
        )
    c += [
        LayerCase("BatchNorm1d (N, C)", "bn", lambda: nnl.BatchNorm1d(5), (7, 5), _bn_ref),
        LayerCase(
            "BatchNorm2d no-affine no-tracking eval",
            "bn",
            lambda: nnl.BatchNorm2d(5, affine=False, track_running_stats=False),
            (3, 5, 4, 3),
            _bn_ref,
            training=False,
        ),
        LayerCase("GroupNorm G=3", "gn", lambda: nnl.GroupNorm(3, 6), (2, 6, 5, 3), _gn_ref),
        LayerCase("GroupNorm G=1 (N, C)", "gn", lambda: nnl.GroupNorm(1, 6), (3, 6), _gn_ref),
        LayerCase("GroupNorm G=C 3d", "gn", lambda: nnl.GroupNorm(4, 4), (2, 4, 3, 2, 2), _gn_ref),
        LayerCase(
            "LayerNorm [C,H,W]", "ln", lambda: nnl.LayerNorm([5, 4, 3]), (3, 5, 4, 3), _ln_ref
        ),
        LayerCase("LayerNorm [D]", "ln", lambda: nnl.LayerNorm(7), (2, 3, 7), _ln_ref),
        LayerCase("LayerNorm2d", "ln", lambda: nnl.LayerNorm2d(5), (2, 5, 4, 3), _ln2d_ref),
        LayerCase(
            "InstanceNorm2d affine",
            "in",
            lambda: nnl.InstanceNorm2d(5, affine=True),
            (3, 5, 4, 3),
            _in_ref,
        ),
        LayerCase(
            "InstanceNorm1d tracked eval",
            "in",
            lambda: nnl.InstanceNorm1d(5, affine=True, track_running_stats=True),
            (3, 5, 6),
            _in_ref,
            training=False,
        ),
        LayerCase("InstanceNorm3d", "in", lambda: nnl.InstanceNorm3d(3), (2, 3, 3, 2, 3), _in_ref),
        LayerCase(
            "LocalResponseNorm size=3",
            "lrn",
            lambda: nnl.LocalResponseNorm(3, alpha=0.3, beta=0.75, k=2.0),
            (2, 6, 4, 3),
            _lrn_ref,
        ),
        LayerCase(
            "LocalResponseNorm size=4 1d",
            "lrn",
            lambda: nnl.LocalResponseNorm(4, alpha=0.2, beta=0.6, k=1.5),
            (2, 5, 7),
            _lrn_ref,
        ),
    ]
    return c


CATALOGUE: list[LayerCase] = _cases() + _small_batch_cases()
