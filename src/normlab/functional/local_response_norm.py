"""Local response normalization (Krizhevsky et al., 2012), torch's convention."""

from __future__ import annotations

from torch import Tensor

from .._core.checks import check_floating, check_min_dims
from .._core.dispatch import Op, choose_path
from .._core.stats import acc_dtype, window_mean

__all__ = ["local_response_norm"]


def local_response_norm(
    input: Tensor,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Normalize each channel by its neighbours' energy.

    .. math:: y_c = x_c \Big/ \Big(k + \frac{\alpha}{n}
              \sum_{c'=c-\lfloor n/2\rfloor}^{c+\lfloor (n-1)/2\rfloor} x_{c'}^2\Big)^{\beta}

    Channels outside [0, C) count as zeros; the divisor is always ``n = size``,
    as in :func:`torch.nn.functional.local_response_norm`. Sums in fp32 for
    half inputs.
    """
    layer = "LocalResponseNorm"
    check_floating(layer, input)
    check_min_dims(layer, input, 3, "an (N, C, *spatial) input with at least 3 dims")
    if size < 1:
        raise ValueError(f"{layer}: size must be >= 1, got {size}.")
    if k <= 0 and beta != 0:
        # k + alpha*mean(x^2) can reach 0 and the division gives inf/NaN.
        raise ValueError(f"{layer}: k must be > 0 (got {k}) so the divisor never reaches 0.")
    choose_path(Op.LOCAL_RESPONSE_NORM, input, backend, None)  # torch ops only
    acc = acc_dtype(input.dtype)
    xa = input.to(acc)
    div = window_mean(xa.square(), 1, size).mul(alpha).add(k).pow(beta)
    return (xa / div).to(input.dtype)
