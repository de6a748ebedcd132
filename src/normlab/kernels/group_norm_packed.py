"""channels_last GroupNorm with several groups per program: forward and backward kernels.

With channels the contiguous axis and few channels per group (C/G = 10, 20, 40 in
diffusion UNets), one group per program loads rows of C/G contiguous channels into a
tile of next_power_of_2(C/G) lanes: 62 % of the lanes used at C/G = 10. Here a program
owns PACK consecutive groups (:func:`.group_norm_forward.groups_per_program` picks PACK
to fill the lanes), so each tile row is PACK·C/G contiguous channels; every lane keeps
its own Welford accumulators and the per-channel results are merged into per-group ones
through a one-hot (channel, group) mask. The statistics, the split along S and the
partial buffers are those of :mod:`.group_norm` (the same MEAN/RSTD and the same
(3, N·G, SPLIT) / (2, N·SPLIT, C) layouts), so the launchers there call these kernels
in place of the one-group ones.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    apply_act,
    grad_tile,
    group_grad_input,
    group_grad_terms,
    load_channels,
    load_tile,
    rows_at,
    s_range,
    s_tile,
    store_dwdb,
    total,
)
from ._moments import channel_moments

__all__: list[str] = []


@triton.jit
def _lanes(GB, CPG, G, C, PACK, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """``(n, c, cm, gc, g, gm, oh)`` of a program of a (N·GB, SPLIT) grid: its sample, its
    channels and their mask, each channel's group, its groups and their mask, and the
    one-hot (BLOCK_C, BLOCK_G) mask of channel-in-group."""
    pid = tl.program_id(0)
    n = pid // GB
    g0 = (pid % GB) * PACK
    lane = tl.arange(0, BLOCK_C)
    local = lane // CPG
    c = g0 * CPG + lane
    cm = (local < PACK) & (c < C)
    gi = tl.arange(0, BLOCK_G)
    g = g0 + gi
    gm = (gi < PACK) & (g < G)
    oh = (local[:, None] == gi[None, :]) & cm[:, None]
    return n, c, cm, g0 + local, g, gm, oh


@triton.jit
def _packed_x(X, n, c, cm, gc, CPG, x_sn, x_sc, ACC: tl.constexpr):
    """``(xb, shift)``: where x's rows of the program's channels start, and each channel's
    pivot, the first element of its group (x[n, gc·CPG, 0])."""
    xn = X + n.to(tl.int64) * x_sn
    shift = tl.load(xn + (gc * CPG).to(tl.int64) * x_sc, mask=cm, other=0.0).to(ACC)
    return xn + c[:, None].to(tl.int64) * x_sc, shift


@triton.jit
def _to_groups(v, oh):
    """Per-channel values (BLOCK_C,) summed per group (BLOCK_G,)."""
    return total(tl.where(oh, v[:, None], 0.0), 0)


@triton.jit
def _to_channels(vg, oh):
    """Per-group values (BLOCK_G,) broadcast to their channels (BLOCK_C,)."""
    return total(tl.where(oh, vg[None, :], 0.0), 1)


@triton.jit
def _packed_moments(
    xb, shift,
    x_ss,
    cm, oh, s_lo, s_hi,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Per-group count, mean, M2 of x − pivot over positions [s_lo, s_hi)."""
    cnt, mean, m2 = channel_moments(xb, shift, x_ss, cm, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S)
    cnt_g = _to_groups(cnt, oh)
    mean_g = _to_groups(cnt * mean, oh) / tl.maximum(cnt_g, 1.0)
    dev = mean - _to_channels(mean_g, oh)
    return cnt_g, mean_g, _to_groups(m2 + cnt * dev * dev, oh)


