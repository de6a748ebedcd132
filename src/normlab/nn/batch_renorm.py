"""BatchRenorm1d/2d/3d."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import functional as NF
from .._core.checks import check_batch_count
from .._core.collectives import sync_active
from .._core.stats import reduced_count
from ._base import NormBase

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm(NormBase):
    r"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275).

    Training, per channel over (N, \*spatial):

    .. math::
        r = \operatorname{clip}_{[1/r_{max},\,r_{max}]}\!\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \operatorname{clip}_{[-d_{max},\,d_{max}]}\!\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    with ``σ_B = sqrt(var_B + eps)`` (biased batch variance), ``σ = sqrt(running_var
    + eps)``, ``μ = running_mean``; ``r`` and ``d`` get no gradient. The output
    then depends on the batch only through a correction that is clipped, which
    keeps training and inference closer for small or non-i.i.d. batches. Eval
    normalizes with the running statistics, exactly like BatchNorm.

    Running statistics follow torch's BatchNorm convention (the paper averages σ
    instead of σ²): ``running = (1 − momentum)·running + momentum·batch`` with the
    unbiased batch variance; ``momentum=None`` is the cumulative average. They are
    always tracked (r and d need them).

    The clipping limits follow the paper's schedule, driven by
    ``num_batches_tracked`` on its device (no host sync): plain BatchNorm
    (``r_max = 1, d_max = 0``) for the first ``warmup_iters`` training batches,
    then linear relaxation to ``r_max`` over ``r_max_rampup_iters`` and to
    ``d_max`` over ``d_max_rampup_iters`` batches (see
    :func:`normlab.functional.batch_renorm_limits`). The defaults are the paper's:
    BN for 5k steps, r_max = 3 reached at step 40k, d_max = 5 at step 25k. Use
    ``warmup_iters=0, r_max_rampup_iters=0, d_max_rampup_iters=0`` for fixed limits.

    Args:
        num_features: C.
        eps: added to both variances, > 0.
        momentum: weight of the new batch statistic, or None.
        affine: learn γ (``weight``) and β (``bias``).
        r_max: final r limit, >= 1.
        d_max: final d limit, >= 0.
        warmup_iters: training batches of plain BatchNorm.
        r_max_rampup_iters, d_max_rampup_iters: length of each linear ramp.
        process_group: in training, compute the batch statistics over every
            process of this group: None (default) for no sync, ``"world"`` for the
            default group, or a ``torch.distributed.ProcessGroup``. A no-op on a
            single process; see :mod:`normlab.distributed`.

    Shape: 1d (N, C) or (N, C, L); 2d (N, C, H, W); 3d (N, C, D, H, W).

    Example::

        >>> brn = normlab.nn.BatchRenorm2d(16, warmup_iters=1000, r_max_rampup_iters=5000,
        ...                                d_max_rampup_iters=5000)
        >>> y = brn(torch.randn(4, 16, 8, 8))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_iters: int = 5000,
        r_max_rampup_iters: int = 35000,
        d_max_rampup_iters: int = 20000,
        device: Any = None,
        dtype: Any = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, process_group)
        name = type(self).__name__
        if not r_max >= 1.0:
            raise ValueError(
                f"{name}: r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}."
            )
        if not d_max >= 0.0:
            raise ValueError(
                f"{name}: d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}."
            )
        for arg, value in (
            ("warmup_iters", warmup_iters),
            ("r_max_rampup_iters", r_max_rampup_iters),
            ("d_max_rampup_iters", d_max_rampup_iters),
        ):
            if int(value) < 0:
                raise ValueError(f"{name}: {arg} must be >= 0, got {value}.")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_iters = int(warmup_iters)
        self.r_max_rampup_iters = int(r_max_rampup_iters)
        self.d_max_rampup_iters = int(d_max_rampup_iters)

    def renorm_limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` for the next training batch, as 0-d tensors.

        The step is ``num_batches_tracked`` (batches already seen), so the first
        ``warmup_iters`` training batches get ``(1, 0)``.
        """
        return NF.batch_renorm_limits(
            self.num_batches_tracked,  # type: ignore[arg-type]
            self.r_max,
            self.d_max,
            self.warmup_iters,
            self.r_max_rampup_iters,
            self.d_max_rampup_iters,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        limits: tuple[Tensor, ...] = ()  # eval normalizes with the running statistics
        factor = 0.0
        if self.training:
            # Refuse a one-value batch before num_batches_tracked moves.
            dims = (0, *range(2, input.dim()))
            if not sync_active(self.process_group):  # synced: the global count is checked
                check_batch_count(type(self).__name__, input, reduced_count(input, dims))
            limits = self.renorm_limits()
            factor = self._momentum_factor()
        return NF.batch_renorm(
            input,
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.weight,
            self.bias,
            self.training,
            factor,
            self.eps,
            *limits,
            process_group=self._sync_group(),
        )

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, r_max={r_max}, "
            "d_max={d_max}, warmup_iters={warmup_iters}, "
            "r_max_rampup_iters={r_max_rampup_iters}, "
            "d_max_rampup_iters={d_max_rampup_iters}".format(**self.__dict__)
        )


class BatchRenorm1d(_BatchRenorm, dims=1):
    pass


class BatchRenorm2d(_BatchRenorm, dims=2):
    pass


class BatchRenorm3d(_BatchRenorm, dims=3):
    pass
