"""Switchable Norm kernels and their launchers: statistics (+ the merge of split
chunks), apply, the backward's sums and dx.

The math, the numerics and the parallelism are described in :mod:`.switchable_norm`.
Every launcher takes the call's :class:`._common.Plan` and ``x`` as the kernels read it
(:func:`._common.ncs`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Plan,
    empty,
    empty_like,
    ncs,
    sum_partials,
    tile_size,
    tl_acc,
)
from ._jit import (
    channel_block,
    grad_rows,
    grad_tile,
    io_rows,
    load_channels,
    load_tile,
    rows_at,
    s_range,
    s_tile,
    sum_rows,
    total,
)
from ._moments import channel_moments

__all__ = ["apply", "grad_input", "grad_sums", "moments"]


@triton.jit
def _pivot(X, n, c, cm, x_sn, x_sc, ACC: tl.constexpr):
    """The pivot of each (n, c) row: its first element x[n, c, 0]."""
    return tl.load(X + n.to(tl.int64) * x_sn + c.to(tl.int64) * x_sc, mask=cm, other=0.0).to(ACC)


@triton.jit
def _switchable_norm_fwd_stats(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    STATS,  # (3, N, C) ACC out when ONE_PASS: pivot, mean of (x − pivot), biased variance
    PART,  # (2, N·SPLIT, C) ACC out when not ONE_PASS: mean and M2 of each chunk
    x_sn, x_sc, x_ss,
    C, S,
    CB,  # channel blocks per sample
    CHUNK,  # positions per chunk
    SPLIT,
    PC,  # N·C, the plane stride of STATS
    QC,  # N·SPLIT·C, the plane stride of PART
    ACC: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    xb = rows_at(X, n, c[:, None], x_sn, x_sc)
    shift = _pivot(X, n, c, cm, x_sn, x_sc, ACC)
    s_lo, s_hi = s_range(S, CHUNK)
    _, mean, m2 = channel_moments(xb, shift, x_ss, cm, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S)
    if ONE_PASS:
        out = STATS + n.to(tl.int64) * C + c
        tl.store(out, shift, mask=cm)
        tl.store(out + PC, mean, mask=cm)
        tl.store(out + 2 * PC, tl.maximum(m2 / S, 0.0), mask=cm)
    else:
        out = PART + (n.to(tl.int64) * SPLIT + tl.program_id(1)) * C + c
        tl.store(out, mean, mask=cm)
        tl.store(out + QC, m2, mask=cm)


@triton.jit
def _switchable_norm_fwd_merge(
    X,  # (N, C, S) input (its pivots)
    PART,  # (2, N·SPLIT, C) ACC: mean and M2 of (x − pivot) per chunk
    STATS,  # (3, N, C) ACC out: pivot, mean, biased variance
    x_sn, x_sc,
    C, S, CB, CHUNK, SPLIT, PC, QC,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Chan's merge of the SPLIT chunks of each row, in the order of the chunks."""
    n, c, cm = channel_block(CB, C, BLOCK_C)
    rows = PART + n.to(tl.int64) * SPLIT * C + c
    acc = tl.full([BLOCK_C], 0.0, ACC)
    for q in range(0, SPLIT):
        nq = tl.minimum(CHUNK, S - q * CHUNK).to(ACC)
        acc += nq * tl.load(rows + q * C, mask=cm, other=0.0)
    mean = acc / S
    m2 = tl.full([BLOCK_C], 0.0, ACC)
    for q in range(0, SPLIT):
        nq = tl.minimum(CHUNK, S - q * CHUNK).to(ACC)
        dev = tl.load(rows + q * C, mask=cm, other=0.0) - mean
        m2 += tl.load(rows + QC + q * C, mask=cm, other=0.0) + nq * dev * dev
    out = STATS + n.to(tl.int64) * C + c
    tl.store(out, _pivot(X, n, c, cm, x_sn, x_sc, ACC), mask=cm)
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
    x_sn, x_sc, x_ss,
    y_sn, y_sc, y_ss,
    C, S, CB, CHUNK,
    ACC: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    m = tl.load(M + nc, mask=cm, other=0.0)
    scale = tl.load(SCALE + nc, mask=cm, other=0.0)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    xb, yb = io_rows(X, Y, n, c[:, None], x_sn, x_sc, y_sn, y_sc)
    s_lo, s_hi = s_range(S, CHUNK)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        x = load_tile(xb, ss, x_ss, mask, ACC)
        y = ((x - shift[:, None]) - m[:, None]) * scale[:, None] + bias[:, None]
        tl.store(yb + ss * y_ss, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _switchable_norm_bwd_stats(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    SHIFT,  # (N, C) ACC pivot
    M,  # (N, C) ACC mixed mean minus pivot
    SUMS,  # (2, N·SPLIT, C) ACC out: Σ dy and Σ dy·((x − p) − M) of each chunk
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    C, S, CB, CHUNK, SPLIT,
    QC,  # N·SPLIT·C, the plane stride of SUMS
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    m = tl.load(M + nc, mask=cm, other=0.0)
    xb, dyb = io_rows(X, DY, n, c[:, None], x_sn, x_sc, dy_sn, dy_sc)
    s_lo, s_hi = s_range(S, CHUNK)
    acc1 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc2 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask, x, dy = grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
        acc1 += dy
        acc2 += dy * tl.where(mask, (x - shift[:, None]) - m[:, None], 0.0)
    out = SUMS + (n.to(tl.int64) * SPLIT + tl.program_id(1)) * C + c
    tl.store(out, total(acc1, 1), mask=cm)
    tl.store(out + QC, total(acc2, 1), mask=cm)


@triton.jit
def _switchable_norm_bwd_merge(
    PART,  # (2·N, SPLIT, C) ACC: S₁, S₂ of each chunk
    OUT,  # (2·N, C) ACC out: S₁, S₂ of each row
    P, C,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    sum_rows(PART, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


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
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    dx_sn, dx_sc, dx_ss,
    C, S, CB, CHUNK,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    shift = tl.load(SHIFT + nc, mask=cm, other=0.0)
    mu = tl.load(MU + nc, mask=cm, other=0.0)
    scale = tl.load(SCALE + nc, mask=cm, other=0.0)
    ga = tl.load(GA + nc, mask=cm, other=0.0)
    gb = tl.load(GB + nc, mask=cm, other=0.0)
    xb, dyb, dxb = grad_rows(X, DY, DX, n, c[:, None], x_sn, x_sc, dy_sn, dy_sc, dx_sn, dx_sc)
    s_lo, s_hi = s_range(S, CHUNK)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask, x, dy = grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
        xc = (x - shift[:, None]) - mu[:, None]
        dx = dy * scale[:, None] + ga[:, None] + gb[:, None] * xc
        tl.store(dxb + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(x: Tensor, p: Plan) -> dict[str, Any]:
    return dict(ACC=tl_acc(x.dtype), BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps)


def moments(x: Tensor, p: Plan, acc: torch.dtype) -> Tensor:
    """(3, N, C) in ``acc``: the pivot, the mean of x − pivot and its biased variance
    of every (n, c) row."""
    _, x_sn, x_sc, x_ss = ncs(x)
    n, c = p.n, p.c
    stats = empty((3, n, c), acc, x.device)
    one_pass = p.split == 1
    part = stats if one_pass else empty((2, n * p.split, c), acc, x.device)
    geometry = (c, p.s, p.per_sample, p.chunk, p.split, n * c, n * p.split * c)
    _switchable_norm_fwd_stats[p.grid](
        x, stats, part, x_sn, x_sc, x_ss, *geometry, ONE_PASS=one_pass, **_blocks(x, p)
    )
    if not one_pass:
        block = min(triton.next_power_of_2(c), 128, tile_size(x.device))
        cb = triton.cdiv(c, block)
        _switchable_norm_fwd_merge[(n * cb,)](
            x, part, stats, x_sn, x_sc, c, p.s, cb, p.chunk, p.split, n * c, n * p.split * c,
            ACC=tl_acc(x.dtype), BLOCK_C=block, num_warps=4,
        )  # fmt: skip
    return stats


def apply(
    x: Tensor, p: Plan, shift: Tensor, m: Tensor, scale: Tensor, bias: Tensor | None
) -> Tensor:
    """``y = ((x − p) − M)·scale + β`` in x's dtype and memory format."""
    _, x_sn, x_sc, x_ss = ncs(x)
    y = empty_like(x)
    _, y_sn, y_sc, y_ss = ncs(y)
    _switchable_norm_fwd[p.grid](
        x, y, shift, m, scale, x if bias is None else bias,
        x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, p.c, p.s, p.per_sample, p.chunk,
        HAS_B=bias is not None, **_blocks(x, p),
    )  # fmt: skip
    return y


def grad_sums(x: Tensor, dy: Tensor, p: Plan, shift: Tensor, m: Tensor) -> Tensor:
    """(2, N, C) in shift's dtype: S₁ = Σ_s dy and S₂ = Σ_s dy·((x − p) − M)."""
    _, x_sn, x_sc, x_ss = ncs(x)
    dy, dy_sn, dy_sc, dy_ss = ncs(dy)
    n, c = p.n, p.c
    sums = empty((2, n * p.split, c), shift.dtype, x.device)
    _switchable_norm_bwd_stats[p.grid](
        x, dy, shift, m, sums, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss,
        c, p.s, p.per_sample, p.chunk, p.split, n * p.split * c, **_blocks(x, p),
    )  # fmt: skip
    if p.split > 1:
        sums = sum_partials(_switchable_norm_bwd_merge, sums.view(2 * n, p.split, c))
    return sums.view(2, n, c)


def grad_input(
    x: Tensor, dy: Tensor, p: Plan, shift: Tensor, mu: Tensor, scale: Tensor, ga: Tensor, gb: Tensor
) -> Tensor:
    """``dx = dy·scale + ga + gb·((x − p) − μ)``, ga = dμ/S and gb = 2·dσ²/S per (n, c)."""
    _, x_sn, x_sc, x_ss = ncs(x)
    dy, dy_sn, dy_sc, dy_ss = ncs(dy)
    dx = empty_like(x)
    _, dx_sn, dx_sc, dx_ss = ncs(dx)
    _switchable_norm_bwd_dx[p.grid](
        x, dy, dx, shift, mu, scale, ga, gb,
        x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
        p.c, p.s, p.per_sample, p.chunk, **_blocks(x, p),
    )  # fmt: skip
    return dx