@triton.jit
def _group_norm_packed_fwd_stats(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    PART,  # (3, N·G, SPLIT) ACC out: count, mean, M2 of (x − pivot) per chunk
    x_sn, x_sc, x_ss,
    C, S, G, CPG,
    GB,  # group blocks per sample
    PACK,  # groups per program
    CHUNK, SPLIT,
    PLANE,  # N·G·SPLIT, the plane stride of PART
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    n, c, cm, gc, g, gm, oh = _lanes(GB, CPG, G, C, PACK, BLOCK_C, BLOCK_G)
    xb, shift = _packed_x(X, n, c, cm, gc, CPG, x_sn, x_sc, ACC)
    s_lo, s_hi = s_range(S, CHUNK)
    cnt, mean, m2 = _packed_moments(xb, shift, x_ss, cm, oh, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S)
    out = PART + (n.to(tl.int64) * G + g) * SPLIT + tl.program_id(1)
    tl.store(out, cnt, mask=gm)
    tl.store(out + PLANE, mean, mask=gm)
    tl.store(out + 2 * PLANE, m2, mask=gm)


@triton.jit
def _group_norm_packed_fwd(
    X,  # (N, C, S) input
    Y,  # (N, C, S) output in x's dtype
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    MEAN,  # (N·G,) ACC out: mean of (x − pivot)
    RSTD,  # (N·G,) ACC out
    PART,  # (3, N·G, SPLIT) ACC in when not ONE_PASS
    x_sn, x_sc, x_ss,
    y_sn, y_sc, y_ss,
    C, S, G, CPG, GB, PACK, CHUNK, SPLIT, PLANE, eps,
    ACC: tl.constexpr, ONE_PASS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    n, c, cm, gc, g, gm, oh = _lanes(GB, CPG, G, C, PACK, BLOCK_C, BLOCK_G)
    xb, shift = _packed_x(X, n, c, cm, gc, CPG, x_sn, x_sc, ACC)
    yb = rows_at(Y, n, c[:, None], y_sn, y_sc)
    ng = n.to(tl.int64) * G + g
    if ONE_PASS:
        count, mean, m2 = _packed_moments(xb, shift, x_ss, cm, oh, 0, S, ACC, BLOCK_C, BLOCK_S)
    else:
        # Merge the chunks: mean = Σ n_i m_i / n, M2 = Σ M2_i + Σ n_i (m_i − mean)².
        p = tl.arange(0, BLOCK_P)
        pm = gm[:, None] & (p < SPLIT)[None, :]
        rows = PART + ng[:, None] * SPLIT + p[None, :]
        cnt = tl.load(rows, mask=pm, other=0.0)
        mu = tl.load(rows + PLANE, mask=pm, other=0.0)
        q = tl.load(rows + 2 * PLANE, mask=pm, other=0.0)
        count = total(cnt, 1)
        mean = total(cnt * mu, 1) / tl.maximum(count, 1.0)
        dev = tl.where(pm, mu - mean[:, None], 0.0)
        m2 = total(q, 1) + total(cnt * dev * dev, 1)
    rstd = tl.rsqrt(tl.maximum(m2 / tl.maximum(count, 1.0), 0.0) + eps)
    if tl.program_id(1) == 0:
        tl.store(MEAN + ng, mean, mask=gm)
        tl.store(RSTD + ng, rstd, mask=gm)
    mean_c = _to_channels(mean, oh)
    scale = load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C) * _to_channels(rstd, oh)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    s_lo, s_hi = s_range(S, CHUNK)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        x = load_tile(xb, ss, x_ss, mask, ACC)
        y = ((x - shift[:, None]) - mean_c[:, None]) * scale[:, None] + bias[:, None]
        if ACT != 0:
            y = apply_act(y, ACT)
        tl.store(yb + ss * y_ss, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _packed_bwd_sums(
    xb, dyb, W, B, DWDB, row, c, cm, oh, shift, mean_c, rstd_c, x_ss, dy_ss, s_lo, s_hi,
    PC, C, ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Per-group Σ dx̂ and Σ dx̂·x̂ over positions [s_lo, s_hi) (per-lane accumulators);
    also writes the program's channels of row ``row`` of the dγ/dβ partial buffer."""
    w = load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    b = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    acc1 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc2 = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dw = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_db = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask, x, dy = grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
        xhat, dz = group_grad_terms(
            x, dy, mask, shift[:, None], mean_c[:, None], rstd_c[:, None], w, b, ACT
        )
        dxhat = dz * w[:, None]
        acc_dw += dz * xhat
        acc_db += dz
        acc1 += dxhat
        acc2 += dxhat * xhat
    store_dwdb(DWDB + row * C + c, acc_dw, acc_db, cm, PC, HAS_W, HAS_B)
    return _to_groups(total(acc1, 1), oh), _to_groups(total(acc2, 1), oh)


@triton.jit
def _group_norm_packed_bwd(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    DX,  # (N, C, S) out, x's dtype (when DX_PASS)
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    MEAN,  # (N·G,) ACC
    RSTD,  # (N·G,) ACC
    PART,  # (2, N·G, SPLIT) ACC: Σ dx̂, Σ dx̂·x̂ per chunk (out in the sums pass, in after)
    DWDB,  # (2, N·SPLIT, C) ACC out (in the pass that reduces): dγ/dβ partial rows
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    dx_sn, dx_sc, dx_ss,
    C, S, G, CPG, GB, PACK, CHUNK, SPLIT,
    PLANE,  # N·G·SPLIT, the plane stride of PART
    PC,  # N·SPLIT·C, the plane stride of DWDB
    ACC: tl.constexpr,
    SUMS: tl.constexpr,  # reduce this program's chunk (and write DWDB)
    DX_PASS: tl.constexpr,  # write dx of this program's chunk
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One kernel, three uses: the sums pass of a split (SUMS), the dx pass of a split
    (DX_PASS, reading the chunks' sums) and, with SPLIT = 1, both in one program."""
    n, c, cm, gc, g, gm, oh = _lanes(GB, CPG, G, C, PACK, BLOCK_C, BLOCK_G)
    xb, shift = _packed_x(X, n, c, cm, gc, CPG, x_sn, x_sc, ACC)
    dyb = rows_at(DY, n, c[:, None], dy_sn, dy_sc)
    ngc = n.to(tl.int64) * G + gc
    mean_c = tl.load(MEAN + ngc, mask=cm, other=0.0)
    rstd_c = tl.load(RSTD + ngc, mask=cm, other=0.0)
    ng = n.to(tl.int64) * G + g
    sp = tl.program_id(1)
    s_lo, s_hi = s_range(S, CHUNK)
    if SUMS:
        sum1, sum2 = _packed_bwd_sums(
            xb, dyb, W, B, DWDB, n.to(tl.int64) * SPLIT + sp, c, cm, oh, shift, mean_c, rstd_c,
            x_ss, dy_ss, s_lo, s_hi, PC, C, ACC, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S,
        )  # fmt: skip
        if not DX_PASS:
            tl.store(PART + ng * SPLIT + sp, sum1, mask=gm)
            tl.store(PART + PLANE + ng * SPLIT + sp, sum2, mask=gm)
    if DX_PASS:
        if not SUMS:
            p = tl.arange(0, BLOCK_P)
            pm = gm[:, None] & (p < SPLIT)[None, :]
            rows = PART + ng[:, None] * SPLIT + p[None, :]
            sum1 = total(tl.load(rows, mask=pm, other=0.0), 1)
            sum2 = total(tl.load(rows + PLANE, mask=pm, other=0.0), 1)
        c1 = _to_channels(sum1, oh) / (CPG * S)
        c2 = _to_channels(sum2, oh) / (CPG * S)
        w = load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
        b = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
        dxb = rows_at(DX, n, c[:, None], dx_sn, dx_sc)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss, mask, x, dy = grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
            dx = group_grad_input(
                x, dy, shift[:, None], mean_c[:, None], rstd_c[:, None], w, b,
                c1[:, None], c2[:, None], ACT,
            )  # fmt: skip
            tl.store(dxb + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)
