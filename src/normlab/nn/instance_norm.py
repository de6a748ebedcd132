"""InstanceNorm1d/2d/3d."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import functional as NF
from .._core.checks import check_channels, check_floating, check_rank
from ._base import NormBase

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(NormBase):
    r"""Instance normalization (Ulyanov et al., 2017): statistics over the spatial
    dims of each (sample, channel).

    .. math:: y_{n,c} = \frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}
              \gamma_c + \beta_c

    torch's defaults and semantics: ``affine=False``, ``track_running_stats=False``.
    With tracking, training updates the running statistics with the batch
    average of the per-instance mean and unbiased variance, and eval uses them;
    ``num_batches_tracked`` stays 0, as in torch, except with ``momentum=None``:
    there it counts the batches of a cumulative average (torch never updates
    the running statistics with ``momentum=None``).
    Unbatched input (C, \*spatial) is accepted, as in torch.

    Args:
        num_features: C.
        eps: added to the variance, >= 0.
        momentum: weight of the new statistic in the running average, or None.
        affine: learn per-channel γ and β.
        track_running_stats: keep running statistics for eval.
        bias: with ``affine``, learn β too; ``bias=False`` leaves ``self.bias``
            None and out of the state_dict, as in torch.
    """

    _spatial: int = 1
    _eps_zero_ok = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_floating(name, input)
        batched = self._spatial + 2
        check_rank(name, input, (batched - 1, batched), self._layout)
        unbatched = input.dim() == batched - 1
        x = input.unsqueeze(0) if unbatched else input
        check_channels(name, x, self.num_features)
        if self.momentum is None:
            factor = self._momentum_factor()  # counts the batches of the cumulative average
        else:
            factor = self.momentum  # num_batches_tracked untouched, as in torch
        use_input_stats = self.training or not self.track_running_stats
        y = NF.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            factor,
            self.eps,
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _spatial = 1
    _layout = "(N, C, L) or (C, L)"


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _spatial = 2
    _layout = "(N, C, H, W) or (C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _spatial = 3
    _layout = "(N, C, D, H, W) or (C, D, H, W)"
