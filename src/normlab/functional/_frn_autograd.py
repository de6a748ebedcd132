r"""Filter Response Norm (+TLU): eager kernels, their launcher and one autograd.Function.

Training memory and time on CPU are dominated by full-tensor passes and by what
autograd keeps. The plain autograd composite (:func:`frn_composite`) keeps
``x``, ``x·scale``, the TLU mask and more (about 3x the input); the Function
here keeps **only x** plus per-(sample, channel) vectors, and recomputes the
rest in backward with a hand-derived gradient. Every full-tensor step is one
vectorized ATen pass writing into a buffer it owns (``mul_``/``add_``/
``clamp_min_``; ``threshold_backward`` for the TLU mask), never ``where`` with a
boolean mask (two passes and a mask allocation) nor ``addcmul`` with two
broadcast operands (which falls off the vectorized loop).

Forward, per (n, c), with ``S`` = the spatial size and the statistics in the
accumulation dtype (fp32 for half inputs)::

    ν²  = Σ_s x² / S
    r   = 1 / sqrt(ν² + |ε|)                       saved, (N, C, 1, ...)
    a   = γ·r
    z   = a·x + β
    y   = max(z, τ)                                (τ optional: FRN alone is y = z)

Backward, with ``m = [z > τ]`` recomputed from ``x`` (ties go to τ)::

    g   = dy·m                                     (∂L/∂z)
    P   = Σ_s g·x                                  (N, C)
    ∂L/∂x = a·g − (a·r²·P / S)·x                   (∂r/∂x_s = −r³·x_s / S)
    ∂L/∂γ = Σ_n r·P,   ∂L/∂β = Σ_{n,s} g,   ∂L/∂τ = Σ_{n,s} dy − ∂L/∂β
    ∂L/∂ε = −½ Σ_{n,c} a·r²·P                      (ε here is the |ε| passed in)

Which path runs is decided by :func:`normlab._core.dispatch.choose_path`: on
CPU in eager mode :func:`frn_fused` (the Function when autograd needs it, the
forward kernel alone otherwise); the composite on
other devices and under ``torch.compile``/``torch.export``, ``torch.func``
transforms, forward-mode AD, TorchScript tracing and tensor subclasses, where
plain differentiable ops are what those tools understand (inductor fuses the
composite anyway) — see :func:`normlab._core.fused.fused_allowed`. A backward run with
``create_graph=True`` (double backward) recomputes the composite and
differentiates it, so higher-order gradients stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._core.export import rsqrt
from .._core.fused import autograd_needed, backward_views, cast, composite_grads, param
from .._core.normalize import channel_shape
from .._core.stats import acc_dtype, dot_sums, mean_square, reduced_count, sum_of_squares

__all__ = ["frn_composite", "frn_fused"]


# ----------------------------------------------------------------------------- composite


def frn_composite(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    eps: float | Tensor,
) -> Tensor:
    """The plain differentiable FRN (+TLU): used where the kernels are not (see module doc)."""
    acc = acc_dtype(x.dtype)
    shape = channel_shape(x)
    # ν² is a mean of squares by definition (no mean subtraction): fp32 for half input.
    nu2 = mean_square(x, range(2, x.dim()))
    scale = rsqrt(nu2 + eps)
    if weight is not None:
        scale = scale * weight.to(acc).reshape(shape)
    y = x.to(acc) * scale
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    if tau is not None:
        # where(), not maximum(): maximum splits the gradient half/half at ties, the
        # TLU's subgradient is dy to x where x > τ and dy to τ elsewhere.
        t = tau.to(acc).reshape(shape)
        y = torch.where(y > t, y, t)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------- kernels


def _frn_fwd(
    x: Tensor,  # (N, C, *S)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    tau: Tensor | None,  # (C,)
    eps: float | Tensor,  # float or () tensor, the |ε| added to ν²
) -> tuple[Tensor, Tensor]:
    """``(y, r)``: the output in ``x``'s dtype and ``r = 1/sqrt(ν² + ε)``, (N, C, 1, ...)."""
    acc = acc_dtype(x.dtype)
    shape = channel_shape(x)
    dims = tuple(range(2, x.dim()))
    xa = cast(x, acc)
    # One full-size allocation: the output (the half-input copy is reused for it).
    y = xa if xa is not x else torch.empty_like(xa)
    ss = sum_of_squares(xa, dims, out=None if y is xa else y)
    r = rsqrt(ss.div_(reduced_count(x, dims)).add_(eps))
    a = r if weight is None else r * param(weight, acc, shape)
    y = torch.mul(xa, a, out=y)
    if bias is not None:
        y.add_(param(bias, acc, shape))
    if tau is not None:
        # max(z, τ): the value of the composite's where(z > τ, z, τ) for every
        # number (a NaN propagates here instead of becoming τ).
        y.clamp_min_(param(tau, acc, shape))
    return cast(y, x.dtype), r


