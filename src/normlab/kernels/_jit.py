"""The ``@triton.jit`` device helpers shared by the kernel files (Triton inlines them):
activations, a program's channels and rows, tiles of positions and their loads, the
reductions of partial sums. The Python side (views, tiles, the launch plan,
allocation) is :mod:`._common`."""

from __future__ import annotations

import triton
import triton.language as tl

from .._core.dispatch import interpreting

# The one reduction of the kernels is tl.sum. Under the interpreter a @triton.jit helper
# of triton.language runs only if the interpreter wrapped it, i.e. TRITON_INTERPRET=1 was
# set before triton's first import (torch._dynamo, for one, imports triton early); so
# there tl.sum's own Python body is wrapped again here, and the interpreter then runs it
# (summing with NumPy). Compiled, the kernels call tl.sum itself.
total = triton.jit(tl.sum.fn) if interpreting() else tl.sum


@triton.jit
def apply_act(z, ACT: tl.constexpr):
    """``act(z)``: 0 identity, 1 SiLU, 2 ReLU."""
    if ACT == 1:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 2:
        z = tl.where(z > 0, z, 0.0)
    return z


@triton.jit
def act_backward(dy, z, ACT: tl.constexpr):
    """``dy · act'(z)``. ReLU: gradient 0 at z = 0, as torch."""
    if ACT == 1:
        sig = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * (sig * (1.0 + z * (1.0 - sig)))
    elif ACT == 2:
        dy = tl.where(z > 0, dy, 0.0)
    return dy


