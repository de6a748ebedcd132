"""The second half of every norm: normalize with given statistics, then affine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .export import onnx_exporting
from .stats import acc_dtype, rstd


def channel_shape(x: Tensor, channel_dim: int = 1) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``x``."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    return shape


def affine_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x − mean)·γ/sqrt(var + eps) + β`` with per-channel (dim 1) statistics.

    Written as ``(x − mean)·scale + β`` and not ``x·scale + (β − mean·scale)``:
    the folded form cancels catastrophically on off-center data (mean 1e4, std
    1e-2 loses every digit in fp32), the subtraction of a nearby mean does not.
    Computed in the accumulation dtype; returned in ``x``'s dtype.

    Under ONNX export it is :func:`torch.nn.functional.batch_norm` with these
    statistics instead, which exports as one ``BatchNormalization`` node (see
    :mod:`normlab._core.export`).
    """
    acc = acc_dtype(x.dtype)
    if onnx_exporting():
        return _exported_batch_norm(x, mean, var, weight, bias, eps, acc)
    shape = channel_shape(x)
    scale = rstd(var.to(acc), eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    xc = x.to(acc) - mean.to(acc).reshape(shape)
    if bias is not None:
        y = bias.to(acc).reshape(shape).addcmul(xc, scale.reshape(shape))
    else:
        y = xc * scale.reshape(shape)
    return y.to(x.dtype)


def _exported_batch_norm(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    acc: torch.dtype,
) -> Tensor:
    """Eval-mode ``F.batch_norm`` in ``acc``; no ``Cast`` nodes where dtypes already agree."""

    def cast(t: Tensor | None) -> Tensor | None:
        return t if t is None or t.dtype == acc else t.to(acc)

    y = F.batch_norm(cast(x), cast(mean), cast(var), cast(weight), cast(bias), False, 0.0, eps)
    return y if y.dtype == x.dtype else y.to(x.dtype)
