"""EvoNorm-B0 and EvoNorm-S0: their autograd.Functions, launchers and plain composites.

As for Filter Response Norm (see :mod:`normlab.functional._frn_autograd`; the
shared machinery is :mod:`normlab._core.fused`): the Functions save **only x** plus
per-(sample, channel) vectors, recompute the rest in backward with a
hand-derived gradient, and write every full-tensor step into a buffer they own.
The fused passes, with the statistics and the gradient formulas, are in
:mod:`normlab.functional._evonorm_fused`. The plain differentiable composites
(:func:`b0_normalize`, :func:`s0_composite`) run under
``torch.compile``/``torch.func``/TorchScript tracing, for distributed
statistics, and for double backward (recomputed and differentiated).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._core.export import rsqrt
from .._core.fused import autograd_needed, composite_grads
from .._core.normalize import channel_shape
from .._core.stats import acc_dtype, centered, centered_moments, mix_group_moments, moments
from ._evonorm_fused import b0_backward, b0_forward, s0_backward, s0_forward
from .group_norm import group_pivot

__all__ = [
    "b0_normalize",
    "b0_apply",
    "s0_composite",
    "s0_apply",
]


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


# ------------------------------------------------------------------------------ B0


def b0_normalize(
    x: Tensor,
    batch_std: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """The plain differentiable B0 given ``batch_std`` = sqrt(σ²_B + ε), (1, C, 1, ...)."""
    acc = acc_dtype(x.dtype)
    shape = channel_shape(x)
    instance_var = moments(x, tuple(range(2, x.dim()))).var
    xa = x.to(acc)
    inst = v.to(acc).reshape(shape) * xa + torch.sqrt(instance_var + eps)
    den = torch.where(inst > batch_std, inst, batch_std)
    return _affine(xa / den, weight, bias, shape).to(x.dtype)


def _b0_composite(
    x: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_std: Tensor | None,
) -> Tensor:
    """B0 from ``x`` alone (training: batch variance of ``x``) for double backward."""
    if running_std is None:
        batch_var = moments(x, (0, *range(2, x.dim()))).var
        running_std = torch.sqrt(batch_var + eps)
    return b0_normalize(x, running_std, v, weight, bias, eps)


class _EvoNormB0Function(torch.autograd.Function):
    """B0 that saves ``x`` and per-(n, c) statistics only; gradient in ``_evonorm_fused``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (N, C, *S)
        v: Tensor,  # (C,)
        weight: Tensor | None,  # (C,)
        bias: Tensor | None,  # (C,)
        running_var: Tensor | None,  # (C,) buffer: read in eval, updated in training
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        y, sig_i, sig_b, m0, md, dmu = b0_forward(
            x, v, weight, bias, running_var, training, momentum, eps
        )
        ctx.save_for_backward(x, v, weight, bias, sig_i, sig_b, m0, md, dmu)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, v, weight, bias, sig_i, sig_b, m0, md, dmu = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite
            running_std = None if dmu is not None else sig_b

            def b0(x: Tensor, v: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
                return _b0_composite(x, v, w, b, ctx.eps, running_std)

            grads = composite_grads(needs, dy, b0, x, v, weight, bias)
        else:
            grads = b0_backward(dy, x, v, weight, bias, sig_i, sig_b, m0, md, dmu, needs)
        return (*grads, None, None, None, None)


def b0_apply(
    x: Tensor,
    running_var: Tensor | None,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """Eager B0 on validated inputs (statistics of this process only)."""
    if autograd_needed(x, v, weight, bias):
        return _EvoNormB0Function.apply(x, v, weight, bias, running_var, training, momentum, eps)
    with torch.no_grad():
        return b0_forward(x, v, weight, bias, running_var, training, momentum, eps)[0]


# ------------------------------------------------------------------------------ S0


def s0_composite(
    x: Tensor,
    num_groups: int,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """The plain differentiable S0 (see :func:`normlab.functional.evonorm_s0`)."""
    n, c = x.shape[:2]
    acc = acc_dtype(x.dtype)
    shape = channel_shape(x)
    # Per-(n, c) moments around one shared pivot per (n, group): the shifted means
    # (m.mean − m.shift) then mix without the cancellation of raw means on
    # off-center data.
    shift = group_pivot(x, num_groups).to(acc)
    xc = centered(x, shift)
    # zero shift: ``mean`` stays the mean of the shifted data (adding the pivot back
    # in fp32 would round it to the ulp of the raw values)
    m = centered_moments(xc, tuple(range(2, x.dim())), torch.zeros_like(shift))
    mean = m.mean.reshape(n, num_groups, c // num_groups)
    var = m.var.reshape(n, num_groups, c // num_groups)
    _, group_var = mix_group_moments(mean, var, (2,))  # (N, G, 1)
    rstd = rsqrt(group_var + eps).repeat_interleave(c // num_groups, dim=1)
    rstd = rstd.reshape(n, c, *([1] * (x.dim() - 2)))
    xa = x.to(acc)
    y = xa * torch.sigmoid(v.to(acc).reshape(shape) * xa) * rstd
    return _affine(y, weight, bias, shape).to(x.dtype)


class _EvoNormS0Function(torch.autograd.Function):
    """S0 that saves ``x`` and per-(n, c) statistics only; gradient in ``_evonorm_fused``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (N, C, *S)
        v: Tensor,  # (C,)
        weight: Tensor | None,  # (C,)
        bias: Tensor | None,  # (C,)
        num_groups: int,
        eps: float,
    ) -> Tensor:
        y, r, pivot, mean_rel = s0_forward(x, num_groups, v, weight, bias, eps)
        ctx.save_for_backward(x, v, weight, bias, r, pivot, mean_rel)
        ctx.num_groups, ctx.eps = num_groups, eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, v, weight, bias, r, pivot, mean_rel = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite

            def s0(x: Tensor, v: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
                return s0_composite(x, ctx.num_groups, v, w, b, ctx.eps)

            grads = composite_grads(needs, dy, s0, x, v, weight, bias)
        else:
            grads = s0_backward(dy, x, v, weight, bias, r, pivot, mean_rel, ctx.num_groups, needs)
        return (*grads, None, None)


def s0_apply(
    x: Tensor,
    num_groups: int,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eager S0 on validated inputs."""
    if autograd_needed(x, v, weight, bias):
        return _EvoNormS0Function.apply(x, v, weight, bias, num_groups, eps)
    with torch.no_grad():
        return s0_forward(x, num_groups, v, weight, bias, eps)[0]
