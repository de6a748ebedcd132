r"""Filter Response Normalization fused with the TLU in Triton: forward, backward, one
autograd.Function.

Per (n, c), over the S spatial positions, with e = |ε|:

.. math:: \nu^2 = \tfrac1S \sum_s x^2, \quad r = 1/\sqrt{\nu^2 + e}, \quad
          \hat x = x\,r, \quad z = \gamma_c \hat x + \beta_c, \quad
          y = \max(z, \tau_c)\ (\text{ties to } \tau)

ν² is a second moment about zero by definition (no mean is subtracted, so there is
no cancellation); it is accumulated in fp32 (fp64 for fp64 input).

**Layout.** (N, C, S) through strides; one program per (n, block of channels) walks S
in (BLOCK_C, BLOCK_S) tiles laid along the contiguous axis, so NCHW and
channels_last are both coalesced and neither is copied.

**Backward** (``_frn_bwd_dx``, two loops over the program's tile): with
:math:`dz = dy\,[z > \tau]`, :math:`d\hat x = dz\,\gamma` and
:math:`A = \sum_s d\hat x\,\hat x`,

.. math:: dx = r\,(d\hat x - \hat x A / S), \quad
          d\gamma = \textstyle\sum dz\,\hat x,\ d\beta = \sum dz,\ d\tau = \sum dy\,[z \le \tau],
          \quad de = -\tfrac12 \sum_{n,c} r^2 A

dγ, dβ, dτ: per-sample rows of an fp32 buffer (3, N, C), added by ``_frn_bwd_dwdb``;
de from the (N, C) values of r and A in torch (ε reaches e = |ε| through autograd).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Plan,
    channel_block,
    empty,
    empty_like,
    kernel_backward,
    kernel_forward,
    load_channels,
    ncs,
    sum_partials,
    sum_rows,
    tl_acc,
    total,
)

__all__ = ["FilterResponseNormTriton"]


@triton.jit
def _frn_fwd(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    Y,  # (N, C, S) output in x's dtype
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    TAU,  # (C,) τ when HAS_TAU
    E,  # (1,) ACC: |ε|
    RS,  # (N, C) ACC out: r = 1/sqrt(ν² + |ε|)
    x_sn,
    x_sc,
    x_ss,
    y_sn,
    y_sc,
    y_ss,
    C,
    S,
    CB,  # channel blocks per sample
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n, c, cm = channel_block(CB, C, BLOCK_C)
    cc = c[:, None].to(tl.int64)
    xb = X + n.to(tl.int64) * x_sn + cc * x_sc
    yb = Y + n.to(tl.int64) * y_sn + cc * y_sc
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        x = tl.load(xb + s[None, :].to(tl.int64) * x_ss, mask=mask, other=0.0).to(ACC)
        acc += x * x
    rs = tl.rsqrt(total(acc, 1) / S + tl.load(E))
    tl.store(RS + n.to(tl.int64) * C + c, rs, mask=cm)
    scale = rs * load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    tau = load_channels(TAU, c, cm, HAS_TAU, 0.0, ACC, BLOCK_C)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        ss = s[None, :].to(tl.int64)
        x = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC)
        z = x * scale[:, None] + bias[:, None]
        if HAS_TAU:
            z = tl.where(z > tau[:, None], z, tau[:, None])
        tl.store(yb + ss * y_ss, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _frn_bwd_dx(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    DX,  # (N, C, S) out, x's dtype
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    TAU,  # (C,) τ when HAS_TAU
    RS,  # (N, C) ACC: r from the forward
    A,  # (N, C) ACC out: Σ_s dx̂·x̂ (for dε)
    DPART,  # (3, N, C) ACC out: per-sample Σ dz·x̂, Σ dz, Σ dy·[z <= τ]
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
    PC,  # N·C, the plane stride of DPART
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n, c, cm = channel_block(CB, C, BLOCK_C)
    cc = c[:, None].to(tl.int64)
    xb = X + n.to(tl.int64) * x_sn + cc * x_sc
    dyb = DY + n.to(tl.int64) * dy_sn + cc * dy_sc
    dxb = DX + n.to(tl.int64) * dx_sn + cc * dx_sc
    nc = n.to(tl.int64) * C + c
    rs = tl.load(RS + nc, mask=cm, other=0.0)
    w = load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    tau = load_channels(TAU, c, cm, HAS_TAU, 0.0, ACC, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    acc_a = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dw = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_db = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dt = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        ss = s[None, :].to(tl.int64)
        xhat = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC) * rs[:, None]
        dz = tl.load(dyb + ss * dy_ss, mask=mask, other=0.0).to(ACC)
        if HAS_TAU:
            above = xhat * w[:, None] + bias[:, None] > tau[:, None]
            acc_dt += tl.where(above, 0.0, dz)
            dz = tl.where(above, dz, 0.0)
        acc_a += dz * w[:, None] * xhat
        acc_dw += dz * xhat
        acc_db += dz
    a = total(acc_a, 1)
    tl.store(A + nc, a, mask=cm)
    tl.store(DPART + nc, total(acc_dw, 1), mask=cm)
    tl.store(DPART + PC + nc, total(acc_db, 1), mask=cm)
    tl.store(DPART + 2 * PC + nc, total(acc_dt, 1), mask=cm)
    a_over_s = a / S
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < S)[None, :]
        ss = s[None, :].to(tl.int64)
        xhat = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC) * rs[:, None]
        dz = tl.load(dyb + ss * dy_ss, mask=mask, other=0.0).to(ACC)
        if HAS_TAU:
            dz = tl.where(xhat * w[:, None] + bias[:, None] > tau[:, None], dz, 0.0)
        dx = (dz * w[:, None] - xhat * a_over_s[:, None]) * rs[:, None]
        tl.store(dxb + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _frn_bwd_dwdb(
    DPART,  # (3, N, C) ACC: per-sample Σ dz·x̂, Σ dz, Σ dy·[z <= τ]
    OUT,  # (3, C) ACC out: dγ, dβ, dτ
    P,
    C,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sum_rows(DPART, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


class FilterResponseNormTriton(torch.autograd.Function):
    """``max(γ·x/sqrt(ν² + e) + β, τ)`` (τ optional); ``e`` is a (1,) tensor holding
    |ε| in the accumulation dtype, and gets its gradient."""

    @staticmethod
    @kernel_forward
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        tau: Tensor | None,
        e: Tensor,
    ) -> Tensor:
        x, x_sn, x_sc, x_ss = ncs(x)
        y = empty_like(x)
        _, y_sn, y_sc, y_ss = ncs(y)
        p = Plan(x, x_sc, x_ss)
        rs = empty((p.n, p.c), e.dtype, x.device)
        if x.numel() > 0:
            _frn_fwd[(p.rows,)](
                x, y,
                x if weight is None else weight,
                x if bias is None else bias,
                x if tau is None else tau,
                e, rs,
                x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, p.c, p.s, p.per_sample,
                ACC=tl_acc(x.dtype), HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_TAU=tau is not None, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
                num_warps=p.warps,
            )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, tau, rs)
        return y

    @staticmethod
    @kernel_backward("filter_response_norm (triton)")
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, tau, rs = ctx.saved_tensors
        need = ctx.needs_input_grad
        x, x_sn, x_sc, x_ss = ncs(x)
        dy, dy_sn, dy_sc, dy_ss = ncs(dy)
        dx = empty_like(x)
        _, dx_sn, dx_sc, dx_ss = ncs(dx)
        p = Plan(x, x_sc, x_ss)
        n, c = p.n, p.c
        acc = rs.dtype
        if x.numel() == 0:
            a = torch.zeros((n, c), dtype=acc, device=x.device)
            sums = torch.zeros((3, c), dtype=acc, device=x.device)
        else:
            a = empty((n, c), acc, x.device)
            dpart = empty((3, n, c), acc, x.device)
            _frn_bwd_dx[(p.rows,)](
                x, dy, dx,
                x if weight is None else weight,
                x if bias is None else bias,
                x if tau is None else tau,
                rs, a, dpart,
                x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
                c, p.s, p.per_sample, n * c,
                ACC=tl_acc(x.dtype), HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_TAU=tau is not None, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
                num_warps=p.warps,
            )  # fmt: skip
            sums = sum_partials(_frn_bwd_dwdb, dpart)
        dw = sums[0].to(weight.dtype) if need[1] else None
        db = sums[1].to(bias.dtype) if need[2] else None
        dtau = sums[2].to(tau.dtype) if need[3] else None
        de = (-0.5 * (rs * rs * a).sum()).reshape(1) if need[4] else None
        return (dx if need[0] else None, dw, db, dtau, de)
