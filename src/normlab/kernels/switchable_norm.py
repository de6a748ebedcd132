r"""Switchable Norm in Triton: one statistics pass, the tiny (N, C) mixing in torch,
one apply pass; backward with one reduction pass and one apply pass.

The math and the numerics are those of :func:`normlab.functional.switchable_norm`:

1. ``_switchable_norm_fwd_stats``: per (n, c), the pivot p = x[n, c, 0] and the exact
   biased moments of x − p (each tile two-pass in registers, tiles merged with Chan's
   formula), in fp32 (fp64 for fp64 input).
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
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._core.mixing import BnSource, mix_moments, mixed_scale
from .._core.stats import acc_dtype
from ._common import (
    Plan,
    channel_block,
    empty,
    empty_like,
    kernel_backward,
    kernel_forward,
    load_channels,
    ncs,
    tl_acc,
    total,
)

__all__ = ["SwitchableNormTriton"]


@triton.jit
def _switchable_norm_fwd_stats(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    STATS,  # (3, N, C) ACC out: pivot x[n, c, 0], mean of (x − pivot), biased variance
    x_sn,
    x_sc,
    x_ss,
    C,
    S,
    CB,  # channel blocks per sample
    PC,  # N·C, the plane stride of STATS
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n, c, cm = channel_block(CB, C, BLOCK_C)
    xb = X + n.to(tl.int64) * x_sn + c[:, None].to(tl.int64) * x_sc
    shift = tl.load(X + n.to(tl.int64) * x_sn + c.to(tl.int64) * x_sc, mask=cm, other=0.0)
    shift = shift.to(ACC)
    offs_s = tl.arange(0, BLOCK_S)
    count = tl.full([], 0.0, ACC)
    mean = tl.full([BLOCK_C], 0.0, ACC)
    m2 = tl.full([BLOCK_C], 0.0, ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        sm = s < S
        mask = cm[:, None] & sm[None, :]
        x = tl.load(xb + s[None, :].to(tl.int64) * x_ss, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - shift[:, None], 0.0)
        # The tile's exact two-pass moments per channel, then Chan's merge.
        nb = total(sm.to(ACC), None)
        mb = total(d, 1) / nb
        e = tl.where(mask, d - mb[:, None], 0.0)
        m2b = total(e * e, 1)
        tot = count + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (count * (nb / tot))
        count = tot
    out = STATS + n.to(tl.int64) * C + c
    tl.store(out, shift, mask=cm)
    tl.store(out + PC, mean, mask=cm)
    tl.store(out + 2 * PC, tl.maximum(m2 / S, 0.0), mask=cm)


@triton.jit
def _switchable_norm_fwd(
    X,  # (N, C, S) input
    Y,  # (N, C, S) output in x's dtype
    SHIFT,  # (N, C) ACC pivot p
    M,  # (N, C) ACC mixed mean minus p
    SCALE,  # (N, C) ACC γ/sqrt(mixed var + eps)
    B,  # (C,) β when HAS_B
    x_sn,
    x_sc,
    x_ss,
    y_sn,
    y_sc,
    y_ss,
    C,
    S,
    CB,
    ACC: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n, c, cm = channel_block(CB, C, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    m = tl.load(M + nc, mask=cm, other=0.0)
    scale = tl.load(SCALE + nc, mask=cm, other=0.0)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    cc = c[:, None].to(tl.int64)
    xb = X + n.to(tl.int64) * x_sn + cc * x_sc
    yb = Y + n.to(tl.int64) * y_sn + cc * y_sc
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        ss = s[None, :].to(tl.int64)
        x = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC)
        y = ((x - shift[:, None]) - m[:, None]) * scale[:, None] + bias[:, None]
        tl.store(yb + ss * y_ss, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _switchable_norm_bwd_stats(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    SHIFT,  # (N, C) ACC pivot
    M,  # (N, C) ACC mixed mean minus pivot
    SUMS,  # (2, N, C) ACC out: Σ_s dy and Σ_s dy·((x − p) − M)
    x_sn,
    x_sc,
    x_ss,
    dy_sn,
    dy_sc,
    dy_ss,
    C,
    S,
    CB,
    PC,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n, c, cm = channel_block(CB, C, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    m = tl.load(M + nc, mask=cm, other=0.0)
    cc = c[:, None].to(tl.int64)
    xb = X + n.to(tl.int64) * x_sn + cc * x_sc
    dyb = DY + n.to(tl.int64) * dy_sn + cc * dy_sc
    offs_s = tl.arange(0, BLOCK_S)
    acc1 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc2 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        ss = s[None, :].to(tl.int64)
        x = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dyb + ss * dy_ss, mask=mask, other=0.0).to(ACC)
        acc1 += dy
        acc2 += dy * tl.where(mask, (x - shift[:, None]) - m[:, None], 0.0)
    tl.store(SUMS + nc, total(acc1, 1), mask=cm)
    tl.store(SUMS + PC + nc, total(acc2, 1), mask=cm)


@triton.jit
def _switchable_norm_bwd_dx(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    DX,  # (N, C, S) out, x's dtype
    SHIFT,  # (N, C) ACC pivot
    MU,  # (N, C) ACC per-(n, c) mean of (x − pivot)
    SCALE,  # (N, C) ACC
    GA,  # (N, C) ACC dμ/S
    GB,  # (N, C) ACC 2·dσ²/S
    x_sn,
    x_sc,
    x_ss,
    dy_sn,
    dy_sc,
    dy_ss,
    dx_sn,
    dx_sc,
    dx_ss,
    C,
    S,
    CB,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n, c, cm = channel_block(CB, C, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    mu = tl.load(MU + nc, mask=cm, other=0.0)
    scale = tl.load(SCALE + nc, mask=cm, other=0.0)
    ga = tl.load(GA + nc, mask=cm, other=0.0)
    gb = tl.load(GB + nc, mask=cm, other=0.0)
    cc = c[:, None].to(tl.int64)
    xb = X + n.to(tl.int64) * x_sn + cc * x_sc
    dyb = DY + n.to(tl.int64) * dy_sn + cc * dy_sc
    dxb = DX + n.to(tl.int64) * dx_sn + cc * dx_sc
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        ss = s[None, :].to(tl.int64)
        x = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dyb + ss * dy_ss, mask=mask, other=0.0).to(ACC)
        xc = (x - shift[:, None]) - mu[:, None]
        dx = dy * scale[:, None] + ga[:, None] + gb[:, None] * xc
        tl.store(dxb + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)


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
        x, x_sn, x_sc, x_ss = ncs(x)
        p = Plan(x, x_sc, x_ss)
        acc = acc_dtype(x.dtype)
        stats = empty((3, p.n, p.c), acc, x.device)
        _switchable_norm_fwd_stats[(p.rows,)](
            x, stats, x_sn, x_sc, x_ss, p.c, p.s, p.per_sample, p.n * p.c,
            ACC=tl_acc(x.dtype), BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
        )  # fmt: skip
        shift, mu_in, var_in = stats.unbind(0)
        mixed = mix_moments(
            shift, mu_in, var_in, mean_weight, var_weight, names, bn, running_mean, running_var
        )
        m = mixed.mean.contiguous()
        scale = mixed_scale(mixed.var, eps, weight).contiguous()
        y = empty_like(x)
        _, y_sn, y_sc, y_ss = ncs(y)
        _switchable_norm_fwd[(p.rows,)](
            x, y, shift, m, scale, x if bias is None else bias,
            x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, p.c, p.s, p.per_sample,
            ACC=tl_acc(x.dtype), HAS_B=bias is not None,
            BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
        )  # fmt: skip
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
        x, x_sn, x_sc, x_ss = ncs(x)
        dy, dy_sn, dy_sc, dy_ss = ncs(dy)
        p = Plan(x, x_sc, x_ss)
        acc = mu_in.dtype
        sums = empty((2, p.n, p.c), acc, x.device)
        _switchable_norm_bwd_stats[(p.rows,)](
            x, dy, shift, m, sums, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss,
            p.c, p.s, p.per_sample, p.n * p.c,
            ACC=tl_acc(x.dtype), BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
        )  # fmt: skip
        s1, s2 = sums.unbind(0)
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
            dx = empty_like(x)
            _, dx_sn, dx_sc, dx_ss = ncs(dx)
            _switchable_norm_bwd_dx[(p.rows,)](
                x, dy, dx, shift, mu_in, scale, (dmu / p.s).contiguous(),
                (2.0 * dvar / p.s).contiguous(),
                x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
                p.c, p.s, p.per_sample,
                ACC=tl_acc(x.dtype), BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
            )  # fmt: skip
        casts = [None if g is None else g.to(t.dtype) for g, t in zip(gp, params, strict=True)]
        db = s1.sum(0) if need[4] else None
        return (dx, *casts, db, None, None, None, None, None)
