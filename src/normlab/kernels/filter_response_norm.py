r"""Filter Response Normalization fused with the TLU in Triton: forward, backward, one
autograd.Function.

Per (n, c), over the S spatial positions, with e = |ε|:

.. math:: \nu^2 = \tfrac1S \sum_s x^2, \quad r = 1/\sqrt{\nu^2 + e}, \quad
          \hat x = x\,r, \quad z = \gamma_c \hat x + \beta_c, \quad
          y = \max(z, \tau_c)\ (\text{ties to } \tau)

ν² is a second moment about zero by definition (no mean is subtracted, so there is
no cancellation); it is accumulated in fp32 (fp64 for fp64 input).

**Layout.** (N, C, S) through strides; a program owns (n, a block of channels) and
walks its positions in (BLOCK_C, BLOCK_S) tiles laid along the contiguous axis, so NCHW
and channels_last are both coalesced and neither is copied.

**Parallelism** (:class:`._common.Plan`, the rule GroupNorm follows). When the
N·(channel blocks) programs alone would leave the device idle, each (n, c) row's S
positions are cut into SPLIT chunks, one program each: ``_frn_fwd_stats`` writes the
per-chunk Σ x² into an fp32 buffer (N, SPLIT, C), which every program of ``_frn_fwd``
adds in the order of the chunks (:func:`._common.sum_split`) before it normalizes its
own chunk. With SPLIT = 1 one program reduces and normalizes (``ONE_PASS``). Every
accumulator is per lane of the tile, reduced once at the end.

**Backward**: with :math:`dz = dy\,[z > \tau]`, :math:`d\hat x = dz\,\gamma` and
:math:`A = \sum_s d\hat x\,\hat x`,

.. math:: dx = r\,(d\hat x - \hat x A / S), \quad
          d\gamma = \textstyle\sum dz\,\hat x,\ d\beta = \sum dz,\ d\tau = \sum dy\,[z \le \tau],
          \quad de = -\tfrac12 \sum_{n,c} r^2 A

The four sums of each (n, chunk) are rows of one fp32 buffer (4, N·SPLIT, C), written
by ``_frn_bwd_stats`` (or by the first loop of ``_frn_bwd_dx`` when SPLIT = 1);
``_frn_bwd_dx`` adds a row's A over its chunks in a fixed order, and
``_frn_bwd_dwdb`` adds the dγ, dβ, dτ rows: deterministic, no atomics. de comes from
the (N, C) values of r and A in torch (ε reaches e = |ε| through autograd).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    channel_plan,
    empty,
    empty_like,
    kernel_backward,
    kernel_forward,
    ncs,
    tl_acc,
)
from ._jit import (
    channel_block,
    io_rows,
    load_channels,
    load_tile,
    rows_at,
    s_range,
    s_tile,
    sum_split,
    total,
)
from .filter_response_norm_backward import gradients

__all__ = ["FilterResponseNormTriton"]


@triton.jit
def _square_sums(
    xb, x_ss, cm, s_lo, s_hi, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    """Σ x² per channel over positions [s_lo, s_hi): per-lane sums, one reduction."""
    acc = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        x = load_tile(xb, ss, x_ss, mask, ACC)
        acc += x * x
    return total(acc, 1)


@triton.jit
def _frn_fwd_stats(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    PART,  # (N, SPLIT, C) ACC out: Σ x² of each chunk
    x_sn, x_sc, x_ss,
    C, S,
    CB,  # channel blocks per sample
    CHUNK,  # positions per chunk
    SPLIT,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    xb = rows_at(X, n, c[:, None], x_sn, x_sc)
    s_lo, s_hi = s_range(S, CHUNK)
    sq = _square_sums(xb, x_ss, cm, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S)
    tl.store(PART + (n.to(tl.int64) * SPLIT + tl.program_id(1)) * C + c, sq, mask=cm)


@triton.jit
def _frn_fwd(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    Y,  # (N, C, S) output in x's dtype
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    TAU,  # (C,) τ when HAS_TAU
    E,  # (1,) ACC: |ε|
    RS,  # (N, C) ACC out: r = 1/sqrt(ν² + |ε|)
    PART,  # (N, SPLIT, C) ACC in when not ONE_PASS: Σ x² per chunk
    x_sn, x_sc, x_ss,
    y_sn, y_sc, y_ss,
    C, S,
    CB,  # channel blocks per sample
    CHUNK, SPLIT,
    ACC: tl.constexpr,
    ONE_PASS: tl.constexpr,  # SPLIT == 1: reduce here
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    xb, yb = io_rows(X, Y, n, c[:, None], x_sn, x_sc, y_sn, y_sc)
    if ONE_PASS:
        sq = _square_sums(xb, x_ss, cm, 0, S, ACC, BLOCK_C, BLOCK_S)
    else:
        sq = sum_split(PART, n.to(tl.int64) * SPLIT, SPLIT, c, cm, C, ACC, BLOCK_C)
    rs = tl.rsqrt(sq / S + tl.load(E))
    if tl.program_id(1) == 0:
        tl.store(RS + n.to(tl.int64) * C + c, rs, mask=cm)
    scale = rs * load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    tau = load_channels(TAU, c, cm, HAS_TAU, 0.0, ACC, BLOCK_C)
    s_lo, s_hi = s_range(S, CHUNK)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        x = load_tile(xb, ss, x_ss, mask, ACC)
        z = x * scale[:, None] + bias[:, None]
        if HAS_TAU:
            z = tl.where(z > tau[:, None], z, tau[:, None])
        tl.store(yb + ss * y_ss, z.to(Y.dtype.element_ty), mask=mask)


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
        p = channel_plan(x, x_sc, x_ss)
        rs = empty((p.n, p.c), e.dtype, x.device)
        if x.numel() > 0:
            one_pass = p.split == 1
            part = rs if one_pass else empty((p.n, p.split, p.c), e.dtype, x.device)
            geometry = (p.c, p.s, p.per_sample, p.chunk, p.split)
            blocks: dict[str, Any] = dict(
                ACC=tl_acc(x.dtype), BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps
            )
            if not one_pass:
                _frn_fwd_stats[p.grid](x, part, x_sn, x_sc, x_ss, *geometry, **blocks)
            _frn_fwd[p.grid](
                x, y,
                x if weight is None else weight,
                x if bias is None else bias,
                x if tau is None else tau,
                e, rs, part,
                x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, *geometry,
                ONE_PASS=one_pass, HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_TAU=tau is not None, **blocks,
            )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, tau, rs)
        return y

    @staticmethod
    @kernel_backward("filter_response_norm (triton)")
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, tau, rs = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, a, sums = gradients(dy, x, weight, bias, tau, rs)
        dw = sums[0].to(weight.dtype) if need[1] else None
        db = sums[1].to(bias.dtype) if need[2] else None
        dtau = sums[2].to(tau.dtype) if need[3] else None
        de = (-0.5 * (rs * rs * a).sum()).reshape(1) if need[4] else None
        return (dx if need[0] else None, dw, db, dtau, de)
