r"""Frozen / eval-mode BatchNorm (+ SiLU/ReLU) in one pass: forward, backward, one
autograd.Function.

With fixed per-channel statistics the norm is an affine map per channel. The
per-channel vectors are computed in torch in the accumulation dtype (fp32, fp64 for
fp64 input), where autograd sees them:

.. math:: s_c = \gamma_c / \sqrt{\max(\sigma^2_c, 0) + \epsilon}, \qquad
          y = \mathrm{act}\big((x - \mu_c)\, s_c + \beta_c\big)

and the kernel reads x once and writes y once. The form ``(x − μ)·s + β`` and not
``x·s + (β − μ·s)``: the folded one costs the same but cancels catastrophically on
off-center data (mean 1e4, std 1e-2 loses every digit in fp32); see
:func:`normlab._core.normalize.affine_normalize`, which this matches.

**Backward**: :math:`dz = dy\cdot\mathrm{act}'(z)`, :math:`dx = dz\,s_c` (x is not even
read without an activation or parameter gradients). When μ, s or β need a gradient
(a BatchNorm in eval mode with learnable γ, β), the same pass writes per-program rows
of :math:`\sum dz\,(x-\mu)` and :math:`\sum dz` into an fp32 buffer (2, N·SPLIT, C),
``_frozen_bn_bwd_dwdb`` adds the rows, and autograd carries
:math:`d\mu = -s\sum dz`, :math:`ds = \sum dz\,(x-\mu)`, :math:`d\beta = \sum dz` on to
γ, β and the running statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._common import (
    acc_dtype,
    act_backward,
    act_code,
    add,
    apply_act,
    channels_fastest,
    check_dtype,
    empty,
    empty_like,
    ncs,
    num_warps,
    spatial_size,
    split_spatial,
    sum_partials,
    sum_rows,
    target_programs,
    tile,
    tile_size,
    tl_acc,
)

__all__ = ["FrozenBatchNormFunction", "frozen_batch_norm_triton"]


@triton.jit
def _frozen_bn_fwd(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    Y,  # (N, C, S) output in x's dtype
    MEAN,  # (C,) ACC μ
    SCALE,  # (C,) ACC s = γ/sqrt(var + eps)
    BIAS,  # (C,) ACC β
    x_sn,
    x_sc,
    x_ss,
    y_sn,
    y_sc,
    y_ss,
    C,
    S,
    CB,  # channel blocks per sample
    CHUNK,  # positions per program along axis 1
    ACC: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(MEAN + c, mask=cm, other=0.0)
    scale = tl.load(SCALE + c, mask=cm, other=0.0)
    bias = tl.load(BIAS + c, mask=cm, other=0.0)
    xb = X + n.to(tl.int64) * x_sn + c[:, None].to(tl.int64) * x_sc
    yb = Y + n.to(tl.int64) * y_sn + c[:, None].to(tl.int64) * y_sc
    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < s_hi)[None, :]
        ss = s[None, :].to(tl.int64)
        x = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC)
        y = (x - mean[:, None]) * scale[:, None] + bias[:, None]
        if ACT != 0:
            y = apply_act(y, ACT)
        tl.store(yb + ss * y_ss, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _frozen_bn_bwd(
    X,  # (N, C, S) input (read when LOAD_X)
    DY,  # (N, C, S) upstream gradient
    DX,  # (N, C, S) out, x's dtype
    MEAN,  # (C,) ACC
    SCALE,  # (C,) ACC
    BIAS,  # (C,) ACC
    DPART,  # (2, N·SPLIT, C) ACC out when NEED_DP: Σ dz·(x − μ), Σ dz per row
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
    CHUNK,
    SPLIT,
    PC,  # plane stride of DPART
    ACC: tl.constexpr,
    ACT: tl.constexpr,
    NEED_DP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(MEAN + c, mask=cm, other=0.0)
    scale = tl.load(SCALE + c, mask=cm, other=0.0)
    bias = tl.load(BIAS + c, mask=cm, other=0.0)
    cc = c[:, None].to(tl.int64)
    xb = X + n.to(tl.int64) * x_sn + cc * x_sc
    dyb = DY + n.to(tl.int64) * dy_sn + cc * dy_sc
    dxb = DX + n.to(tl.int64) * dx_sn + cc * dx_sc
    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    offs_s = tl.arange(0, BLOCK_S)
    acc_xm = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dz = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + offs_s
        mask = cm[:, None] & (s < s_hi)[None, :]
        ss = s[None, :].to(tl.int64)
        dz = tl.load(dyb + ss * dy_ss, mask=mask, other=0.0).to(ACC)
        if NEED_DP or ACT != 0:  # without both, dx = dy·s needs no x
            xm = tl.load(xb + ss * x_ss, mask=mask, other=0.0).to(ACC) - mean[:, None]
            if ACT != 0:
                z = xm * scale[:, None] + bias[:, None]
                dz = tl.where(mask, act_backward(dz, z, ACT), 0.0)
            if NEED_DP:
                acc_xm += dz * xm
                acc_dz += dz
        tl.store(dxb + ss * dx_ss, (dz * scale[:, None]).to(DX.dtype.element_ty), mask=mask)
    if NEED_DP:
        out = DPART + (n.to(tl.int64) * SPLIT + sp) * C + c
        tl.store(out, tl.reduce(acc_xm, 1, add), mask=cm)
        tl.store(out + PC, tl.reduce(acc_dz, 1, add), mask=cm)


@triton.jit
def _frozen_bn_bwd_dwdb(
    DPART,  # (2, P, C) ACC: partial Σ dz·(x − μ), Σ dz
    OUT,  # (2, C) ACC out
    P,
    C,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sum_rows(DPART, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


class _Plan:
    def __init__(self, x: Tensor, x_sc: int, x_ss: int) -> None:
        self.n, self.c, self.s = x.shape[0], x.shape[1], spatial_size(x)
        c_fast = channels_fastest(x_sc, x_ss, self.s)
        self.block_c, self.block_s = tile(self.c, self.s, c_fast, tile_size(x.device))
        self.cb = triton.cdiv(self.c, self.block_c)
        rows = self.n * self.cb
        if rows < target_programs(x.device):
            self.split, self.chunk = split_spatial(rows, self.s, self.block_s, x.device)
        else:
            self.split, self.chunk = 1, self.s
        self.grid = (rows, self.split)
        self.warps = num_warps(self.block_c * self.block_s)


class FrozenBatchNormFunction(torch.autograd.Function):
    """``act((x − μ)·s + β)`` per channel; μ, s, β are (C,) tensors in the accumulation
    dtype, differentiable (autograd carries their gradients to γ, β, running stats)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, mean: Tensor, scale: Tensor, bias: Tensor, act: int
    ) -> Tensor:
        x, x_sn, x_sc, x_ss = ncs(x)
        y = empty_like(x)
        _, y_sn, y_sc, y_ss = ncs(y)
        plan = _Plan(x, x_sc, x_ss)
        if x.numel() > 0:
            _frozen_bn_fwd[plan.grid](
                x, y, mean, scale, bias, x_sn, x_sc, x_ss, y_sn, y_sc, y_ss,
                plan.c, plan.s, plan.cb, plan.chunk,
                ACC=tl_acc(x.dtype), ACT=act, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                num_warps=plan.warps,
            )  # fmt: skip
        ctx.save_for_backward(x, mean, scale, bias)
        ctx.act = act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, scale, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dp = any(need[1:4])
        x, x_sn, x_sc, x_ss = ncs(x)
        dy, dy_sn, dy_sc, dy_ss = ncs(dy)
        dx = empty_like(x)
        _, dx_sn, dx_sc, dx_ss = ncs(dx)
        plan = _Plan(x, x_sc, x_ss)
        acc = mean.dtype
        rows = plan.n * plan.split
        if x.numel() == 0:
            sums = torch.zeros((2, plan.c), dtype=acc, device=x.device)
        else:
            dpart = empty((2, rows, plan.c), acc, x.device) if need_dp else mean
            _frozen_bn_bwd[plan.grid](
                x, dy, dx, mean, scale, bias, dpart,
                x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
                plan.c, plan.s, plan.cb, plan.chunk, plan.split, rows * plan.c,
                ACC=tl_acc(x.dtype), ACT=ctx.act, NEED_DP=need_dp,
                BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.warps,
            )  # fmt: skip
            sums = sum_partials(_frozen_bn_bwd_dwdb, dpart) if need_dp else None
        dmean = dscale = dbias = None
        if sums is not None:
            dmean = -scale * sums[1] if need[1] else None
            dscale = sums[0] if need[2] else None
            dbias = sums[1] if need[3] else None
        return (dx if need[0] else None, dmean, dscale, dbias, None)


def frozen_batch_norm_triton(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
    act: str | None = None,
) -> Tensor:
    """``act((x − running_mean)·γ/sqrt(running_var + eps) + β)`` via
    :class:`FrozenBatchNormFunction`; (N, C, \\*spatial) input, any memory format."""
    check_dtype("frozen_batch_norm (triton)", input)
    code = act_code(act)
    if input.dim() < 2:
        raise ValueError(
            f"frozen_batch_norm (triton): expected (N, C, *spatial), got {tuple(input.shape)}."
        )
    acc = acc_dtype(input.dtype)
    scale = torch.rsqrt(running_var.to(acc).clamp_min(0) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    # Copies (C values; autograd flows through them): the Function saves these for its
    # backward, and the buffers themselves may be updated in place before it runs.
    shift = bias.to(acc).clone() if bias is not None else torch.zeros_like(scale)
    mean = running_mean.to(acc).clone()
    return FrozenBatchNormFunction.apply(input, mean, scale.contiguous(), shift, code)