@triton.jit
def channel_block(CB, C, BLOCK_C: tl.constexpr):
    """``(n, c, cm)`` of a program of a (N·CB,) grid: its sample n, its block of BLOCK_C
    channel indices c (CB blocks per sample) and their mask ``c < C``."""
    pid = tl.program_id(0)
    n = pid // CB
    c = (pid % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C


@triton.jit
def load_channels(
    P, offs, mask, HAS: tl.constexpr, FILL: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr
):
    """``P[offs]`` in ACC where ``mask`` (0 elsewhere) for a per-channel tensor that
    was given (``HAS``), else FILL for every channel: γ of an affine-free norm is 1,
    β is 0."""
    if HAS:
        v = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
    else:
        v = tl.full([BLOCK_C], FILL, ACC)
    return v


@triton.jit
def rows_at(P, n, ch, sn, sc):
    """``P + n·sn + ch·sc`` in int64: where the rows of sample ``n`` and channels ``ch``
    (one channel, or ``c[:, None]`` for a block of them) start, at position 0."""
    return P + n.to(tl.int64) * sn + ch.to(tl.int64) * sc


@triton.jit
def io_rows(X, Y, n, ch, x_sn, x_sc, y_sn, y_sc):
    """``(xb, yb)``: :func:`rows_at` of the two (N, C, S) tensors a kernel walks together
    (x and its output y, or x and the upstream gradient dy)."""
    return rows_at(X, n, ch, x_sn, x_sc), rows_at(Y, n, ch, y_sn, y_sc)


@triton.jit
def grad_rows(X, DY, DX, n, ch, x_sn, x_sc, dy_sn, dy_sc, dx_sn, dx_sc):
    """``(xb, dyb, dxb)``: :func:`rows_at` of x, dy and dx, for the kernels that write dx."""
    xb, dyb = io_rows(X, DY, n, ch, x_sn, x_sc, dy_sn, dy_sc)
    return xb, dyb, rows_at(DX, n, ch, dx_sn, dx_sc)


@triton.jit
def s_tile(s0, cm, s_hi, BLOCK_S: tl.constexpr):
    """``(ss, mask)`` of the tile of positions [s0, s0 + BLOCK_S): the (1, BLOCK_S) int64
    positions and the mask of the (channel, position) elements that exist (channels
    ``cm``, positions below ``s_hi``: the tail tile of a piece is partial)."""
    s = s0 + tl.arange(0, BLOCK_S)
    return s[None, :].to(tl.int64), cm[:, None] & (s < s_hi)[None, :]


@triton.jit
def load_tile(rows, ss, stride, mask, ACC: tl.constexpr):
    """The tile ``rows[ss·stride]`` in ACC, 0 where masked (a 0 adds nothing to a sum)."""
    return tl.load(rows + ss * stride, mask=mask, other=0.0).to(ACC)


@triton.jit
def grad_tile(xb, x_ss, dyb, dy_ss, s0, cm, s_hi, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """``(ss, mask, x, dy)``: the :func:`s_tile` at ``s0`` and the x and dy tiles there
    (:func:`load_tile`), the step of every backward loop over positions."""
    ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
    return ss, mask, load_tile(xb, ss, x_ss, mask, ACC), load_tile(dyb, ss, dy_ss, mask, ACC)


@triton.jit
def sum_split(PART, row0, SPLIT, c, cm, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Σ_{q < SPLIT} PART[row0 + q, c]`` for a (rows, C) buffer of per-piece partial
    sums, added in the order of q: every program that needs the total of one (n, c)
    computes it bitwise alike (no atomics, the same result run after run)."""
    acc = tl.full([BLOCK_C], 0.0, ACC)
    for q in range(0, SPLIT):
        acc += tl.load(PART + (row0 + q) * C + c, mask=cm, other=0.0).to(ACC)
    return acc


@triton.jit
def s_range(S, CHUNK):
    """``(s_lo, s_hi)``: the positions of the program's piece along axis 1 of a
    :class:`Plan` grid (CHUNK positions; the last piece shorter)."""
    s_lo = tl.program_id(1) * CHUNK
    return s_lo, tl.minimum(s_lo + CHUNK, S)


@triton.jit
def sum_rows(
    PART,  # (K, P, C) partial per-channel sums, ACC dtype
    OUT,  # (K, C) their sums over P, OUT's dtype
    P, C,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Body of the ``*_dwdb`` phase kernels: plane ``k = program_id(1)``,
    ``OUT[k, c] = Σ_p PART[k, p, c]`` in ACC, for the columns of ``program_id(0)``."""
    k = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_P)
    plane = PART + k * P * C
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, ACC)
    for p0 in range(0, P, BLOCK_P):
        r = p0 + rows
        m = (r < P)[:, None] & cmask[None, :]
        acc += tl.load(plane + r[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0)
    tl.store(OUT + k * C + cols, total(acc, 0).to(OUT.dtype.element_ty), mask=cmask)


@triton.jit
def group_grad_terms(x, dy, mask, shift, mean, rstd, w, b, ACT: tl.constexpr):
    """``(x̂, dz)`` of a GroupNorm backward tile, 0 where masked: x̂ = ((x − pivot) − mean)
    ·rstd and dz = dy·act'(x̂·γ + β). ``shift``, ``mean``, ``rstd``: the group's scalars
    (one group per program) or per-channel columns (several); ``w``, ``b``: per channel."""
    xhat = tl.where(mask, ((x - shift) - mean) * rstd, 0.0)
    dz = dy
    if ACT != 0:
        dz = tl.where(mask, act_backward(dy, xhat * w[:, None] + b[:, None], ACT), 0.0)
    return xhat, dz


@triton.jit
def group_grad_input(x, dy, shift, mean, rstd, w, b, c1, c2, ACT: tl.constexpr):
    """GroupNorm's dx of a tile: r·(dx̂ − c1 − x̂·c2), dx̂ = dz·γ (``c1``, ``c2``: the
    group's means of dx̂ and dx̂·x̂; scalars or columns as in :func:`group_grad_terms`)."""
    xhat = ((x - shift) - mean) * rstd
    if ACT != 0:
        dy = act_backward(dy, xhat * w[:, None] + b[:, None], ACT)
    return (dy * w[:, None] - c1 - xhat * c2) * rstd


@triton.jit
def store_dwdb(out, acc_dw, acc_db, cm, PC, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Stores a GroupNorm program's per-lane dγ and dβ sums, reduced along S, at ``out``
    (its channels of one row of plane 0) and ``out + PC`` (plane 1), where wanted."""
    if HAS_W:
        tl.store(out, total(acc_dw, 1), mask=cm)
    if HAS_B:
        tl.store(out + PC, total(acc_db, 1), mask=cm)
