r"""Weight centralization (MABN, Yan et al. 2020) and weight standardization
(Qiao et al. 2019): per-output-filter transforms of a convolution weight.

For a weight of shape (C_out, C_in/groups, \*kernel), each output filter ``o``
is normalized over its ``C_in/groups · prod(kernel)`` entries:

.. math::

    \text{centered:}\quad \hat w_o = w_o - \mathrm{E}[w_o]
    \qquad
    \text{standardized:}\quad
    \hat w_o = \frac{w_o - \mathrm{E}[w_o]}{\sqrt{\mathrm{Var}[w_o] + \epsilon}}

(biased variance, ``ε`` inside the square root, like every norm in normlab;
Qiao et al.'s code divides by the *unbiased* std plus ``ε``, a slightly
different scale). Both are differentiable; gradients flow through the
statistics. Statistics in fp32 for half weights, the result in the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.checks import check_eps, check_floating
from .._core.stats import Moments, acc_dtype, centered, centered_moments, pivot, rstd

__all__ = ["centered_weight", "standardized_weight"]


def _filter_dims(layer: str, weight: Tensor) -> tuple[int, ...]:
    check_floating(layer, weight)
    if weight.dim() < 2:
        raise ValueError(
            f"{layer}: expected a weight of shape (C_out, C_in/groups, *kernel) with at "
            f"least 2 dims, got shape {tuple(weight.shape)}."
        )
    return tuple(range(1, weight.dim()))


def _shifted_moments(weight: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Moments]:
    """``w − pivot`` and its moments about 0 shift.

    The mean subtracted from ``w − pivot`` is the mean of the shifted data
    itself, never ``(pivot + mean_c) − pivot``: on filters such as 100 ± 0.01
    that round trip would round ``mean_c`` to the ulp of 100.
    """
    shift = pivot(weight, dims).to(acc_dtype(weight.dtype))
    wc = centered(weight, shift)
    return wc, centered_moments(wc, dims, torch.zeros_like(shift))


def centered_weight(weight: Tensor) -> Tensor:
    r"""Each output filter minus its mean: :math:`\hat w_o = w_o - \mathrm{E}[w_o]`.

    Args:
        weight: (C_out, C_in/groups, \*kernel), floating point.

    Returns:
        Tensor of the weight's shape and dtype whose filters sum to 0.

    Example::

        >>> w = torch.randn(8, 3, 3, 3)
        >>> centered_weight(w).sum(dim=(1, 2, 3)).abs().max() < 1e-5
        tensor(True)
    """
    dims = _filter_dims("centered_weight", weight)
    wc, st = _shifted_moments(weight, dims)
    return (wc - st.mean).to(weight.dtype)


def standardized_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Each output filter standardized:
    :math:`\hat w_o = (w_o - \mathrm{E}[w_o]) / \sqrt{\mathrm{Var}[w_o] + \epsilon}`.

    Args:
        weight: (C_out, C_in/groups, \*kernel), floating point.
        eps: added to the biased variance inside the square root, > 0.

    Returns:
        Tensor of the weight's shape and dtype; each filter has mean 0 and
        variance ``Var/(Var + eps)`` (≈ 1).
    """
    check_eps("standardized_weight", eps)
    dims = _filter_dims("standardized_weight", weight)
    wc, st = _shifted_moments(weight, dims)
    return ((wc - st.mean) * rstd(st.var, eps)).to(weight.dtype)
