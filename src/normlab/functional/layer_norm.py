"""Layer normalization (Ba et al., 2016): over the last dims, and over C of (N, C, ...)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .._core.checks import check_eps, check_floating, check_normalized_shape, check_params
from .._core.dispatch import Op, choose_path
from .._core.stats import acc_dtype, centered, pivot

__all__ = ["layer_norm", "layer_norm2d"]


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Layer normalization over the last ``len(normalized_shape)`` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    Signature of :func:`torch.nn.functional.layer_norm`, plus ``backend``;
    ``weight`` and ``bias`` have shape ``normalized_shape``. eps may be 0, as in
    torch. A ``normalized_shape``, weight or bias that does not fit the input
    raises :class:`normlab.NormShapeError` (a ValueError and a RuntimeError).
    """
    layer = "LayerNorm"
    check_floating(layer, input)
    check_eps(layer, eps, zero_ok=True)
    shape = _shape(normalized_shape)
    check_normalized_shape(layer, input, shape)
    k = len(shape)
    choose_path(Op.LAYER_NORM, input, backend, None)  # torch ops only
    check_params(layer, shape, weight=weight, bias=bias)
    if input.numel() == 0:  # an empty output, connected to weight and bias, as in torch
        return F.layer_norm(input, shape, weight, bias, eps)
    acc = acc_dtype(input.dtype)
    xc = centered(input, pivot(input, range(input.dim() - k, input.dim())))
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(xc, shape, w, b, eps).to(input.dtype)


def layer_norm2d(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""LayerNorm over the channel dim of an (N, C, \*spatial) tensor, per position.

    The ConvNeXt-style "LayerNorm2d". Channels-last input is normalized without
    a copy (the channel dim is already innermost); the output keeps the input's
    memory format.
    """
    layer = "LayerNorm2d"
    check_floating(layer, input)
    check_eps(layer, eps)
    if input.dim() < 3:
        raise ValueError(
            f"{layer}: expected an (N, C, H, W) (or (N, C, *spatial)) input, got shape "
            f"{tuple(input.shape)}; for (N, C) use LayerNorm(C)."
        )
    choose_path(Op.LAYER_NORM2D, input, backend, None)  # torch ops only
    c = input.shape[1]
    check_params(layer, (c,), weight=weight, bias=bias)
    acc = acc_dtype(input.dtype)
    xc = centered(input, pivot(input, (1,)))
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    last = input.dim() - 1  # not -1: the TorchScript ONNX exporter writes it into a perm
    y = F.layer_norm(xc.movedim(1, last), (c,), w, b, eps).movedim(last, 1)
    return y.to(input.dtype)
