r"""Switchable Norm in Triton: one statistics pass, the tiny (N, C) mixing in torch,
one apply pass; backward with one reduction pass and one apply pass.

The math and the numerics are those of :func:`normlab.functional.switchable_norm`:

1. ``_switchable_norm_fwd_stats``: per (n, c), the pivot p = x[n, c, 0] and the exact
   biased moments of x − p (Welford's update in every lane of the tile, the lanes
   merged once with Chan's formula), in fp32 (fp64 for fp64 input).
2. :func:`normlab._core.mixing.mix_moments`, in torch on (N, C) tensors: IN, LN and
   BN moments (LN/BN as exact moments of unions of (n, c) groups, law of total
   variance, every mean relative to a pivot), their softmax-weighted mix, ``M`` (the
   mixed mean minus p), then ``scale = γ/sqrt(var + eps)``.
3. ``_switchable_norm_fwd``: ``y = ((x − p) − M)·scale + β``.

Backward: ``_switchable_norm_bwd_stats`` reduces :math:`S_1 = \sum_s dy` and
:math:`S_2 = \sum_s dy\,((x-p)-M)` per (n, c); autograd through the recomputed
mixing turns :math:`dM = -\mathrm{scale}\,S_1` and :math:`d\mathrm{scale} = S_2`
into gradients of the logits, of γ and of the per-(n, c) moments μ, σ²; then
``_switchable_norm_bwd_dx`` writes

.. math:: dx = dy\,\mathrm{scale} + d\mu/S + 2\,d\sigma^2\,((x-p)-\mu)/S

(the derivative of a biased mean and variance over S positions).

**Parallelism** (:func:`._common.channel_plan`, the rule of FRN and frozen BN). Every
pass runs one program per (n, block of channels) and, when those alone would leave
the device idle, cuts each row's S positions into SPLIT chunks, one program each: the
statistics pass then writes per-chunk (mean, M2) rows that ``_switchable_norm_fwd_merge``
merges (Chan, in the order of the chunks), and the backward's per-chunk S₁, S₂ rows
are added by ``_switchable_norm_bwd_merge``: deterministic, no atomics. The kernels and
their launchers are in :mod:`.switchable_norm_kernels`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._core.mixing import BnSource, mix_moments, mixed_scale
from .._core.stats import acc_dtype
from ._common import channel_plan, kernel_backward, kernel_forward, ncs
from .switchable_norm_kernels import apply, grad_input, grad_sums, moments

__all__ = ["SwitchableNormTriton"]


class SwitchableNormTriton(torch.autograd.Function):
    """``y = ((x − p) − M)·scale + β`` with M and scale mixed from per-(n, c) moments
    by :func:`normlab._core.mixing.mix_moments` (``bn`` says where the BN branch's
    moments come from).

    Returns ``(y, batch_mean, batch_var)``; the last two (the BN branch's batch
    statistics, (C,), biased variance; empty unless ``bn="batch"``) are not
    differentiable and serve the running-statistics update.
    """

    @staticmethod
    @kernel_forward
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        mean_weight: Tensor,
        var_weight: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        names: tuple[str, ...],
        bn: BnSource,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x, _, x_sc, x_ss = ncs(x)
        p = channel_plan(x, x_sc, x_ss)
        acc = acc_dtype(x.dtype)
        shift, mu_in, var_in = moments(x, p, acc).unbind(0)
        mixed = mix_moments(
            shift, mu_in, var_in, mean_weight, var_weight, names, bn, running_mean, running_var
        )
        m = mixed.mean.contiguous()
        scale = mixed_scale(mixed.var, eps, weight).contiguous()
        y = apply(x, p, shift, m, scale, bias)
        params = (mean_weight, var_weight, weight, running_mean, running_var)
        ctx.save_for_backward(x, shift, mu_in, var_in, m, scale, *params)
        ctx.rest = (names, bn, eps)
        if mixed.batch_mean is None or mixed.batch_var is None:
            batch = (x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc))
        else:
            batch = (mixed.batch_mean.reshape(-1), mixed.batch_var.reshape(-1))
        ctx.mark_non_differentiable(*batch)
        return y, batch[0], batch[1]

    @staticmethod
    @kernel_backward("switchable_norm (triton)")
    def backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, shift, mu_in, var_in, m, scale, mw, vw, weight, rm, rv = ctx.saved_tensors
        names, bn, eps = ctx.rest
        need = ctx.needs_input_grad
        x, _, x_sc, x_ss = ncs(x)
        p = channel_plan(x, x_sc, x_ss)
        s1, s2 = grad_sums(x, dy, p, shift, m).unbind(0)
        # Autograd through the (N, C) mixing, recomputed: dM = −scale·S1, dscale = S2.
        with torch.enable_grad():
            leaves = [mu_in.detach().requires_grad_(), var_in.detach().requires_grad_()]
            params = [mw, vw, weight]
            grad_params = [t is not None and need[1 + k] for k, t in enumerate(params)]
            live = [
                t.detach().requires_grad_() if g else t
                for t, g in zip(params, grad_params, strict=True)
            ]
            mixed = mix_moments(shift, *leaves, live[0], live[1], names, bn, rm, rv)
            scale2 = mixed_scale(mixed.var, eps, live[2])
            wrt = leaves + [t for t, g in zip(live, grad_params, strict=True) if g]
            grads = torch.autograd.grad(
                (mixed.mean, scale2), wrt, (-scale * s1, s2), allow_unused=True
            )
        dmu, dvar = (g if g is not None else torch.zeros_like(mu_in) for g in grads[:2])
        rest = iter(grads[2:])
        gp = [next(rest) if g else None for g in grad_params]
        dx = None
        if need[0]:
            ga, gb = (dmu / p.s).contiguous(), (2.0 * dvar / p.s).contiguous()
            dx = grad_input(x, dy, p, shift, mu_in, scale, ga, gb)
        casts = [None if g is None else g.to(t.dtype) for g, t in zip(gp, params, strict=True)]
        db = s1.sum(0) if need[4] else None
        return (dx, *casts, db, None, None, None, None, None)
