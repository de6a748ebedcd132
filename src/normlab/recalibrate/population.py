"""Which layers keep running statistics, and their exact population moments.

:func:`recalibration_kind` says which statistic a layer keeps (its
:mod:`normlab.nn.traits`, or the ``_recalibrate_kind`` protocol for other classes);
:class:`Population` accumulates that statistic over the inputs a layer sees, batch by
batch, in float64: for the batch kinds the count, mean and ``M_2`` merged with Chan's
update (:class:`normlab._core.stats.PooledMoments`) and, beside them, the
count-weighted sum of the per-batch variances, so that either ``variance``
(``"population"``: ``M_2 / (n − 1)``; ``"per_batch"``: the BN paper's Algorithm 2,
count-weighted) can be stored at the end. The formulas and why are in
``docs/recalibrate.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._core.stats import PooledMoments
from ..nn.traits import RECALIBRATE_KINDS, traits_of

__all__ = ["KINDS", "VARIANCES", "Population", "Variance", "declared_kind", "recalibration_kind"]

KINDS = RECALIBRATE_KINDS
VARIANCES = ("population", "per_batch")
Variance = Literal["population", "per_batch"]


def declared_kind(module: nn.Module) -> str | None:
    """The statistic ``module``'s running buffers hold (its traits, see
    :mod:`normlab.nn.traits`), whether or not it has the buffers."""
    traits = traits_of(module)
    return None if traits is None else traits.recalibrate_kind


def recalibration_kind(module: nn.Module) -> str | None:
    """The statistic ``module`` keeps (one of :data:`KINDS`), or None if it keeps none."""
    kind = declared_kind(module)
    if kind is None or not any(
        isinstance(getattr(module, b, None), Tensor) for b in ("running_mean", "running_var")
    ):
        return None
    return kind


class Population(PooledMoments):
    """Exact moments of one layer's inputs, merged batch by batch in float64.

    Attributes ``n`` (values per channel seen; instances for the instance kind),
    ``mean`` and ``m2`` (batch kinds: ``Σ (x − mean)²``; instance kind: the
    running average of the instance variances) are read by :mod:`normlab.doctor`.
    """

    def __init__(
        self, module: nn.Module, kind: str, path: str, variance: Variance = "population"
    ) -> None:
        if variance not in VARIANCES:
            raise ValueError(
                f"recalibrate: variance={variance!r} is not one of {', '.join(VARIANCES)}."
            )
        self.kind = kind
        self.variance = variance
        traits = traits_of(module)
        self.unbiased = traits is None or traits.recalibrate_unbiased
        self.path = path
        self.name = type(module).__name__
        self.batched_rank = _batched_rank(module)
        buffers = (getattr(module, b, None) for b in ("running_mean", "running_var"))
        self.device = next((b.device for b in buffers if isinstance(b, Tensor)), None)
        self.clear()

    def clear(self) -> None:
        """Forget every input seen."""
        PooledMoments.__init__(self)
        self.batch_var_sum: Tensor | None = None  # Σ_b n_b s_b² (batches with n_b ≥ 2)
        self.batch_var_n = 0  # Σ_b n_b over those batches

    def update(self, x: Tensor) -> None:
        """Add one call's input (channels on dim 1) to the moments."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError(
                f"recalibrate: {self.path} ({self.name}) got a {type(x).__name__} input; "
                "its statistics need a floating tensor with channels on dim 1."
            )
        x = x.detach().to(torch.float64)
        if self.kind == "instance_mean_var":
            self._update_instances(x)
            return
        if x.dim() < 2:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) got input of shape {tuple(x.shape)}; "
                "expected (N, C, ...) with channels on dim 1."
            )
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        nb = flat.shape[1]
        if nb == 0:
            return
        if self.mean is not None:
            self._check_channels(flat.shape[0])
        m2b = self.add(flat)
        if nb >= 2 or not self.unbiased:
            vb = m2b * (nb / (nb - 1)) if self.unbiased else m2b  # n_b · s_b²
            self.batch_var_sum = vb if self.batch_var_sum is None else self.batch_var_sum + vb
            self.batch_var_n += nb

    def _update_instances(self, x: Tensor) -> None:
        if self.batched_rank is not None and x.dim() == self.batched_rank - 1:
            x = x.unsqueeze(0)
        if x.dim() < 3:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) got input of shape {tuple(x.shape)}; "
                "instance statistics need (N, C, *spatial)."
            )
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        if flat.shape[2] < 2:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) sees {flat.shape[2]} spatial value(s) "
                "per instance; an instance variance needs at least 2."
            )
        var, mean = torch.var_mean(flat, dim=2, correction=1 if self.unbiased else 0)
        nb = flat.shape[0]
        # Instances count equally: running averages of the instance mean and variance.
        mb, vb = mean.mean(dim=0), var.mean(dim=0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mb, vb
        else:
            self._check_channels(mb.shape[0])
            n = self.n + nb
            self.mean = self.mean + (mb - self.mean) * (nb / n)
            self.m2 = self.m2 + (vb - self.m2) * (nb / n)
            self.n = n

    def state(self) -> tuple[int, Tensor | None, Tensor | None, Tensor | None, int]:
        """``(n, mean, m2, batch_var_sum, batch_var_n)``: what another process's
        :meth:`absorb` merges (:mod:`normlab.recalibrate.ranks`)."""
        return self.n, self.mean, self.m2, self.batch_var_sum, self.batch_var_n

    def absorb(self, state: tuple[int, Tensor | None, Tensor | None, Tensor | None, int]) -> None:
        """Merge another pool's :meth:`state` (float64) into this one, as if its inputs
        had been fed here: Chan's merge for the batch kinds, the count-weighted average
        of the instance moments for the instance kind, and the per-batch sums added."""
        n, mean, m2, var_sum, var_n = state
        if n == 0 or mean is None or m2 is None:
            return
        if self.mean is not None:
            self._check_channels(mean.shape[0])
        if self.kind == "instance_mean_var":
            if self.mean is None or self.m2 is None:
                self.n, self.mean, self.m2 = n, mean, m2
            else:
                total = self.n + n
                self.mean = self.mean + (mean - self.mean) * (n / total)
                self.m2 = self.m2 + (m2 - self.m2) * (n / total)
                self.n = total
            return
        self.merge(n, mean, m2)
        if var_sum is not None:
            self.batch_var_sum = (
                var_sum if self.batch_var_sum is None else self.batch_var_sum + var_sum
            )
            self.batch_var_n += var_n

    def _check_channels(self, channels: int) -> None:
        assert self.mean is not None
        if (channels,) != tuple(self.mean.shape):
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) saw {channels} channels after "
                f"{self.mean.shape[0]}; channels must be on dim 1 and fixed."
            )

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean, value for ``running_var``) in float64."""
        if self.mean is None or self.m2 is None:
            raise ValueError(f"recalibrate: {self.path} ({self.name}) saw no input.")
        if self.kind == "instance_mean_var":
            return self.mean, self.m2
        if self.kind == "batch_second_moment":
            return self.mean, self.m2 / self.n + self.mean.square()
        if self.variance == "per_batch":
            if self.batch_var_sum is None:
                raise ValueError(
                    f"recalibrate: {self.path} ({self.name}) saw only one value per channel "
                    "in every batch; variance='per_batch' needs batches with at least 2. Feed "
                    "larger batches or use variance='population'."
                )
            return self.mean, self.batch_var_sum / self.batch_var_n
        if self.unbiased:
            if self.n < 2:
                raise ValueError(
                    f"recalibrate: {self.path} ({self.name}) saw only {self.n} value per "
                    "channel in all batches; an unbiased variance needs at least 2. Feed more "
                    "data."
                )
            return self.mean, self.m2 / (self.n - 1)
        return self.mean, self.m2 / self.n


def _batched_rank(module: nn.Module) -> int | None:
    spatial = getattr(type(module), "_spatial", None)
    if isinstance(spatial, int):
        return spatial + 2
    get = getattr(module, "_get_no_batch_dim", None)
    if callable(get):
        return int(get()) + 1
    return None
