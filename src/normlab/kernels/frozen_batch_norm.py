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

from .._core.stats import acc_dtype
from ._common import (
    channel_plan,
    empty,
    empty_like,
    kernel_backward,
    kernel_forward,
    ncs,
    sum_partials,
    tl_acc,
)
from ._jit import (
    act_backward,
    apply_act,
    channel_block,
    grad_rows,
    io_rows,
    load_tile,
    s_range,
    s_tile,
    sum_rows,
    total,
)

__all__ = ["FrozenBatchNormTriton", "affine_vectors"]


@triton.jit
def _frozen_bn_fwd(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    Y,  # (N, C, S) output in x's dtype
    MEAN,  # (C,) ACC μ
    SCALE,  # (C,) ACC s = γ/sqrt(var + eps)
    BIAS,  # (C,) ACC β
    x_sn, x_sc, x_ss,
    y_sn, y_sc, y_ss,
    C, S,
    CB,  # channel blocks per sample
    CHUNK,  # positions per program along axis 1
    ACC: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    mean = tl.load(MEAN + c, mask=cm, other=0.0)
    scale = tl.load(SCALE + c, mask=cm, other=0.0)
    bias = tl.load(BIAS + c, mask=cm, other=0.0)
    xb, yb = io_rows(X, Y, n, c[:, None], x_sn, x_sc, y_sn, y_sc)
    s_lo, s_hi = s_range(S, CHUNK)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        x = load_tile(xb, ss, x_ss, mask, ACC)
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
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    dx_sn, dx_sc, dx_ss,
    C, S, CB, CHUNK, SPLIT,
    PC,  # plane stride of DPART
    ACC: tl.constexpr, ACT: tl.constexpr, NEED_DP: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    sp = tl.program_id(1)
    mean = tl.load(MEAN + c, mask=cm, other=0.0)
    scale = tl.load(SCALE + c, mask=cm, other=0.0)
    bias = tl.load(BIAS + c, mask=cm, other=0.0)
    xb, dyb, dxb = grad_rows(X, DY, DX, n, c[:, None], x_sn, x_sc, dy_sn, dy_sc, dx_sn, dx_sc)
    s_lo, s_hi = s_range(S, CHUNK)
    acc_xm = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dz = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        dz = load_tile(dyb, ss, dy_ss, mask, ACC)
        if NEED_DP or ACT != 0:  # without both, dx = dy·s needs no x
            xm = load_tile(xb, ss, x_ss, mask, ACC) - mean[:, None]
            if ACT != 0:
                z = xm * scale[:, None] + bias[:, None]
                dz = tl.where(mask, act_backward(dz, z, ACT), 0.0)
            if NEED_DP:
                acc_xm += dz * xm
                acc_dz += dz
        tl.store(dxb + ss * dx_ss, (dz * scale[:, None]).to(DX.dtype.element_ty), mask=mask)
    if NEED_DP:
        out = DPART + (n.to(tl.int64) * SPLIT + sp) * C + c
        tl.store(out, total(acc_xm, 1), mask=cm)
        tl.store(out + PC, total(acc_dz, 1), mask=cm)


@triton.jit
def _frozen_bn_bwd_dwdb(
    DPART,  # (2, P, C) ACC: partial Σ dz·(x − μ), Σ dz
    OUT,  # (2, C) ACC out
    P, C,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    sum_rows(DPART, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


class FrozenBatchNormTriton(torch.autograd.Function):
    """``act((x − μ)·s + β)`` per channel; μ, s, β are (C,) tensors in the accumulation
    dtype (see :func:`affine_vectors`), ``act`` the kernels' code (0 none, 1 SiLU,
    2 ReLU)."""

    @staticmethod
    @kernel_forward
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, mean: Tensor, scale: Tensor, bias: Tensor, act: int
    ) -> Tensor:
        x, x_sn, x_sc, x_ss = ncs(x)
        y = empty_like(x)
        _, y_sn, y_sc, y_ss = ncs(y)
        p = channel_plan(x, x_sc, x_ss)
        if x.numel() > 0:
            _frozen_bn_fwd[p.grid](
                x, y, mean, scale, bias, x_sn, x_sc, x_ss, y_sn, y_sc, y_ss,
                p.c, p.s, p.per_sample, p.chunk,
                ACC=tl_acc(x.dtype), ACT=act, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
                num_warps=p.warps,
            )  # fmt: skip
        ctx.save_for_backward(x, mean, scale, bias)
        ctx.act = act
        return y

    @staticmethod
    @kernel_backward("frozen_batch_norm (triton)")
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, scale, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dp = any(need[1:4])
        x, x_sn, x_sc, x_ss = ncs(x)
        dy, dy_sn, dy_sc, dy_ss = ncs(dy)
        dx = empty_like(x)
        _, dx_sn, dx_sc, dx_ss = ncs(dx)
        p = channel_plan(x, x_sc, x_ss)
        acc = mean.dtype
        rows = p.n * p.split
        if x.numel() == 0:
            sums = torch.zeros((2, p.c), dtype=acc, device=x.device)
        else:
            dpart = empty((2, rows, p.c), acc, x.device) if need_dp else mean
            _frozen_bn_bwd[p.grid](
                x, dy, dx, mean, scale, bias, dpart,
                x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
                p.c, p.s, p.per_sample, p.chunk, p.split, rows * p.c,
                ACC=tl_acc(x.dtype), ACT=ctx.act, NEED_DP=need_dp,
                BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
            )  # fmt: skip
            sums = sum_partials(_frozen_bn_bwd_dwdb, dpart) if need_dp else None
        dmean = dscale = dbias = None
        if sums is not None:
            dmean = -scale * sums[1] if need[1] else None
            dscale = sums[0] if need[2] else None
            dbias = sums[1] if need[3] else None
        return (dx if need[0] else None, dmean, dscale, dbias, None)


def affine_vectors(
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(μ, s, β)``, the (C,) arguments of :class:`FrozenBatchNormTriton` for input of
    ``dtype``, in its accumulation dtype and differentiable (autograd carries their
    gradients to γ, β and the running statistics).

    μ and β are copies: the Function saves them for its backward, and the buffers
    themselves may be updated in place before it runs.
    """
    acc = acc_dtype(dtype)
    scale = torch.rsqrt(running_var.to(acc).clamp_min(0) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = bias.to(acc).clone() if bias is not None else torch.zeros_like(scale)
    return running_mean.to(acc).clone().contiguous(), scale.contiguous(), shift.contiguous()
