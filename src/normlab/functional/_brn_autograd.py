r"""Batch Renormalization's training step as one autograd.Function.

Per channel, over the ``n = N·L`` values of (N, \*spatial)::

    s        pivot x[0, c, 0, ...]            (an element of x, exact)
    u        x − s
    μ, σ²    mean (relative to s) and biased variance of u
    σ_B      sqrt(σ² + ε),   σ = sqrt(running_var + ε)
    r, d     clip(σ_B/σ, 1/r_max, r_max),  clip((μ + s − running_mean)/σ, ±d_max)
    x̂        (u − μ)/σ_B
    y        γ·(r·x̂ + d) + β  =  u·A + B,   A = γ·r/σ_B,  B = γ·(d − μ·r/σ_B) + β

``r`` and ``d`` carry no gradient, so the backward is BatchNorm's with the
weight ``γ·r``:

    ∂L/∂β = Σdy,   ∂L/∂γ = r·Σdy·x̂ + d·Σdy,
    ∂L/∂x = (γ·r/σ_B)·(dy − Σdy/n − x̂·Σ(dy·x̂)/n)

with ``Σdy·x̂ = (Σdy·u − μ·Σdy)/σ_B``. As a map of ``u`` that is
``dx = A·dy + P·u + Q`` with ``P = −A·Σ(dy·x̂)/(n·σ_B)`` and
``Q = −A·Σdy/n − P·μ``.

Passes over the input: forward ``u = x − s`` (the one full-size buffer, which
becomes y), one reduction (``Σu``, ``Σu²``) and the in-place apply. Backward:
where the batch mean rounded to x's dtype is close enough (see
``_ONE_CALL_LIMIT``: any ordinary activation), one call of torch's batch-norm
backward kernel on ``x`` with weight ``γ·r``, mean ``μ_B`` and invstd ``1/σ_B``
(two passes inside, ``dx`` its one new buffer); otherwise one reduction
(``Σdy``, ``Σdy·u``, straight from ``x``) and ``u`` again, turned in place into
``dx``. Saved: ``x`` and per-channel vectors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._core.fused import against, apply_dx, cast, composite_grads
from .._core.running import update_running_stats
from .._core.stats import centered, dot_sums, one_pass_moments, pivot

__all__ = ["BatchRenormFunction"]

# The one-call backward centres x on μ_B rounded to x's dtype, which moves x̂ by up
# to |μ_B|/σ_B·eps/2. It is taken where that is ≤ 2⁻²⁰, i.e. |μ_B| ≤ 2⁻¹⁹/eps·σ_B:
# 16·σ_B in fp32 (ordinary activations); CT-like data (mean 10⁶·σ) take the other path.
_ONE_CALL_LIMIT = 2.0**-19


def _limit(value: float | Tensor, acc: torch.dtype, device: torch.device) -> float | Tensor:
    """``r_max`` / ``d_max`` for ``torch.clamp``: a float as is, a tensor as 0-d ``acc``."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=acc).reshape(())
    return float(value)


