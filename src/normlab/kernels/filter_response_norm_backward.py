"""Filter Response Norm backward: the gradient kernels and their launcher.

The formulas and the deterministic reductions are described in
:mod:`.filter_response_norm`.
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
    ncs,
    sum_partials,
    tl_acc,
)
from ._jit import (
    channel_block,
    grad_rows,
    grad_tile,
    io_rows,
    load_channels,
    s_range,
    sum_rows,
    sum_split,
    total,
)

__all__ = ["gradients"]


@triton.jit
def _frn_bwd_sums(
    xb, dyb,
    DPART,  # (4, N·SPLIT, C) ACC out: this program's row of A, Σ dz·x̂, Σ dz, Σ dy·[z <= τ]
    row,
    PC,  # N·SPLIT·C, the plane stride of DPART
    C, c, cm, rs, w, bias, tau,
    x_ss, dy_ss,
    s_lo, s_hi,
    ACC: tl.constexpr, HAS_TAU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """The four per-channel sums over positions [s_lo, s_hi), stored to row ``row``."""
    acc_a = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dw = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_db = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    acc_dt = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        _, _, x, dz = grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
        xhat = x * rs[:, None]
        if HAS_TAU:
            above = xhat * w[:, None] + bias[:, None] > tau[:, None]
            acc_dt += tl.where(above, 0.0, dz)
            dz = tl.where(above, dz, 0.0)
        acc_a += dz * w[:, None] * xhat
        acc_dw += dz * xhat
        acc_db += dz
    out = DPART + row * C + c
    tl.store(out, total(acc_a, 1), mask=cm)
    tl.store(out + PC, total(acc_dw, 1), mask=cm)
    tl.store(out + 2 * PC, total(acc_db, 1), mask=cm)
    tl.store(out + 3 * PC, total(acc_dt, 1), mask=cm)


@triton.jit
def _frn_bwd_stats(
    X,  # (N, C, S) input
    DY,  # (N, C, S) upstream gradient
    W,  # (C,) γ when HAS_W
    B,  # (C,) β when HAS_B
    TAU,  # (C,) τ when HAS_TAU
    RS,  # (N, C) ACC: r from the forward
    DPART,  # (4, N·SPLIT, C) ACC out: the sums of each (n, chunk)
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    C, S, CB, CHUNK, SPLIT, PC,
    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TAU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    xb, dyb = io_rows(X, DY, n, c[:, None], x_sn, x_sc, dy_sn, dy_sc)
    rs = tl.load(RS + n.to(tl.int64) * C + c, mask=cm, other=0.0)
    w = load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    tau = load_channels(TAU, c, cm, HAS_TAU, 0.0, ACC, BLOCK_C)
    s_lo, s_hi = s_range(S, CHUNK)
    row = n.to(tl.int64) * SPLIT + tl.program_id(1)
    _frn_bwd_sums(
        xb, dyb, DPART, row, PC, C, c, cm, rs, w, bias, tau, x_ss, dy_ss, s_lo, s_hi,
        ACC, HAS_TAU, BLOCK_C, BLOCK_S,
    )  # fmt: skip


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
    DPART,  # (4, N·SPLIT, C) ACC: in when not ONE_PASS, out (its one row) when ONE_PASS
    x_sn, x_sc, x_ss,
    dy_sn, dy_sc, dy_ss,
    dx_sn, dx_sc, dx_ss,
    C, S, CB, CHUNK, SPLIT, PC,
    ACC: tl.constexpr, ONE_PASS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_TAU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n, c, cm = channel_block(CB, C, BLOCK_C)
    xb, dyb, dxb = grad_rows(X, DY, DX, n, c[:, None], x_sn, x_sc, dy_sn, dy_sc, dx_sn, dx_sc)
    nc = n.to(tl.int64) * C + c
    rs = tl.load(RS + nc, mask=cm, other=0.0)
    w = load_channels(W, c, cm, HAS_W, 1.0, ACC, BLOCK_C)
    bias = load_channels(B, c, cm, HAS_B, 0.0, ACC, BLOCK_C)
    tau = load_channels(TAU, c, cm, HAS_TAU, 0.0, ACC, BLOCK_C)
    if ONE_PASS:
        _frn_bwd_sums(
            xb, dyb, DPART, n.to(tl.int64), PC, C, c, cm, rs, w, bias, tau, x_ss, dy_ss,
            0, S, ACC, HAS_TAU, BLOCK_C, BLOCK_S,
        )  # fmt: skip
    # The row's A over its chunks (one chunk: the row just written by this program).
    a = sum_split(DPART, n.to(tl.int64) * SPLIT, SPLIT, c, cm, C, ACC, BLOCK_C)
    if tl.program_id(1) == 0:
        tl.store(A + nc, a, mask=cm)
    a_over_s = a / S
    s_lo, s_hi = s_range(S, CHUNK)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask, x, dz = grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC, BLOCK_S)
        xhat = x * rs[:, None]
        if HAS_TAU:
            dz = tl.where(xhat * w[:, None] + bias[:, None] > tau[:, None], dz, 0.0)
        dx = (dz * w[:, None] - xhat * a_over_s[:, None]) * rs[:, None]
        tl.store(dxb + ss * dx_ss, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _frn_bwd_dwdb(
    DPART,  # (3, N·SPLIT, C) ACC: per-(n, chunk) Σ dz·x̂, Σ dz, Σ dy·[z <= τ]
    OUT,  # (3, C) ACC out: dγ, dβ, dτ
    P, C,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    sum_rows(DPART, OUT, P, C, ACC, BLOCK_P, BLOCK_C)


def gradients(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    rs: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, A, sums)`` from the forward's saved ``x`` and ``r``: A the (N, C) Σ dx̂·x̂,
    ``sums`` the (3, C) dγ, dβ, dτ in the accumulation dtype."""
    x, x_sn, x_sc, x_ss = ncs(x)
    dy, dy_sn, dy_sc, dy_ss = ncs(dy)
    dx = empty_like(x)
    _, dx_sn, dx_sc, dx_ss = ncs(dx)
    p = channel_plan(x, x_sc, x_ss)
    n, c = p.n, p.c
    acc = rs.dtype
    if x.numel() == 0:
        a = torch.zeros((n, c), dtype=acc, device=x.device)
        sums = torch.zeros((3, c), dtype=acc, device=x.device)
    else:
        a = empty((n, c), acc, x.device)
        rows = n * p.split
        dpart = empty((4, rows, c), acc, x.device)
        one_pass = p.split == 1
        params = (
            x if weight is None else weight,
            x if bias is None else bias,
            x if tau is None else tau,
        )
        geometry = (c, p.s, p.per_sample, p.chunk, p.split, rows * c)
        flags: dict[str, Any] = dict(
            ACC=tl_acc(x.dtype), HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_TAU=tau is not None, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
            num_warps=p.warps,
        )  # fmt: skip
        if not one_pass:
            _frn_bwd_stats[p.grid](
                x, dy, *params, rs, dpart, x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss,
                *geometry, **flags,
            )  # fmt: skip
        _frn_bwd_dx[p.grid](
            x, dy, dx, *params, rs, a, dpart,
            x_sn, x_sc, x_ss, dy_sn, dy_sc, dy_ss, dx_sn, dx_sc, dx_ss,
            *geometry, ONE_PASS=one_pass, **flags,
        )  # fmt: skip
        sums = sum_partials(_frn_bwd_dwdb, dpart[1:])
    return dx, a, sums
