"""LayerNorm (over the last dims) and LayerNorm2d (over C of N, C, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .. import functional as NF
from .._core.checks import check_channels, check_count, check_eps, check_shape, check_tensor
from ._base import add_affine, reset_affine

__all__ = ["LayerNorm", "LayerNorm2d"]


class LayerNorm(nn.Module):
    r"""Layer normalization (Ba et al., 2016) over the last ``len(normalized_shape)`` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    Same constructor and state_dict as ``torch.nn.LayerNorm``.

    Args:
        normalized_shape: the trailing shape to normalize over.
        eps: added to the variance, >= 0.
        elementwise_affine: learn γ (``weight``) and β (``bias``) of that shape.
        bias: learn β (only with ``elementwise_affine``).

    Example::

        >>> ln = normlab.nn.LayerNorm([64, 7, 7])
        >>> y = ln(torch.randn(2, 64, 7, 7))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_eps("LayerNorm", eps, zero_ok=True)
        self.normalized_shape = check_shape("LayerNorm", "normalized_shape", normalized_shape)
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        add_affine(self, self.normalized_shape, elementwise_affine, factory, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        return NF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class LayerNorm2d(nn.Module):
    r"""LayerNorm over the channels of an (N, C, H, W) tensor, at each position.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mu_{n,h,w}}{\sqrt{\sigma^2_{n,h,w} +
              \epsilon}}\,\gamma + \beta

    The ConvNeXt-style norm. Channels-last input is normalized in place of its
    layout (no copy); the output keeps the input's memory format. Also accepts
    (N, C, L) and (N, C, D, H, W).

    Args:
        num_channels: C.
        eps: added to the variance, > 0.
        affine: learn per-channel γ (``weight``) and β (``bias``).
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_eps("LayerNorm2d", eps)
        self.num_channels = check_count("LayerNorm2d", "num_channels", num_channels)
        self.eps = float(eps)
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        add_affine(self, self.num_channels, affine, factory)

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor("LayerNorm2d", input)
        if input.dim() >= 2:
            check_channels("LayerNorm2d", input, self.num_channels)
        return NF.layer_norm2d(input, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
