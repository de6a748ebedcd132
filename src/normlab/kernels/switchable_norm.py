r"""Switchable Norm in Triton: one statistics pass, the tiny (N, C) mixing in torch,
one apply pass; backward with one reduction pass and one apply pass.

The math and the numerics are those of :func:`normlab.functional.switchable_norm`:

1. ``_switchable_norm_fwd_stats``: per (n, c), the pivot p = x[n, c, 0] and the exact
   biased moments of x − p (each tile two-pass in registers, tiles merged with Chan's
   formula), in fp32 (fp64 for fp64 input).
2. :func:`_mix`, in torch on (N, C) tensors: IN, LN and BN moments (LN/BN as exact
   moments of unions of (n, c) groups, law of total variance, every mean relative to
   a pivot), their softmax-weighted mix, ``M`` (the mixed mean minus p) and
   ``scale = γ/sqrt(var + eps)``.
3. ``_switchable_norm_fwd``: ``y = ((x − p) − M)·scale + β``.

Backward: ``_switchable_norm_bwd_stats`` reduces :math:`S_1 = \sum_s dy` and
:math:`S_2 = \sum_s dy\,((x-p)-M)` per (n, c); autograd through a recomputed
:func:`_mix` turns :math:`dM = -\mathrm{scale}\,S_1` and :math:`d\mathrm{scale} = S_2`
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
from torch.autograd.function import once_differentiable

from .._core.running import update_running_stats
from .._core.stats import mix_group_moments
from ._common import (
    acc_dtype,
    add,
    channels_fastest,
    check_dtype,
    empty,
    empty_like,
    ncs,
    num_warps,
    spatial_size,
    tile,
    tile_size,
    tl_acc,
)

__all__ = ["SwitchableNormFunction", "switchable_norm_triton"]


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
    pid = tl.program_id(0)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
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
        nb = tl.reduce(sm.to(ACC), None, add)
        mb = tl.reduce(d, 1, add) / nb
        e = tl.where(mask, d - mb[:, None], 0.0)
        m2b = tl.reduce(e * e, 1, add)
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
    pid = tl.program_id(0)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    m = tl.load(M + nc, mask=cm, other=0.0)
    scale = tl.load(SCALE + nc, mask=cm, other=0.0)
    if HAS_B:
        bias = tl.load(B + c, mask=cm, other=0.0).to(ACC)
    else:
        bias = tl.full([BLOCK_C], 0.0, ACC)
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
    pid = tl.program_id(0)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
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
    tl.store(SUMS + nc, tl.reduce(acc1, 1, add), mask=cm)
    tl.store(SUMS + PC + nc, tl.reduce(acc2, 1, add), mask=cm)


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
    pid = tl.program_id(0)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
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


def _mix(
    shift: Tensor,
    mu_in: Tensor,
    var_in: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    weight: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    names: tuple[str, ...],
    bn_from_batch: bool,
    eps: float,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The (N, C) mixing of :func:`normlab.functional.switchable_norm` (same formula).

    ``mu_in`` is the per-(n, c) mean of ``x − shift``; returns the mixed mean minus
    ``shift``, ``scale = γ/sqrt(mixed var + eps)`` and, when the BN branch uses the
    batch, its (absolute mean, biased variance) of shape (C,).
    """
    acc = mu_in.dtype
    d_ln = shift - shift[:, :1]
    mu_ln, var_ln = mix_group_moments(mu_in + d_ln, var_in, (1,))
    means = {"in": mu_in, "ln": mu_ln - d_ln}
    variances = {"in": var_in, "ln": var_ln}
    batch = None
    if "bn" in names:
        if bn_from_batch:
            d_bn = shift - shift[:1]
            mu_bn, var_bn = mix_group_moments(mu_in + d_bn, var_in, (0,))
            means["bn"] = mu_bn - d_bn
            variances["bn"] = var_bn
            batch = ((mu_bn + shift[:1]).reshape(-1), var_bn.reshape(-1))
        else:
            assert running_mean is not None and running_var is not None
            means["bn"] = running_mean.to(acc)[None, :] - shift
            variances["bn"] = running_var.to(acc)[None, :]
    wm = torch.softmax(mean_weight.to(acc), 0)
    wv = torch.softmax(var_weight.to(acc), 0)
    mean = sum(wm[k] * means[name] for k, name in enumerate(names))
    var = sum(wv[k] * variances[name] for k, name in enumerate(names))
    scale = torch.rsqrt(var.clamp_min(0) + eps)  # type: ignore[union-attr]
    if weight is not None:
        scale = scale * weight.to(acc)[None, :]
    return mean.expand_as(mu_in), scale.expand_as(mu_in), batch  # type: ignore[union-attr]


def _plan(x: Tensor, x_sc: int, x_ss: int) -> tuple[int, int, int, int, int]:
    c, s = x.shape[1], spatial_size(x)
    block_c, block_s = tile(c, s, channels_fastest(x_sc, x_ss, s), tile_size(x.device))
    return c, s, triton.cdiv(c, block_c), block_c, block_s