def _frn_bwd(
    dy: Tensor,  # (N, C, *S)
    x: Tensor,  # (N, C, *S)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    tau: Tensor | None,  # (C,)
    r: Tensor,  # (N, C, 1, ...) 1/sqrt(ν² + ε), accumulation dtype
    needs: Sequence[bool],  # needs_input_grad of (x, weight, bias, tau, eps)
) -> tuple[Tensor | None, ...]:
    acc = r.dtype
    shape, dims, all_dims, xa, dya = backward_views(x, dy, acc)
    gamma = param(weight, acc, shape)
    a = r if gamma is None else r * gamma
    if tau is not None:
        # z − τ recomputed exactly as in forward; its sign is exact, so the mask
        # z > τ equals the forward's (ties: the gradient goes to τ).
        z = xa * a
        if bias is not None:
            z.add_(param(bias, acc, shape))
        z.sub_(param(tau, acc, shape))
        g = torch.ops.aten.threshold_backward.grad_input(dya, z, 0, grad_input=z)
    else:
        g = dya
    # Σ_s g and P = Σ_s g·x per (n, c) in one pass, no temporary.
    sum_g, p = dot_sums(g, xa, per_sample=True)
    dx = dweight = dbias = dtau = deps = None
    if needs[0]:
        coef_x = a * r * r * p * (-1.0 / reduced_count(x, dims))
        if g is not dya:  # g is our buffer: ∂L/∂x is written into it
            dx = g.mul_(a).addcmul_(xa, coef_x)
        else:
            dx = torch.mul(xa, coef_x).addcmul_(g, a)
        dx = cast(dx, x.dtype)
    if weight is not None and needs[1]:
        dweight = (r * p).sum(dim=0).reshape(-1).to(weight.dtype)
    sum_g = sum_g.sum(dim=0).reshape(-1)  # Σ_{n,s} g per channel
    if bias is not None and needs[2]:
        dbias = sum_g.to(bias.dtype)
    if tau is not None and needs[3]:
        dtau = (dya.sum(dim=all_dims) - sum_g).to(tau.dtype)
    if needs[4]:
        deps = (a * r * r * p).sum().mul_(-0.5)
    return dx, dweight, dbias, dtau, deps


class _FRNFunction(torch.autograd.Function):
    """FRN (+TLU) that saves ``x`` and ``r`` (N, C) only; gradient derived in the module doc."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (N, C, *S)
        weight: Tensor | None,  # (C,)
        bias: Tensor | None,  # (C,)
        tau: Tensor | None,  # (C,)
        eps: float | Tensor,  # float or () tensor (a learnable ε keeps its gradient)
    ) -> Tensor:
        y, r = _frn_fwd(x, weight, bias, tau, eps)
        eps_t = eps if isinstance(eps, Tensor) else None
        ctx.save_for_backward(x, weight, bias, tau, eps_t, r)
        ctx.eps = None if eps_t is not None else eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, tau, eps_t, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite
            eps = eps_t if eps_t is not None else ctx.eps
            return composite_grads(
                ctx.needs_input_grad, dy, frn_composite, x, weight, bias, tau, eps
            )
        return _frn_bwd(dy, x, weight, bias, tau, r, ctx.needs_input_grad)


def frn_fused(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    eps: float | Tensor,
) -> Tensor:
    """FRN (+TLU) on validated inputs where the dispatch chose the fused path: the
    Function when autograd records the call, the forward kernel alone otherwise."""
    eps_t = eps if isinstance(eps, Tensor) else None
    if autograd_needed(x, weight, bias, tau, eps_t):
        return _FRNFunction.apply(x, weight, bias, tau, eps)
    return _frn_fwd(x, weight, bias, tau, eps)[0]
