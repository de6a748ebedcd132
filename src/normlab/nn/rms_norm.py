"""RMSNorm (over the last dims, torch's twin) and RMSNorm2d (over C of N, C, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as NF
from .._core.checks import check_channels, check_count, check_eps, check_shape, check_tensor

__all__ = ["RMSNorm", "RMSNorm2d"]


class RMSNorm(nn.Module):
    r"""RMS normalization (Zhang & Sennrich, 2019) over the last ``len(normalized_shape)`` dims.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}\,\gamma

    Same constructor, state_dict (``weight`` only) and repr as ``torch.nn.RMSNorm``.
    No batch statistics: each sample is normalized on its own, in train and eval alike.

    Args:
        normalized_shape: the trailing shape to normalize over.
        eps: added to the mean square, >= 0; ``None``: the machine epsilon of the
            accumulation dtype (fp32 for half inputs), as in torch.
        elementwise_affine: learn γ (``weight``) of that shape, initialized to ones.

    Example::

        >>> rms = normlab.nn.RMSNorm(512)
        >>> y = rms(torch.randn(2, 16, 512))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if eps is not None:
            check_eps("RMSNorm", eps, zero_ok=True)
        self.normalized_shape = check_shape("RMSNorm", "normalized_shape", normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.empty(self.normalized_shape, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return NF.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class RMSNorm2d(nn.Module):
    r"""RMS normalization over the channels of an (N, C, H, W) tensor, at each position.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w}}{\sqrt{\mathrm{mean}_c\, x_{n,c,h,w}^2 +
              \epsilon}}\,\gamma

    The convolutional form of :class:`RMSNorm`, as :class:`LayerNorm2d` is of
    LayerNorm: per-channel γ (``weight``), no bias, no mean subtracted. Also accepts
    (N, C), (N, C, L) and (N, C, D, H, W); the output keeps the input's memory format.

    Args:
        num_channels: C.
        eps: added to the mean square, >= 0; ``None`` as in :class:`RMSNorm`.
        affine: learn per-channel γ (``weight``), initialized to ones.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float | None = None,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if eps is not None:
            check_eps("RMSNorm2d", eps, zero_ok=True)
        self.num_channels = check_count("RMSNorm2d", "num_channels", num_channels)
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor("RMSNorm2d", input)
        if input.dim() >= 2:
            check_channels("RMSNorm2d", input, self.num_channels)
        return NF.rms_norm2d(input, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