class SwitchableNormFunction(torch.autograd.Function):
    """``y = ((x − p) − M)·scale + β`` with M and scale mixed from per-(n, c) moments.

    Returns ``(y, batch_mean, batch_var)``; the last two (the BN branch's batch
    statistics, (C,), empty when it uses running statistics) are not differentiable
    and serve the running-statistics update.
    """

    @staticmethod
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
        bn_from_batch: bool,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x, x_sn, x_sc, x_ss = ncs(x)
        n = x.shape[0]
        c, s, cb, block_c, block_s = _plan(x, x_sc, x_ss)
        acc = acc_dtype(x.dtype)
        warps = num_warps(block_c * block_s)
        stats = empty((3, n, c), acc, x.device)
        _switchable_norm_fwd_stats[(n * cb,)](
            x, stats, x_sn, x_sc, x_ss, c, s, cb, n * c,
            ACC=tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
        )  # fmt: skip
        shift, mu_in, var_in = stats.unbind(0)
        args = (mean_weight, var_weight, weight, running_mean, running_var, names, bn_from_batch)
        m, scale, batch = _mix(shift, mu_in, var_in, *args, eps)
        m, scale = m.contiguous(), scale.contiguous()
        y = empty_like(x)
        _, y_sn, y_sc, y_ss = ncs(y)
        _switchable_norm_fwd[(n * cb,)](
            x, y, shift, m, scale, x if bias is None else bias,
            x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, c, s, cb,
            ACC=tl_acc(x.dtype), HAS_B=bias is not None,
            BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x, shift, mu_in, var_in, m, scale, *args[:5])
        ctx.rest = (names, bn_from_batch, eps)
        if batch is None:
            batch = (x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc))
        ctx.mark_non_differentiable(*batch)
        return y, batch[0], batch[1]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, shift, mu_in, var_in, m, scale, mw, vw, weight, rm, rv = ctx.saved_tensors
        names, bn_from_batch, eps = ctx.rest
        need = ctx.needs_input_grad
        x, x_sn, x_sc, x_ss = ncs(x)
        dy, dy_sn, dy_sc, dy_ss = ncs(dy)
        n = x.shape[0]
        c, s, cb, block_c, block_s = _plan(x, x_sc, x_ss)
        acc = mu_in.dtype
        warps = num_warps(block_c * block_s)
        sums = empty((2, n, c), acc, x.device)
        _switchable_norm_bwd_stats[(n * cb,)](
            x, dy, shift, m, sums, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, c, s, cb, n * c,
            ACC=tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
        )  # fmt: skip
        s1, s2 = sums.unbind(0)
        # Autograd through the (N, C) mixing, recomputed: dM = −scale·S1, dscale = S2.
        with torch.enable_grad():
            leaves = [mu_in.detach().requires_grad_(), var_in.detach().requires_grad_()]
            params = [mw, vw, weight]
            grad_params = [p is not None and need[1 + k] for k, p in enumerate(params)]
            live = [
                p.detach().requires_grad_() if g else p
                for p, g in zip(params, grad_params, strict=True)
            ]
            m2, scale2, _ = _mix(shift, *leaves, *live, rm, rv, names, bn_from_batch, eps)
            wrt = leaves + [p for p, g in zip(live, grad_params, strict=True) if g]
            grads = torch.autograd.grad((m2, scale2), wrt, (-scale * s1, s2), allow_unused=True)
        dmu, dvar = (g if g is not None else torch.zeros_like(mu_in) for g in grads[:2])
        rest = iter(grads[2:])
        gp = [next(rest) if g else None for g in grad_params]
        dx = None
        if need[0]:
            dx = empty_like(x)
            _, dx_sn, dx_sc, dx_ss = ncs(dx)
            _switchable_norm_bwd_dx[(n * cb,)](
                x, dy, dx, shift, mu_in, scale, (dmu / s).contiguous(),
                (2.0 * dvar / s).contiguous(),
                x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss, c, s, cb,
                ACC=tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
            )  # fmt: skip
        casts = [None if g is None else g.to(p.dtype) for g, p in zip(gp, params, strict=True)]
        db = s1.sum(0) if need[4] else None
        return (dx, *casts, db, None, None, None, None, None)


def switchable_norm_triton(
    input: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    using_bn: bool = True,
) -> Tensor:
    """Switchable Norm via :class:`SwitchableNormFunction`, with the running-statistics
    update of :func:`normlab.functional.switchable_norm` (torch's momentum convention,
    unbiased variance)."""
    layer = "switchable_norm (triton)"
    check_dtype(layer, input)
    if input.dim() < 2:
        raise ValueError(f"{layer}: expected (N, C, *spatial), got shape {tuple(input.shape)}.")
    names = ("in", "ln", "bn") if input.dim() >= 3 else ("ln", "bn")
    names = names if using_bn else names[:-1]
    for label, logits in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if tuple(logits.shape) != (len(names),):
            raise ValueError(
                f"{layer}: {label} has shape {tuple(logits.shape)}, expected ({len(names)},) "
                f"for the normalizers {names}."
            )
    bn_from_batch = using_bn and training
    if using_bn and not training and (running_mean is None or running_var is None):
        raise ValueError(
            f"{layer}: training=False takes the BN statistics from running_mean and "
            "running_var, which were not given."
        )
    n, c = input.shape[:2]
    count = n * spatial_size(input)
    if bn_from_batch and count <= 1:
        raise ValueError(
            f"{layer}: the BN branch needs more than 1 value per channel in training, got "
            f"input of shape {tuple(input.shape)}; use using_bn=False or a bigger batch."
        )
    if input.numel() == 0:
        raise ValueError(f"{layer}: empty input of shape {tuple(input.shape)}.")
    y, batch_mean, batch_var = SwitchableNormFunction.apply(
        input,
        mean_weight,
        var_weight,
        weight,
        bias,
        None if bn_from_batch else running_mean,
        None if bn_from_batch else running_var,
        names,
        bn_from_batch,
        float(eps),
    )
    if bn_from_batch and (running_mean is not None or running_var is not None):
        unbiased = batch_var * (count / (count - 1))
        update_running_stats(running_mean, running_var, batch_mean, unbiased, momentum)
    return y
