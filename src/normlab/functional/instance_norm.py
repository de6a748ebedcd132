"""Instance normalization (Ulyanov et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.checks import (
    check_norm_input,
    check_params,
    stored_variance,
)
from .._core.dispatch import Op, choose_path
from .._core.normalize import affine_normalize
from .._core.running import update_running_stats
from .._core.stats import acc_dtype, centered, centered_moments, pivot, reduced_count

__all__ = ["instance_norm"]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Instance normalization: statistics over \*spatial per (sample, channel).

    Signature and semantics of :func:`torch.nn.functional.instance_norm`: with
    ``use_input_stats`` it normalizes with per-instance statistics and, where
    running buffers are given, updates them in place with the batch average of
    the per-instance mean and *unbiased* variance; otherwise it uses the running
    statistics. eps may be 0, as in torch. An empty input gives an empty output
    and leaves the running statistics untouched (torch writes NaN into them when
    the batch is empty).
    """
    layer = "InstanceNorm"
    check_norm_input(layer, input, eps, 3, zero_ok=True)
    choose_path(Op.INSTANCE_NORM, input, backend, None)  # torch ops only
    c = input.shape[1]
    check_params(
        layer, (c,), weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(f"{layer}: use_input_stats=False needs running_mean and running_var.")
        var = stored_variance(layer, running_var)
        return affine_normalize(input, running_mean, var, weight, bias, eps)

    if input.numel() == 0:
        return F.instance_norm(input, None, None, weight, bias, True, 0.0, eps)
    dims = tuple(range(2, input.dim()))
    count = reduced_count(input, dims)
    if count == 1:
        raise ValueError(
            f"{layer}: needs more than 1 spatial element per channel, got input shape "
            f"{tuple(input.shape)} ({count} value per instance: its variance is 0 and its "
            "output would be all zeros). Use BatchNorm, GroupNorm over several channels, "
            "or LayerNorm for inputs without spatial extent."
        )
    acc = acc_dtype(input.dtype)
    shift = pivot(input, dims).to(acc)
    xc = centered(input, shift)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.instance_norm(xc, None, None, w, b, True, 0.0, eps)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            m = centered_moments(xc.detach(), dims, shift, correction=1)
        update_running_stats(running_mean, running_var, m.mean.mean(0), m.var.mean(0), momentum)
    return y.to(input.dtype)
