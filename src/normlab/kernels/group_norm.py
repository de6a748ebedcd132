r"""GroupNorm (+ SiLU/ReLU) in Triton: forward, backward, one autograd.Function.

Per (sample n, group g) of C/G channels, over those channels and every position:

.. math:: \hat x = (x - \mu_{n,g})\,r_{n,g}, \quad r = 1/\sqrt{\sigma^2 + \epsilon},
          \quad z = \gamma_c \hat x + \beta_c, \quad y = \mathrm{act}(z)

**Layout.** Tensors are read as (N, C, S) through their strides (see
:mod:`._common`): NCHW and channels_last go through the same kernels without a copy;
each program walks its group in (BLOCK_C, BLOCK_S) tiles laid along the contiguous axis.

**Statistics** (NUMERICS rules 1-2). Everything is shifted by a pivot, the group's
first element (exact for nearby values, so data with mean 1e4 and std 1e-2 keep their
digits); each tile gives an exact two-pass mean and M2 in registers, and tiles are
merged with Chan's parallel formula. The variance is clamped at 0 before eps.

**Parallelism.** One program per (n, g) when N·G fills the device; otherwise the
positions are split over SPLIT programs per group: ``_group_norm_fwd_stats`` writes
per-split (count, mean, M2), which every program of ``_group_norm_fwd`` merges (same
formula) before it normalizes its own chunk. With SPLIT = 1 the single program
computes the statistics itself (``ONE_PASS``) and no partial buffer exists.

**Backward**, with :math:`dz = dy\cdot \mathrm{act}'(z)`, :math:`d\hat x = dz\,\gamma`,
M = (C/G)·S elements per group:

.. math:: dx = r\,\big(d\hat x - \overline{d\hat x} - \hat x\,\overline{d\hat x\,\hat x}\big),
          \quad d\gamma_c = \textstyle\sum dz\,\hat x, \quad d\beta_c = \sum dz

The group sums come from ``_group_norm_bwd_stats`` (per split) or from the first loop of
``_group_norm_bwd_dx`` (one split). dγ and dβ: every program writes its own row of
per-channel sums into an fp32 buffer (2, N·SPLIT, C) and ``_group_norm_bwd_dwdb`` adds
the rows: deterministic, no atomics, no locks, nothing accumulated in half precision.
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

__all__ = ["GroupNormFunction", "group_norm_triton"]


@triton.jit
def _group_moments(
    xb,  # pointer to x[n, first channel of the group, 0]
    shift,  # scalar ACC: the pivot subtracted from every element
    x_sc,
    x_ss,
    CPG,
    s_lo,
    s_hi,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Count, mean and M2 of ``x − shift`` over channels [0, CPG) × positions [s_lo, s_hi)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    count = tl.full([], 0.0, ACC)
    mean = tl.full([], 0.0, ACC)
    m2 = tl.full([], 0.0, ACC)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = (c < CPG)[:, None] & (s < s_hi)[None, :]
            ptrs = xb + c[:, None].to(tl.int64) * x_sc + s[None, :].to(tl.int64) * x_ss
            d = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
            # The tile's exact two-pass moments, then Chan's merge into the running ones.
            nb = tl.reduce(mask.to(ACC), None, add)
            mb = tl.reduce(d, None, add) / nb
            e = tl.where(mask, d - mb, 0.0)
            m2b = tl.reduce(e * e, None, add)
            tot = count + nb
            delta = mb - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta * delta * (count * (nb / tot))
            count = tot
    return count, mean, m2


@triton.jit
def _group_norm_fwd_stats(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    PART,  # (3, N·G, SPLIT) ACC out: count, mean and M2 of (x − pivot) per split
    x_sn,
    x_sc,
    x_ss,
    S,
    G,
    CPG,
    SPLIT,
    CHUNK,  # positions per split
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0)
    sp = tl.program_id(1)
    n = ng // G
    g = ng % G
    xb = X + n.to(tl.int64) * x_sn + (g * CPG).to(tl.int64) * x_sc
    shift = tl.load(xb).to(ACC)
    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    count, mean, m2 = _group_moments(xb, shift, x_sc, x_ss, CPG, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S)
    plane = tl.num_programs(0) * SPLIT
    out = PART + ng * SPLIT + sp
    tl.store(out, count)
    tl.store(out + plane, mean)
    tl.store(out + 2 * plane, m2)


@triton.jit
def _group_norm_fwd(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    Y,  # (N, C, S) output in x's dtype, strides (y_sn, y_sc, y_ss)
    W,  # (C,) γ, read when HAS_W
    B,  # (C,) β, read when HAS_B
    MEAN,  # (N·G,) ACC out: mean of (x − pivot)
    RSTD,  # (N·G,) ACC out: 1/sqrt(var + eps)
    PART,  # (3, N·G, SPLIT) ACC in when not ONE_PASS: count, mean, M2 per split
    x_sn,
    x_sc,
    x_ss,
    y_sn,
    y_sc,
    y_ss,
    S,
    G,
    CPG,
    SPLIT,
    CHUNK,
    eps,
    ACC: tl.constexpr,
    ONE_PASS: tl.constexpr,  # SPLIT == 1: compute the statistics here
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 SiLU, 2 ReLU
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,  # >= SPLIT
):
    ng = tl.program_id(0)
    sp = tl.program_id(1)
    n = ng // G
    g = ng % G
    c_first = g * CPG
    xb = X + n.to(tl.int64) * x_sn + c_first.to(tl.int64) * x_sc
    yb = Y + n.to(tl.int64) * y_sn + c_first.to(tl.int64) * y_sc
    shift = tl.load(xb).to(ACC)
    if ONE_PASS:
        count, mean, m2 = _group_moments(xb, shift, x_sc, x_ss, CPG, 0, S, ACC, BLOCK_C, BLOCK_S)
    else:
        # Merge the splits: mean = Σ n_i m_i / n, M2 = Σ M2_i + Σ n_i (m_i − mean)².
        p = tl.arange(0, BLOCK_P)
        pm = p < SPLIT
        plane = tl.num_programs(0) * SPLIT
        row = PART + ng * SPLIT + p
        cnt = tl.load(row, mask=pm, other=0.0)
        mu = tl.load(row + plane, mask=pm, other=0.0)
        q = tl.load(row + 2 * plane, mask=pm, other=0.0)
        count = tl.reduce(cnt, None, add)
        mean = tl.reduce(cnt * mu, None, add) / count
        dev = tl.where(pm, mu - mean, 0.0)
        m2 = tl.reduce(q, None, add) + tl.reduce(cnt * dev * dev, None, add)
    var = tl.maximum(m2 / count, 0.0)
    rstd = tl.rsqrt(var + eps)
    if sp == 0:
        tl.store(MEAN + ng, mean)
        tl.store(RSTD + ng, rstd)

    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        cm = c < CPG
        # Fold rstd into the scale: z = (x − pivot − mean)·(r·γ) + β.
        if HAS_W:
            scale = tl.load(W + c_first + c, mask=cm, other=0.0).to(ACC) * rstd
        else:
            scale = tl.full([BLOCK_C], 1.0, ACC) * rstd
        if HAS_B:
            shift_out = tl.load(B + c_first + c, mask=cm, other=0.0).to(ACC)
        else:
            shift_out = tl.full([BLOCK_C], 0.0, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = cm[:, None] & (s < s_hi)[None, :]
            cc = c[:, None].to(tl.int64)
            ss = s[None, :].to(tl.int64)
            x = tl.load(xb + cc * x_sc + ss * x_ss, mask=mask, other=0.0).to(ACC)
            y = ((x - shift) - mean) * scale[:, None] + shift_out[:, None]
            if ACT != 0:
                y = apply_act(y, ACT)
            tl.store(yb + cc * y_sc + ss * y_ss, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_bwd_sums(
    xb,  # pointer to x[n, first channel of the group, 0]
    dyb,  # pointer to dy[n, first channel of the group, 0]
    W,
    B,
    DWDB,  # (2, P, C) ACC out: this program's row of Σ dz·x̂ and Σ dz per channel
    row,
    c_first,
    shift,
    mean,
    rstd,
    x_sc,
    x_ss,
    dy_sc,
    dy_ss,
    CPG,
    s_lo,
    s_hi,
    PC,  # P·C, the plane stride of DWDB
    C,
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Σ dx̂ and Σ dx̂·x̂ over channels [0, CPG) × positions [s_lo, s_hi) of one group;
    also writes that range's dγ/dβ partial sums to row ``row`` of DWDB."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    sum1 = tl.full([], 0.0, ACC)
    sum2 = tl.full([], 0.0, ACC)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        cm = c < CPG
        if HAS_W:
            w = tl.load(W + c_first + c, mask=cm, other=0.0).to(ACC)
        else:
            w = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_B:
            b = tl.load(B + c_first + c, mask=cm, other=0.0).to(ACC)
        else:
            b = tl.full([BLOCK_C], 0.0, ACC)
        acc_dw = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
        acc_db = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
        acc1 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
        acc2 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = cm[:, None] & (s < s_hi)[None, :]
            cc = c[:, None].to(tl.int64)
            ss = s[None, :].to(tl.int64)
            x = tl.load(xb + cc * x_sc + ss * x_ss, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dyb + cc * dy_sc + ss * dy_ss, mask=mask, other=0.0).to(ACC)
            xhat = ((x - shift) - mean) * rstd
            dz = dy
            if ACT != 0:
                dz = tl.where(mask, act_backward(dy, xhat * w[:, None] + b[:, None], ACT), 0.0)
            dxhat = dz * w[:, None]
            acc_dw += dz * xhat
            acc_db += dz
            acc1 += dxhat
            acc2 += dxhat * xhat
        out = DWDB + row * C + c_first + c
        if HAS_W:
            tl.store(out, tl.reduce(acc_dw, 1, add), mask=cm)
        if HAS_B:
            tl.store(out + PC, tl.reduce(acc_db, 1, add), mask=cm)
        sum1 += tl.reduce(acc1, None, add)
        sum2 += tl.reduce(acc2, None, add)
    return sum1, sum2


@triton.jit
def _group_norm_bwd_stats(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    MEAN,  # (N·G,) ACC: mean of (x − pivot)
    RSTD,  # (N·G,) ACC
    PART,  # (2, N·G, SPLIT) ACC out: Σ dx̂ and Σ dx̂·x̂ per split
    DWDB,  # (2, N·SPLIT, C) ACC out: dγ/dβ partial rows
    x_sn,
    x_sc,
    x_ss,
    dy_sn,
    dy_sc,
    dy_ss,
    C,
    S,
    G,
    CPG,
    SPLIT,
    CHUNK,
    PC,
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0)
    sp = tl.program_id(1)
    n = ng // G
    g = ng % G
    c_first = g * CPG
    xb = X + n.to(tl.int64) * x_sn + c_first.to(tl.int64) * x_sc
    dyb = DY + n.to(tl.int64) * dy_sn + c_first.to(tl.int64) * dy_sc
    shift = tl.load(xb).to(ACC)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    row = n.to(tl.int64) * SPLIT + sp
    sum1, sum2 = _group_bwd_sums(
        xb, dyb, W, B, DWDB, row, c_first, shift, mean, rstd, x_sc, x_ss, dy_sc, dy_ss,
        CPG, s_lo, s_hi, PC, C, ACC, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S,
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
    G,
    CPG,
    SPLIT,
    CHUNK,
    PC,
    ACC: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    ng = tl.program_id(0)
    sp = tl.program_id(1)
    n = ng // G
    g = ng % G
    c_first = g * CPG
    xb = X + n.to(tl.int64) * x_sn + c_first.to(tl.int64) * x_sc
    dyb = DY + n.to(tl.int64) * dy_sn + c_first.to(tl.int64) * dy_sc
    dxb = DX + n.to(tl.int64) * dx_sn + c_first.to(tl.int64) * dx_sc
    shift = tl.load(xb).to(ACC)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    if ONE_PASS:
        sum1, sum2 = _group_bwd_sums(
            xb, dyb, W, B, DWDB, n.to(tl.int64), c_first, shift, mean, rstd, x_sc, x_ss,
            dy_sc, dy_ss, CPG, 0, S, PC, C, ACC, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S,
        )  # fmt: skip
    else:
        p = tl.arange(0, BLOCK_P)
        pm = p < SPLIT
        plane = tl.num_programs(0) * SPLIT
        sum1 = tl.reduce(tl.load(PART + ng * SPLIT + p, mask=pm, other=0.0), None, add)
        sum2 = tl.reduce(tl.load(PART + plane + ng * SPLIT + p, mask=pm, other=0.0), None, add)
    c1 = sum1 / (CPG * S)
    c2 = sum2 / (CPG * S)

    s_lo = sp * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, S)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        cm = c < CPG
        if HAS_W:
            w = tl.load(W + c_first + c, mask=cm, other=0.0).to(ACC)
        else:
            w = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_B:
            b = tl.load(B + c_first + c, mask=cm, other=0.0).to(ACC)
        else:
            b = tl.full([BLOCK_C], 0.0, ACC)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = cm[:, None] & (s < s_hi)[None, :]
            cc = c[:, None].to(tl.int64)
            ss = s[None, :].to(tl.int64)
            x = tl.load(xb + cc * x_sc + ss * x_ss, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dyb + cc * dy_sc + ss * dy_ss, mask=mask, other=0.0).to(ACC)
            xhat = ((x - shift) - mean) * rstd
            if ACT != 0:
                dy = act_backward(dy, xhat * w[:, None] + b[:, None], ACT)
            dxhat = dy * w[:, None]
            dx = (dxhat - c1 - xhat * c2) * rstd
            tl.store(dxb + cc * dx_sc + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_dwdb(
    DWDB,  # (2, P, C) ACC: per-row partial Σ dz·x̂ (plane 0) and Σ dz (plane 1)
    OUT,  # (2, C) ACC out: dγ, dβ
    P,
    C,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sum_rows(DWDB, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


class _Plan:
    """Launch geometry shared by the forward and backward of one call."""

    def __init__(self, x: Tensor, num_groups: int, x_sc: int, x_ss: int) -> None:
        self.n, self.c = x.shape[0], x.shape[1]
        self.s = spatial_size(x)
        self.g = num_groups
        self.cpg = self.c // num_groups
        self.ng = self.n * num_groups
        c_fast = channels_fastest(x_sc, x_ss, self.s)
        self.block_c, self.block_s = tile(self.cpg, self.s, c_fast, tile_size(x.device))
        if self.ng < target_programs(x.device):
            self.split, self.chunk = split_spatial(self.ng, self.s, self.block_s, x.device)
        else:
            self.split, self.chunk = 1, self.s
        self.block_p = triton.next_power_of_2(self.split)
        self.warps = num_warps(self.block_c * self.block_s)


def _forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, act: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, x_sn, x_sc, x_ss = ncs(x)
    plan = _Plan(x, num_groups, x_sc, x_ss)
    acc = acc_dtype(x.dtype)
    y = empty_like(x)
    _, y_sn, y_sc, y_ss = ncs(y)
    mean = empty((plan.ng,), acc, x.device)
    rstd = empty((plan.ng,), acc, x.device)
    if x.numel() == 0:
        return x, y, mean, rstd
    one_pass = plan.split == 1
    part = mean if one_pass else empty((3, plan.ng, plan.split), acc, x.device)
    grid = (plan.ng, plan.split)
    common: dict[str, Any] = dict(ACC=tl_acc(x.dtype), BLOCK_C=plan.block_c, BLOCK_S=plan.block_s)
    if not one_pass:
        _group_norm_fwd_stats[grid](
            x, part, x_sn, x_sc, x_ss, plan.s, plan.g, plan.cpg, plan.split, plan.chunk,
            num_warps=plan.warps, **common,
        )  # fmt: skip
    _group_norm_fwd[grid](
        x, y,
        x if weight is None else weight,
        x if bias is None else bias,
        mean, rstd, part,
        x_sn, x_sc, x_ss, y_sn, y_sc, y_ss,
        plan.s, plan.g, plan.cpg, plan.split, plan.chunk, eps,
        ONE_PASS=one_pass, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
        BLOCK_P=plan.block_p, num_warps=plan.warps, **common,
    )  # fmt: skip
    return x, y, mean, rstd


def _backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    act: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    x, x_sn, x_sc, x_ss = ncs(x)
    dy, dy_sn, dy_sc, dy_ss = ncs(dy)
    plan = _Plan(x, num_groups, x_sc, x_ss)
    acc = acc_dtype(x.dtype)
    dx = empty_like(x)
    _, dx_sn, dx_sc, dx_ss = ncs(dx)
    has_w, has_b = weight is not None, bias is not None
    if x.numel() == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        return dx, dw, db
    one_pass = plan.split == 1
    rows = plan.n * plan.split
    dwdb = empty((2, rows, plan.c), acc, x.device) if has_w or has_b else mean
    part = mean if one_pass else empty((2, plan.ng, plan.split), acc, x.device)
    grid = (plan.ng, plan.split)
    pc = rows * plan.c
    wb = (x if weight is None else weight, x if bias is None else bias)
    common: dict[str, Any] = dict(
        ACC=tl_acc(x.dtype), HAS_W=has_w, HAS_B=has_b, ACT=act,
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.warps,
    )  # fmt: skip
    if not one_pass:
        _group_norm_bwd_stats[grid](
            x, dy, *wb, mean, rstd, part, dwdb,
            x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss,
            plan.c, plan.s, plan.g, plan.cpg, plan.split, plan.chunk, pc, **common,
        )  # fmt: skip
    _group_norm_bwd_dx[grid](
        x, dy, dx, *wb, mean, rstd, part, dwdb,
        x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
        plan.c, plan.s, plan.g, plan.cpg, plan.split, plan.chunk, pc,
        ONE_PASS=one_pass, BLOCK_P=plan.block_p, **common,
    )  # fmt: skip
    dw = db = None
    if has_w or has_b:
        sums = sum_partials(_group_norm_bwd_dwdb, dwdb)
        dw = None if weight is None else sums[0].to(weight.dtype)
        db = None if bias is None else sums[1].to(bias.dtype)
    return dx, dw, db


class GroupNormFunction(torch.autograd.Function):
    """``act(group_norm(x, G, γ, β, eps))`` with the kernels above; saves x, γ, β and the
    (N·G,) statistics, recomputes x̂ and z in the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
        act: int,
    ) -> Tensor:
        x, y, mean, rstd = _forward(x, weight, bias, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        ctx.act = act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if need[2] else None,
            None,
            None,
            None,
        )


def group_norm_triton(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    act: str | None = None,
) -> Tensor:
    """``act(group_norm(...))`` through :class:`GroupNormFunction`; (N, C, \\*spatial) input."""
    check_dtype("group_norm (triton)", input)
    code = act_code(act)
    if input.dim() < 2 or num_groups < 1 or input.shape[1] % num_groups != 0:
        raise ValueError(
            f"group_norm (triton): expected (N, C, *spatial) input with C divisible by "
            f"num_groups={num_groups}, got shape {tuple(input.shape)}."
        )
    return GroupNormFunction.apply(input, weight, bias, num_groups, float(eps), code)
