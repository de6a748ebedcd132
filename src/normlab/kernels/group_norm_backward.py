"""GroupNorm backward: the gradient kernels and their launcher.

The formulas and the deterministic dγ/dβ reduction are described in :mod:`.group_norm`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._core.stats import acc_dtype
from ._common import (
    empty,
    empty_like,
    ncs,
    sum_partials,
    tl_acc,
)
from ._jit import (
    grad_rows,
    grad_tile,
    group_grad_input,
    group_grad_terms,
    io_rows,
    store_dwdb,
    sum_rows,
    total,
)
from .group_norm_forward import group_channels, group_program, piece, plan
from .group_norm_packed import _group_norm_packed_bwd

__all__ = ["gradients"]


@triton.jit
def _group_bwd_sums(
    xb,  # pointer to x[n, first channel of the group, 0]
    dyb,  # pointer to dy[n, first channel of the group, 0]
    W, B,
    DWDB,  # (2, P, C) ACC out: this program's row of Σ dz·x̂ and Σ dz per channel
    row, c_first, shift, mean, rstd,
    x_sc, x_ss, dy_sc, dy_ss,
    c_lo, c_hi, s_lo, s_hi,
    PC,  # P·C, the plane stride of DWDB
    C,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Σ dx̂ and Σ dx̂·x̂ over channels [c_lo, c_hi) × positions [s_lo, s_hi) of one group
    (per-lane accumulators, one reduction at the end); also writes those channels' dγ/dβ
    partial sums to row ``row`` of DWDB."""
    acc1 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc2 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c, cm, w, b = group_channels(c0, c_hi, c_first, W, B, HAS_W, HAS_B, ACC, BLOCK_C)
        acc_dw = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
        acc_db = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
        cc = c[:, None].to(tl.int64)
        xc, dyc = xb + cc * x_sc, dyb + cc * dy_sc
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss, mask, x, dy = grad_tile(xc, x_ss, dyc, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
            xhat, dz = group_grad_terms(x, dy, mask, shift, mean, rstd, w, b, ACT)
            dxhat = dz * w[:, None]
            acc_dw += dz * xhat
            acc_db += dz
            acc1 += dxhat
            acc2 += dxhat * xhat
        store_dwdb(DWDB + row * C + c_first + c, acc_dw, acc_db, cm, PC, HAS_W, HAS_B)
    return total(acc1, None), total(acc2, None)


@triton.jit
def _group_norm_bwd_stats(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    MEAN,  # (N·G,) ACC: mean of (x − pivot)
    RSTD,  # (N·G,) ACC
    PART,  # (2, N·G, SPLIT) ACC out: Σ dx̂ and Σ dx̂·x̂ per split
    DWDB,  # (2, N·SPLIT_S, C) ACC out: dγ/dβ partial rows
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    C, S, G, CPG, SPLIT, SPLIT_S, CHUNK_C, CHUNK_S, PC,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    ng, sp, n, c_first = group_program(G, CPG)
    xb, dyb = io_rows(X, DY, n, c_first, x_sn, x_sc, dy_sn, dy_sc)
    shift = tl.load(xb).to(ACC)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    c_lo, c_hi, s_lo, s_hi, si = piece(sp, SPLIT_S, CPG, S, CHUNK_C, CHUNK_S)
    # Row (n, position chunk) of DWDB: the channel chunks of a group write disjoint columns.
    row = n.to(tl.int64) * SPLIT_S + si
    sum1, sum2 = _group_bwd_sums(
        xb, dyb, W, B, DWDB, row, c_first, shift, mean, rstd, x_sc, x_ss, dy_sc, dy_ss,
        c_lo, c_hi, s_lo, s_hi, PC, C, ACC, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S,
    )  # fmt: skip
    plane = tl.num_programs(0) * SPLIT
    tl.store(PART + ng * SPLIT + sp, sum1)
    tl.store(PART + plane + ng * SPLIT + sp, sum2)


@triton.jit
def _group_norm_bwd_dx(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    DX,  # (N, C, S) out, x's dtype
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    MEAN,  # (N·G,) ACC
    RSTD,  # (N·G,) ACC
    PART,  # (2, N·G, SPLIT) ACC in when not ONE_PASS: Σ dx̂, Σ dx̂·x̂ per split
    DWDB,  # (2, N, C) ACC out when ONE_PASS: dγ/dβ partial rows
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    dx_sn, dx_sc, dx_ss,
    C, S, G, CPG, SPLIT, SPLIT_S, CHUNK_C, CHUNK_S, PC,
    ACC: tl.constexpr, ONE_PASS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    ng, sp, n, c_first = group_program(G, CPG)
    xb, dyb, dxb = grad_rows(X, DY, DX, n, c_first, x_sn, x_sc, dy_sn, dy_sc, dx_sn, dx_sc)
    shift = tl.load(xb).to(ACC)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    if ONE_PASS:
        sum1, sum2 = _group_bwd_sums(
            xb, dyb, W, B, DWDB, n.to(tl.int64), c_first, shift, mean, rstd, x_sc, x_ss,
            dy_sc, dy_ss, 0, CPG, 0, S, PC, C, ACC, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S,
        )  # fmt: skip
    else:
        p = tl.arange(0, BLOCK_P)
        pm = p < SPLIT
        plane = tl.num_programs(0) * SPLIT
        sum1 = total(tl.load(PART + ng * SPLIT + p, mask=pm, other=0.0), None)
        sum2 = total(tl.load(PART + plane + ng * SPLIT + p, mask=pm, other=0.0), None)
    c1 = sum1 / (CPG * S)
    c2 = sum2 / (CPG * S)

    c_lo, c_hi, s_lo, s_hi, _ = piece(sp, SPLIT_S, CPG, S, CHUNK_C, CHUNK_S)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c, cm, w, b = group_channels(c0, c_hi, c_first, W, B, HAS_W, HAS_B, ACC, BLOCK_C)
        cc = c[:, None].to(tl.int64)
        xc, dyc = xb + cc * x_sc, dyb + cc * dy_sc
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss, mask, x, dy = grad_tile(xc, x_ss, dyc, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
            dx = group_grad_input(x, dy, shift, mean, rstd, w, b, c1, c2, ACT)
            tl.store(dxb + cc * dx_sc + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_dwdb(
    DWDB,  # (2, P, C) ACC: per-row partial Σ dz·x̂ (plane 0) and Σ dz (plane 1)
    OUT,  # (2, C) ACC out: dγ, dβ
    P, C,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    sum_rows(DWDB, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


def gradients(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    act: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dγ, dβ)`` from the forward's saved ``x``, ``mean`` and ``rstd``; dγ/dβ are
    None where ``weight`` / ``bias`` are."""
    x, x_sn, x_sc, x_ss = ncs(x)
    dy, dy_sn, dy_sc, dy_ss = ncs(dy)
    p = plan(x, num_groups, x_sc, x_ss)
    acc = acc_dtype(x.dtype)
    dx = empty_like(x)
    _, dx_sn, dx_sc, dx_ss = ncs(dx)
    has_w, has_b = weight is not None, bias is not None
    if x.numel() == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        return dx, dw, db
    one_pass = p.split == 1
    rows = p.n * p.split_s
    dwdb = empty((2, rows, p.c), acc, x.device) if has_w or has_b else mean
    part = mean if one_pass else empty((2, p.n * num_groups, p.split), acc, x.device)
    pc = rows * p.c
    wb = (x if weight is None else weight, x if bias is None else bias)
    common: dict[str, Any] = dict(
        ACC=tl_acc(x.dtype), HAS_W=has_w, HAS_B=has_b, ACT=act,
        BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
    )  # fmt: skip
    if p.pack > 1:
        packed = (p.c, p.s, num_groups, p.cpg, p.per_sample, p.pack, p.chunk, p.split)
        args = (
            x, dy, dx, *wb, mean, rstd, part, dwdb, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss,
            dx_sn, dx_sc, dx_ss, *packed, p.n * num_groups * p.split, pc,
        )  # fmt: skip
        common.update(BLOCK_G=triton.next_power_of_2(p.pack), BLOCK_P=p.block_p)
        if not one_pass:
            _group_norm_packed_bwd[p.grid](*args, SUMS=True, DX_PASS=False, **common)
        _group_norm_packed_bwd[p.grid](*args, SUMS=one_pass, DX_PASS=True, **common)
    elif not one_pass:
        _group_norm_bwd_stats[p.grid](
            x, dy, *wb, mean, rstd, part, dwdb,
            x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss,
            p.c, p.s, num_groups, p.width, p.split, p.split_s, p.chunk_c, p.chunk_s, pc,
            **common,
        )  # fmt: skip
    if p.pack == 1:
        _group_norm_bwd_dx[p.grid](
            x, dy, dx, *wb, mean, rstd, part, dwdb,
            x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
            p.c, p.s, num_groups, p.width, p.split, p.split_s, p.chunk_c, p.chunk_s, pc,
            ONE_PASS=one_pass, BLOCK_P=p.block_p, **common,
        )  # fmt: skip
    dw = db = None
    if has_w or has_b:
        sums = sum_partials(_group_norm_bwd_dwdb, dwdb)
        dw = None if weight is None else sums[0].to(weight.dtype)
        db = None if bias is None else sums[1].to(bias.dtype)
    return dx, dw, db
