"""Convolutions with normalized weights: CenteredConv2d (MABN) and WSConv2d."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.common_types import _size_2_t

from .. import functional as NF
from .._core.checks import check_eps

__all__ = ["CenteredConv2d", "WSConv2d"]


class CenteredConv2d(nn.Conv2d):
    r"""``nn.Conv2d`` whose output filters are centered: weight centralization.

    .. math:: \hat w_o = w_o - \mathrm{E}_{i, k_h, k_w}[w_o], \qquad y = \hat w \star x + b

    From Yan et al. (ICLR 2020), where it takes the mean out of the activations
    so that :class:`MovingAverageBatchNorm2d` need not subtract one: if each
    input channel of ``x`` has roughly the same mean, a zero-sum filter maps
    that mean to ~0. Use ``bias=False`` in front of a norm (the norm's β is the
    bias).

    The arguments, parameters, initialisation (``nn.Conv2d``'s) and state_dict
    are exactly ``nn.Conv2d``'s: any kernel, stride, padding, dilation, groups,
    bias and padding_mode, and a plain ``Conv2d`` checkpoint loads as is. The
    stored ``weight`` is the raw one; centering happens in ``forward`` (and is
    differentiated through).

    Shape:
        As ``nn.Conv2d``: (N, C_in, H, W) → (N, C_out, H_out, W_out).

    Example::

        >>> conv = normlab.nn.CenteredConv2d(3, 16, kernel_size=3, padding=1, bias=False)
        >>> y = conv(torch.randn(2, 3, 32, 32))
    """

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, NF.centered_weight(self.weight), self.bias)


class WSConv2d(nn.Conv2d):
    r"""``nn.Conv2d`` with Weight Standardization (Qiao et al., 2019).

    .. math:: \hat w_o = \frac{w_o - \mathrm{E}[w_o]}{\sqrt{\mathrm{Var}[w_o] + \epsilon}},
              \qquad y = \hat w \star x + b

    Statistics per output filter over its ``C_in/groups · k_h · k_w`` weights,
    biased variance, ``eps`` inside the square root (Qiao et al.'s code divides
    by the unbiased std + eps instead). Same constructor as ``nn.Conv2d`` plus
    keyword ``eps``; same parameters, initialisation and state_dict, so a plain
    ``Conv2d`` checkpoint loads as is.

    Args:
        eps: added to each filter's variance, > 0 (default 1e-5).
        (all others): as ``nn.Conv2d``.

    Shape:
        As ``nn.Conv2d``.

    Example::

        >>> conv = normlab.nn.WSConv2d(3, 16, kernel_size=3, padding=1)
        >>> y = conv(torch.randn(2, 3, 32, 32))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        eps: float = 1e-5,
    ) -> None:
        check_eps(type(self).__name__, eps)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.eps = float(eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, NF.standardized_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"