class BatchRenormFunction(torch.autograd.Function):
    """Training-mode ``y = γ·(r·(x − μ_B)/σ_B + d) + β`` with r, d held constant in backward.

    Updates ``running_mean`` / ``running_var`` in place after r and d are
    computed from their previous values. Saves ``x`` and (C,)-sized tensors
    only. A backward with ``create_graph=True`` differentiates the plain
    graph instead (:func:`~normlab._core.fused.composite_grads`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (N, C, *S)
        weight: Tensor | None,  # (C,) γ
        bias: Tensor | None,  # (C,) β
        running_mean: Tensor,  # (C,) read, then updated in place
        running_var: Tensor,  # (C,)
        momentum: float,
        eps: float,
        r_max: float | Tensor,
        d_max: float | Tensor,
        recompute: Any,  # (x, γ, β, running_mean, running_var) -> y in plain ops, no update
    ) -> Tensor:
        shift_x = pivot(x, (0, *range(2, x.dim())))  # (1, C, 1...): elements of x
        u = centered(x, shift_x)  # the one full-size buffer (accumulation dtype); becomes y
        acc = u.dtype
        mean, var, count = one_pass_moments(u, per_sample=False)  # mean relative to s
        mean, var = mean.reshape(1, -1), var.reshape(1, -1)  # (1, C)
        shift = cast(shift_x, acc).reshape(1, -1)
        sigma_b = torch.sqrt(var + eps)
        # r and d from the running statistics *before* this step's update.
        rm = cast(running_mean.detach(), acc).reshape(1, -1)
        rv = cast(running_var.detach(), acc).reshape(1, -1)
        sigma = torch.sqrt(rv.clamp_min(0) + eps)
        r_hi, d_hi = _limit(r_max, acc, x.device), _limit(d_max, acc, x.device)
        r = torch.clamp(sigma_b / sigma, min=1.0 / r_hi, max=r_hi)
        # μ_B − μ as (mean of the shifted data) + (shift − μ): both small differences.
        d = torch.clamp((mean + (shift - rm)) / sigma, min=-d_hi, max=d_hi)
        g = r if weight is None else r * cast(weight, acc)  # γ·r
        a = g / sigma_b
        b = d if weight is None else d * cast(weight, acc)
        if bias is not None:
            b = b + cast(bias, acc)
        b = torch.addcmul(b, mean, a, value=-1)
        y = u.mul_(against(a, x)).add_(against(b, x))  # (u − μ)·A + γd + β

        frozen = (rm.reshape(-1).clone(), rv.reshape(-1).clone())  # for a recompute
        batch_mean = mean + shift
        update_running_stats(
            running_mean, running_var, batch_mean, var * (count / (count - 1)), momentum
        )
        # Backward in one call of torch's batch-norm backward kernel on x itself,
        # centred on the batch mean rounded to x's dtype, where that rounding
        # (≤ |mean_B|·eps/2) moves x̂ by at most 2⁻²⁰; else it recomputes u = x − s.
        one_call = x.dtype == acc and bool(
            (batch_mean.abs() <= _ONE_CALL_LIMIT / torch.finfo(acc).eps * sigma_b).all()
        )
        ctx.save_for_backward(x, weight, bias, *frozen, shift_x, mean, sigma_b, r, d, batch_mean)
        ctx.count, ctx.recompute, ctx.one_call = count, recompute, one_call
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, rm, rv, shift_x, mean, sigma_b, r, d, batch_mean = ctx.saved_tensors
        tail = (None,) * 7
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain graph
            grads = composite_grads(
                ctx.needs_input_grad, dy, lambda *i: ctx.recompute(*i, rm, rv), x, weight, bias
            )
            return grads + tail
        needs = ctx.needs_input_grad
        n = ctx.count
        if needs[0] and ctx.one_call and dy.dtype == x.dtype:
            # BatchNorm's backward with weight γ·r, mean μ_B, invstd 1/σ_B: dx, Σdy·x̂, Σdy.
            g = r if weight is None else r * weight.to(r.dtype)
            dx, dot, s0 = torch.ops.aten.native_batch_norm_backward(
                dy, x, g.reshape(-1), None, None, batch_mean.reshape(-1),
                sigma_b.reciprocal().reshape(-1), True, 0.0, [True, True, True],
            )  # fmt: skip
            d_w = (r * dot + d * s0).reshape(-1).to(weight.dtype) if needs[1] else None
            d_b = s0.reshape(-1).to(bias.dtype) if bias is not None and needs[2] else None
            return (dx, d_w if weight is not None else None, d_b) + tail
        sums = dot_sums(dy, x, per_sample=False, shift=shift_x)
        s0, s1 = (t.reshape(1, -1) for t in sums)  # Σdy, Σdy·u: (1, C)
        dot = (s1 - mean * s0) / sigma_b  # Σ dy·x̂
        d_w = (
            (r * dot + d * s0).reshape(-1).to(weight.dtype)
            if weight is not None and needs[1]
            else None
        )
        d_b = s0.reshape(-1).to(bias.dtype) if bias is not None and needs[2] else None
        dx = None
        if needs[0]:
            a = (r if weight is None else r * weight.to(r.dtype)) / sigma_b
            p = -a * dot / (n * sigma_b)
            q = -a * s0 / n - p * mean
            u = centered(x, shift_x)
            dx = apply_dx(u, dy, *(against(t, x) for t in (a, p, q)), x.dtype)
        return (dx, d_w, d_b) + tail
