"""Batch normalization (Ioffe & Szegedy, 2015), torch-exact semantics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.activation import activation, check_act
from .._core.checks import (
    check_batch_count,
    check_eps,
    check_floating,
    check_min_dims,
    check_norm_input,
    check_params,
    stored_variance,
)
from .._core.collectives import check_global_count, group_moments, resolve_process_group
from .._core.dispatch import Op, Path, choose_path
from .._core.normalize import affine_normalize
from .._core.running import update_running_stats
from .._core.stats import acc_dtype, centered, pivot, reduced_count, rstd

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["batch_norm", "frozen_batch_norm"]


def check_batch_norm_input(
    layer: str, input: Tensor, eps: float, training: bool, process_group: object
) -> ProcessGroup | None:
    """The input checks of a batch-statistics functional (BatchNorm, CBN); the process
    group to pool over in training (None in eval)."""
    # torch's rule: eps=0 is fine with fixed statistics, not with batch statistics.
    check_norm_input(layer, input, eps, 2, zero_ok=not training)
    return resolve_process_group(process_group) if training else None


def check_batch_norm_params(
    layer: str,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
) -> Tensor | None:
    """Check the per-channel tensors; in eval (which needs both running statistics) the
    stored variance to normalize with, in training ``running_var`` as given."""
    check_params(
        layer,
        (input.shape[1],),
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    if training:
        return running_var
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{layer}: training=False needs running_mean and running_var; pass "
            "training=True to normalize with batch statistics."
        )
    return stored_variance(layer, running_var)


def _cast(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    process_group: ProcessGroup | str | None = None,
) -> Tensor:
    r"""Batch normalization over (N, \*spatial) per channel.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    Same contract as :func:`torch.nn.functional.batch_norm`: with
    ``training=True`` it normalizes with the batch mean and *biased* batch
    variance and, where ``running_mean`` / ``running_var`` are given, updates them
    in place with the *unbiased* variance and ``momentum`` (the weight of the new
    value). With ``training=False`` it uses the running statistics.

    Unlike torch's CPU kernel it stays accurate on off-center data: statistics
    and normalization work on ``x − pivot`` (one sample per channel), see
    :mod:`normlab._core.stats`.

    Args:
        input: (N, C) or (N, C, \*spatial), floating point.
        running_mean, running_var: (C,) buffers or None.
        weight, bias: (C,) or None.
        training: use batch statistics (and update the running ones).
        momentum: weight of the new batch statistic in the running average.
        eps: added to the variance inside the square root: > 0 in training,
            >= 0 with ``training=False`` (torch's rule).
        backend: "auto" | "torch" | "triton". With ``training=False`` the Triton
            kernel of :mod:`normlab.kernels` (one pass) is used for CUDA input under
            "auto"; training mode is always torch ("triton" raises).
        process_group: with ``training=True``, compute the batch statistics over
            every process of this group (None: this process only; ``"world"``:
            the default group); see :mod:`normlab.distributed`.

    An empty input in training gives an empty output and leaves the running
    statistics untouched. A weight, bias or running buffer of the wrong size
    raises :class:`normlab.NormShapeError` (a ValueError and a RuntimeError).

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    layer = "batch_norm"
    group = check_batch_norm_input(layer, input, eps, training, process_group)
    # Only eval mode (fixed statistics: one elementwise pass) has a Triton kernel.
    path = choose_path(Op.BATCH_NORM if training else Op.BATCH_NORM_EVAL, input, backend, group)
    c = input.shape[1]
    running_var = check_batch_norm_params(
        layer, input, weight, bias, running_mean, running_var, training
    )
    if not training:
        if path is Path.TRITON:
            from ..kernels import fused_frozen_batch_norm

            return fused_frozen_batch_norm(input, weight, bias, running_mean, running_var, eps)
        return affine_normalize(input, running_mean, running_var, weight, bias, eps)

    dims = (0, *range(2, input.dim()))
    if group is not None:
        return _synced_batch_norm(
            input, running_mean, running_var, weight, bias, momentum, eps, group
        )
    if input.numel() == 0:
        # An empty batch (e.g. one rank's share): an empty output, zero gradients for
        # weight and bias, running statistics untouched, as in torch.
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    check_batch_count(layer, input, reduced_count(input, dims))
    acc = acc_dtype(input.dtype)
    shift = pivot(input, dims).to(acc)
    xc = centered(input, shift)
    w, b = _cast(weight, acc), _cast(bias, acc)
    if running_mean is None and running_var is None:
        y = F.batch_norm(xc, None, None, w, b, True, 0.0, eps)
        return y.to(input.dtype)
    # torch's native kernel reduces the centered data in the same pass that
    # normalizes it; with momentum=1 it writes the batch mean and the unbiased
    # batch variance of ``xc`` into the scratch buffers, which saves a second
    # reduction over the input. The pivot is then added back to the mean.
    batch_mean_c = torch.zeros(c, dtype=acc, device=input.device)
    batch_var = torch.ones(c, dtype=acc, device=input.device)
    y = F.batch_norm(xc, batch_mean_c, batch_var, w, b, True, 1.0, eps)
    batch_mean = batch_mean_c + shift.reshape(-1)
    update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum)
    return y.to(input.dtype)


def _synced_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group: ProcessGroup,
) -> Tensor:
    """Training-mode batch_norm with statistics over every rank of ``group``."""
    dims = (0, *range(2, input.dim()))
    acc = acc_dtype(input.dtype)
    shape = [1] * input.dim()
    shape[1] = input.shape[1]
    shift = pivot(input, dims).to(acc)
    xc = centered(input, shift)
    g, count = group_moments(xc, dims, shift, group)
    check_global_count("batch_norm", input.shape, count, g.count)
    scale = rstd(g.var, eps)
    if weight is not None:
        scale = scale * weight.to(acc).reshape(shape)
    y = (xc - g.mean) * scale
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    unbiased = g.var.detach() * (g.count / (g.count - 1)).to(acc)
    update_running_stats(running_mean, running_var, g.mean_abs, unbiased, momentum)
    return y.to(input.dtype)


def frozen_batch_norm(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
    *,
    act: str | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""BatchNorm with fixed statistics and fixed affine:
    :math:`y = \mathrm{act}((x - \mu)\,\gamma/\sqrt{\sigma^2 + \epsilon} + \beta)`.

    The gradient flows to ``input`` only when weight and bias are buffers
    (as in :class:`normlab.nn.FrozenBatchNorm2d`).

    Args:
        act: None, ``"silu"`` or ``"relu"``, applied after the affine map (fused into
            the kernel on the Triton backend).
        backend: "auto" (the one-pass Triton kernel of :mod:`normlab.kernels` for CUDA
            input when triton imports), "torch" or "triton".
    """
    layer = "frozen_batch_norm"
    check_floating(layer, input)
    check_eps(layer, eps, zero_ok=True)
    check_act(layer, act)
    check_min_dims(layer, input, 2)
    path = choose_path(Op.FROZEN_BATCH_NORM, input, backend, None)
    c = input.shape[1]
    check_params(
        layer, (c,), weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    running_var = stored_variance(layer, running_var)
    if path is Path.TRITON:
        from ..kernels import fused_frozen_batch_norm

        return fused_frozen_batch_norm(input, weight, bias, running_mean, running_var, eps, act=act)
    y = affine_normalize(input, running_mean, running_var, weight, bias, eps)
    return y if act is None else activation(y, act)
