"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan, 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.checks import check_eps, check_floating, check_param, check_params, host_checks_allowed
from .._core.dispatch import Op, Path, choose_path
from .._core.normalize import channel_shape
from .._core.stats import acc_dtype
from ._frn_autograd import frn_composite, frn_fused

__all__ = ["filter_response_norm", "frn_tlu", "tlu"]


def _check_frn_input(layer: str, x: Tensor) -> None:
    check_floating(layer, x)
    if x.dim() < 3:
        raise ValueError(
            f"{layer}: expected an (N, C, *spatial) input with at least one spatial dim, got "
            f"shape {tuple(x.shape)}. FRN normalizes each (sample, channel) over its spatial "
            "positions; for (N, C) features use x.unsqueeze(-1) (spatial size 1, which makes "
            "FRN a smooth sign function) or LayerNorm."
        )


def _abs_eps(layer: str, eps: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """The effective ``|eps|``: a positive float, or a one-element tensor (keeps its grad)."""
    if not isinstance(eps, Tensor):
        check_eps(layer, float(eps))
        return float(eps)
    if eps.numel() != 1:
        raise ValueError(
            f"{layer}: eps must be a float or a one-element tensor, got a tensor of shape "
            f"{tuple(eps.shape)}."
        )
    # A CPU tensor is checked for free; a device tensor is not (that would be a host
    # sync every step), nor is one under torch.compile or torch.func (see
    # host_checks_allowed). The modules guarantee a positive eps by construction.
    if host_checks_allowed(eps):
        value = abs(float(eps.detach().reshape(())))
        if not value > 0:
            raise ValueError(
                f"{layer}: eps must be nonzero (|eps| is added to ν²), got {eps.detach()}. "
                "With eps = 0 an all-zero channel gives 0/0 = NaN; use e.g. eps=1e-6."
            )
        if not eps.requires_grad and not torch.jit.is_tracing():
            return value  # a fixed ε (the modules' buffer): a plain number, no tensor ops
    return eps.abs().reshape(()).to(dtype)


def _frn(
    op: Op,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    eps: float | Tensor,
    backend: str,
) -> Tensor:
    layer = op.value
    _check_frn_input(layer, input)
    eps_t = eps if isinstance(eps, Tensor) else None
    path = choose_path(op, input, backend, None, weight, bias, tau, eps_t)
    c = input.shape[1]
    check_params(layer, (c,), weight=weight, bias=bias, tau=tau)
    e = _abs_eps(layer, eps, acc_dtype(input.dtype))
    if path is Path.TRITON:
        from ..kernels import fused_filter_response_norm

        return fused_filter_response_norm(input, weight, bias, e, tau=tau)
    if path is Path.FUSED:  # an autograd.Function that saves only the input (_frn_autograd)
        return frn_fused(input, weight, bias, tau, e)
    return frn_composite(input, weight, bias, tau, e)


def _threshold(x: Tensor, tau: Tensor) -> Tensor:
    # where(), not maximum(): maximum splits the gradient half/half at ties, the
    # TLU's subgradient is dy to x where x > τ and dy to τ elsewhere.
    return torch.where(x > tau, x, tau)


def filter_response_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | Tensor = 1e-6,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Filter Response Normalization: divide by the RMS over the spatial dims.

    .. math:: \nu^2_{n,c} = \frac{1}{|S|}\sum_{s \in S} x_{n,c,s}^2, \qquad
              y = \gamma_c \frac{x}{\sqrt{\nu^2_{n,c} + |\epsilon|}} + \beta_c

    No mean is subtracted (the paper's point: FRN is followed by a TLU that learns
    the threshold instead). Independent of the batch size. ``ν²`` is accumulated in
    fp32 for half inputs. With spatial size 1 (e.g. H·W = 1) this is legal and
    reduces to :math:`\gamma x/\sqrt{x^2 + |\epsilon|} + \beta`, a smooth sign.

    In eager CPU training an autograd.Function with a hand-derived backward keeps only
    ``input`` (plus per-(sample, channel) vectors) for backward; under
    ``torch.compile``, ``torch.func`` and forward-mode AD the same math runs as
    plain differentiable ops (see ``normlab.functional._frn_autograd``).

    Args:
        input: (N, C, \*spatial) with at least one spatial dim, any memory format.
        weight, bias: per-channel γ, β of shape (C,), or None.
        eps: a float > 0, or a one-element tensor (a learnable ε, gradient flows);
            ``|eps|`` is used.
        backend: "auto" | "torch" | "triton".

    Returns:
        Tensor of the input's shape and dtype.

    Example::

        >>> y = normlab.functional.filter_response_norm(torch.randn(2, 8, 5, 5))
    """
    return _frn(Op.FILTER_RESPONSE_NORM, input, weight, bias, None, eps, backend)


def frn_tlu(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor,
    eps: float | Tensor = 1e-6,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Filter Response Normalization followed by a TLU, in one pass:
    :math:`y = \max(\gamma x/\sqrt{\nu^2 + |\epsilon|} + \beta,\ \tau)`.

    Same as ``tlu(filter_response_norm(input, weight, bias, eps), tau)`` but the
    intermediate stays in the accumulation dtype (one rounding for half inputs).
    The gradient goes to the FRN output where it is > τ and to ``tau`` elsewhere.

    Args:
        input: (N, C, \*spatial), at least one spatial dim.
        weight, bias: (C,) or None.
        tau: per-channel threshold τ, (C,).
        eps: a float > 0 or a one-element tensor; ``|eps|`` is used.
    """
    if not isinstance(tau, Tensor):
        raise TypeError(f"frn_tlu: tau must be a (C,) tensor, got {type(tau).__name__}.")
    return _frn(Op.FRN_TLU, input, weight, bias, tau, eps, backend)


def tlu(input: Tensor, tau: Tensor, *, backend: str = "auto") -> Tensor:
    r"""Thresholded Linear Unit: :math:`y = \max(x, \tau_c)` per channel (dim 1).

    A ReLU with a learned per-channel threshold. The gradient goes to ``input``
    only where ``x > τ`` and to ``tau`` where ``x ≤ τ`` (ties go to τ).

    Args:
        input: (N, C, \*) floating point.
        tau: (C,).
    """
    layer = "tlu"
    check_floating(layer, input)
    if input.dim() < 2:
        raise ValueError(
            f"{layer}: expected an (N, C, *) input, got shape {tuple(input.shape)}; tau is "
            "per channel (dim 1)."
        )
    choose_path(Op.TLU, input, backend, None)  # torch ops only
    check_param(layer, "tau", tau, (input.shape[1],))
    return _threshold(input, tau.to(input.dtype).reshape(channel_shape(input)))
