"""Root-mean-square normalization (Zhang & Sennrich, 2019): over the last dims, and over C."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._core.checks import (
    NormShapeError,
    check_eps,
    check_floating,
    check_normalized_shape,
    check_param,
)
from .._core.dispatch import Op, choose_path
from .._core.export import rsqrt
from .._core.stats import acc_dtype, mean_square

__all__ = ["rms_norm", "rms_norm2d"]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""RMS normalization over the last ``len(normalized_shape)`` dims.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}\,\gamma

    Signature and semantics of :func:`torch.nn.functional.rms_norm`, plus
    ``backend``: no mean is subtracted, so there is no cancellation to guard
    against; the mean square accumulates in fp32 for half inputs (fp64 for fp64).
    ``eps=None`` is the machine epsilon of that accumulation dtype, as in torch.
    A shape that does not fit raises :class:`normlab.NormShapeError`.
    """
    layer = "RMSNorm"
    check_floating(layer, input)
    if eps is not None:
        check_eps(layer, eps, zero_ok=True)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    check_normalized_shape(layer, input, shape)
    k = len(shape)
    choose_path(Op.RMS_NORM, input, backend, None)  # torch ops only
    check_param(layer, "weight", weight, shape)
    return _scale(input, range(input.dim() - k, input.dim()), weight, eps)


def rms_norm2d(
    input: Tensor,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""RMS normalization over the channel dim of an (N, C, \*spatial) tensor, per position.

    .. math:: y_{n,:,s} = \frac{x_{n,:,s}}{\sqrt{\mathrm{mean}_c\, x_{n,c,s}^2 + \epsilon}}\,\gamma

    The channel-wise counterpart of :func:`rms_norm` for convolutional networks, as
    :func:`~normlab.functional.layer_norm2d` is of ``layer_norm``: ``weight`` has
    shape (C,); the output keeps the input's memory format; ``eps`` as in
    :func:`rms_norm`. (N, C) input is normalized over C.
    """
    layer = "RMSNorm2d"
    check_floating(layer, input)
    if eps is not None:
        check_eps(layer, eps, zero_ok=True)
    if input.dim() < 2:
        raise NormShapeError(
            f"{layer}: expected an (N, C, *spatial) input, got shape {tuple(input.shape)}."
        )
    choose_path(Op.RMS_NORM2D, input, backend, None)  # torch ops only
    c = input.shape[1]
    check_param(layer, "weight", weight, (c,))
    w = None if weight is None else weight.reshape(c, *([1] * (input.dim() - 2)))
    return _scale(input, (1,), w, eps)


def _scale(x: Tensor, dims: Sequence[int], weight: Tensor | None, eps: float | None) -> Tensor:
    """``x / sqrt(mean(x², dims) + eps) · weight`` in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    e = torch.finfo(acc).eps if eps is None else eps
    y = x.to(acc) * rsqrt(mean_square(x, dims) + e)  # ONNX-safe under export
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)
