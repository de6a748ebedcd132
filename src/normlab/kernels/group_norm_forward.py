"""GroupNorm forward: the statistics and normalize kernels and their launcher.

The math, the statistics and the parallelism are described in :mod:`.group_norm`.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl
from torch import Tensor

from .._core.stats import acc_dtype
from ._common import (
    Plan,
    channels_fastest,
    empty,
    empty_like,
    ncs,
    smallest_tile,
    spatial_size,
    tl_acc,
)
from ._jit import (
    apply_act,
    io_rows,
    load_channels,
    load_tile,
    rows_at,
    s_tile,
    total,
)
from .group_norm_packed import _group_norm_packed_fwd, _group_norm_packed_fwd_stats

#: The widest tile row (channels) of several groups per program.
MAX_PACKED_ROW = 256

__all__ = ["group_channels", "group_program", "groups_per_program", "normalize", "piece", "plan"]


def groups_per_program(cpg: int, groups: int, c_fast: bool, widest: int) -> int:
    """How many consecutive groups one program owns: 1, except in channels_last, where a
    tile row of next_power_of_2(k·C/G) lanes holds k groups' contiguous channels, and k
    is the count (at most ``widest`` lanes per row) that leaves the fewest lanes idle
    over all G groups (the smaller k on a tie: more programs)."""
    if not c_fast or groups == 1:
        return 1

    def used(k: int) -> float:
        return groups * cpg / (triton.cdiv(groups, k) * triton.next_power_of_2(k * cpg))

    fits = [k for k in range(1, groups + 1) if triton.next_power_of_2(k * cpg) <= widest]
    return max(fits, key=lambda k: (used(k), -k), default=1)


def plan(x: Tensor, num_groups: int, x_sc: int, x_ss: int) -> Plan:
    """One program per (n, group), or per several groups in channels_last
    (:func:`groups_per_program`); when those programs alone would leave the device idle,
    each group's (C/G)·S extent is split over several programs (channel chunks ×
    position chunks; position chunks only for several groups per program)."""
    cpg = x.shape[1] // num_groups if num_groups else 0
    c_fast = channels_fastest(x_sc, x_ss, spatial_size(x))
    widest = min(smallest_tile(x.device), MAX_PACKED_ROW)
    pack = groups_per_program(cpg, num_groups, c_fast, widest)
    return Plan(x, x_sc, x_ss, groups=num_groups, may_split=True, pack=pack)


@triton.jit
def piece(sp, SPLIT_S, CPG, S, CHUNK_C, CHUNK_S):
    """``(c_lo, c_hi, s_lo, s_hi, s_index)``: the channels (of the group) and positions of
    piece ``sp`` of a group's extent, and its position-chunk index."""
    cs = sp // SPLIT_S
    si = sp % SPLIT_S
    c_lo = cs * CHUNK_C
    s_lo = si * CHUNK_S
    return c_lo, tl.minimum(c_lo + CHUNK_C, CPG), s_lo, tl.minimum(s_lo + CHUNK_S, S), si


@triton.jit
def group_program(G, CPG):
    """``(ng, sp, n, c_first)`` of a program of a (N·G, SPLIT) grid: its (sample, group)
    row, its piece, its sample and the group's first channel."""
    ng = tl.program_id(0)
    return ng, tl.program_id(1), ng // G, (ng % G) * CPG


@triton.jit
def group_channels(
    c0, c_hi, c_first, W, B,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``(c, cm, w, b)``: the BLOCK_C channels of the group from ``c0`` (indices within
    the group), their mask ``c < c_hi`` and their γ and β (1 and 0 without)."""
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < c_hi
    w = load_channels(W, c_first + c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    return c, cm, w, load_channels(B, c_first + c, cm, HAS_B, 0.0, ACC, BLOCK_C)


@triton.jit
def _group_moments(
    xb,  # pointer to x[n, first channel of the group, 0]
    shift,  # scalar ACC: the pivot subtracted from every element
    x_sc, x_ss,
    c_lo, c_hi, s_lo, s_hi,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Count, mean and M2 of ``x − shift`` over channels [c_lo, c_hi) × positions
    [s_lo, s_hi): Welford's update in every lane of the tile, then one merge of the
    lanes (Chan's formula for many parts: mean = Σ n_l m_l / n,
    M2 = Σ M2_l + Σ n_l (m_l − mean)²)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    cnt = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    mu = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    q = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + offs_c
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + offs_s
            mask = (c < c_hi)[:, None] & (s < s_hi)[None, :]
            ptrs = xb + c[:, None].to(tl.int64) * x_sc + s[None, :].to(tl.int64) * x_ss
            d = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
            m = mask.to(ACC)
            cnt += m
            delta = d - mu
            mu += delta * (m / tl.maximum(cnt, 1.0))
            q += m * delta * (d - mu)
    count = total(cnt, None)
    mean = total(cnt * mu, None) / tl.maximum(count, 1.0)
    dev = mu - mean
    m2 = total(q, None) + total(cnt * dev * dev, None)
    return count, mean, m2


@triton.jit
def _group_norm_fwd_stats(
    X,  # (N, C, S) input, strides (x_sn, x_sc, x_ss)
    PART,  # (3, N·G, SPLIT) ACC out: count, mean and M2 of (x − pivot) per piece
    x_sn, x_sc, x_ss,
    S, G, CPG, SPLIT, SPLIT_S,
    CHUNK_C,  # channels per piece
    CHUNK_S,  # positions per piece
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    ng, sp, n, c_first = group_program(G, CPG)
    xb = rows_at(X, n, c_first, x_sn, x_sc)
    shift = tl.load(xb).to(ACC)
    c_lo, c_hi, s_lo, s_hi, _ = piece(sp, SPLIT_S, CPG, S, CHUNK_C, CHUNK_S)
    count, mean, m2 = _group_moments(
        xb, shift, x_sc, x_ss, c_lo, c_hi, s_lo, s_hi, ACC, BLOCK_C, BLOCK_S
    )
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
    PART,  # (3, N·G, SPLIT) ACC in when not ONE_PASS: count, mean, M2 per piece
    x_sn, x_sc, x_ss,
    y_sn, y_sc, y_ss,
    S, G, CPG, SPLIT, SPLIT_S, CHUNK_C, CHUNK_S, eps,
    ACC: tl.constexpr,
    ONE_PASS: tl.constexpr,  # SPLIT == 1: compute the statistics here
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 SiLU, 2 ReLU
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,  # >= SPLIT
):  # fmt: skip
    ng, sp, n, c_first = group_program(G, CPG)
    xb, yb = io_rows(X, Y, n, c_first, x_sn, x_sc, y_sn, y_sc)
    shift = tl.load(xb).to(ACC)
    if ONE_PASS:
        count, mean, m2 = _group_moments(xb, shift, x_sc, x_ss, 0, CPG, 0, S, ACC, BLOCK_C, BLOCK_S)
    else:
        # Merge the pieces: mean = Σ n_i m_i / n, M2 = Σ M2_i + Σ n_i (m_i − mean)².
        p = tl.arange(0, BLOCK_P)
        pm = p < SPLIT
        plane = tl.num_programs(0) * SPLIT
        row = PART + ng * SPLIT + p
        cnt = tl.load(row, mask=pm, other=0.0)
        mu = tl.load(row + plane, mask=pm, other=0.0)
        q = tl.load(row + 2 * plane, mask=pm, other=0.0)
        count = total(cnt, None)
        mean = total(cnt * mu, None) / count
        dev = tl.where(pm, mu - mean, 0.0)
        m2 = total(q, None) + total(cnt * dev * dev, None)
    var = tl.maximum(m2 / count, 0.0)
    rstd = tl.rsqrt(var + eps)
    if sp == 0:
        tl.store(MEAN + ng, mean)
        tl.store(RSTD + ng, rstd)

    c_lo, c_hi, s_lo, s_hi, _ = piece(sp, SPLIT_S, CPG, S, CHUNK_C, CHUNK_S)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c, cm, w, shift_out = group_channels(c0, c_hi, c_first, W, B, HAS_W, HAS_B, ACC, BLOCK_C)
        # Fold rstd into the scale: z = (x − pivot − mean)·(r·γ) + β.
        scale = w * rstd
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
            cc = c[:, None].to(tl.int64)
            x = load_tile(xb + cc * x_sc, ss, x_ss, mask, ACC)
            y = ((x - shift) - mean) * scale[:, None] + shift_out[:, None]
            if ACT != 0:
                y = apply_act(y, ACT)
            tl.store(yb + cc * y_sc + ss * y_ss, y.to(Y.dtype.element_ty), mask=mask)


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, act: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x', y, mean, rstd)``: ``x'`` is ``x`` as the kernels read it (saved for the
    backward), ``mean`` (of x − pivot) and ``rstd`` are (N·G,) in the accumulation dtype."""
    x, x_sn, x_sc, x_ss = ncs(x)
    p = plan(x, num_groups, x_sc, x_ss)
    acc = acc_dtype(x.dtype)
    y = empty_like(x)
    _, y_sn, y_sc, y_ss = ncs(y)
    mean = empty((p.n * num_groups,), acc, x.device)
    rstd = empty((p.n * num_groups,), acc, x.device)
    if x.numel() == 0:
        return x, y, mean, rstd
    one_pass = p.split == 1
    part = mean if one_pass else empty((3, p.n * num_groups, p.split), acc, x.device)
    common: dict[str, Any] = dict(ACC=tl_acc(x.dtype), BLOCK_C=p.block_c, BLOCK_S=p.block_s)
    if p.pack > 1:
        packed = (p.c, p.s, num_groups, p.cpg, p.per_sample, p.pack, p.chunk, p.split)
        plane = p.n * num_groups * p.split
        common.update(BLOCK_G=triton.next_power_of_2(p.pack), num_warps=p.warps)
        if not one_pass:
            _group_norm_packed_fwd_stats[p.grid](
                x, part, x_sn, x_sc, x_ss, *packed, plane, **common
            )  # fmt: skip
        _group_norm_packed_fwd[p.grid](
            x, y,
            x if weight is None else weight,
            x if bias is None else bias,
            mean, rstd, part, x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, *packed, plane, eps,
            ONE_PASS=one_pass, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
            BLOCK_P=p.block_p, **common,
        )  # fmt: skip
        return x, y, mean, rstd
    if not one_pass:
        _group_norm_fwd_stats[p.grid](
            x, part, x_sn, x_sc, x_ss, p.s, num_groups, p.width,
            p.split, p.split_s, p.chunk_c, p.chunk_s, num_warps=p.warps, **common,
        )  # fmt: skip
    _group_norm_fwd[p.grid](
        x, y,
        x if weight is None else weight,
        x if bias is None else bias,
        mean, rstd, part,
        x_sn, x_sc, x_ss, y_sn, y_sc, y_ss,
        p.s, num_groups, p.width, p.split, p.split_s, p.chunk_c, p.chunk_s, eps,
        ONE_PASS=one_pass, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
        BLOCK_P=p.block_p, num_warps=p.warps, **common,
    )  # fmt: skip
    return x, y, mean, rstd
