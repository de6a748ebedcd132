"""Per-channel moments of a tile walk, shared by the Switchable Norm kernels and the
packed channels_last GroupNorm kernels (``docs/numerics.md`` rule 2)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    load_tile,
    s_tile,
    total,
)

__all__ = ["channel_moments"]


@triton.jit
def channel_moments(
    xb, shift, x_ss, cm, s_lo, s_hi, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    """``(count, mean, M2)`` of ``x − shift`` per channel (``xb`` points at each channel's
    row, ``shift`` one pivot per channel) over positions [s_lo, s_hi): Welford's update
    in every lane, then one merge of the lanes along S (Chan's formula for many parts:
    mean = Σ n_l m_l / n, M2 = Σ M2_l + Σ n_l (m_l − mean)²)."""
    cnt = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    mu = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    q = tl.full([BLOCK_C, BLOCK_S], 0.0, ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ss, mask = s_tile(s0, cm, s_hi, BLOCK_S)
        x = load_tile(xb, ss, x_ss, mask, ACC)
        d = tl.where(mask, x - shift[:, None], 0.0)
        m = mask.to(ACC)
        cnt += m
        delta = d - mu
        mu += delta * (m / tl.maximum(cnt, 1.0))
        q += m * delta * (d - mu)
    count = total(cnt, 1)
    mean = total(cnt * mu, 1) / tl.maximum(count, 1.0)
    dev = mu - mean[:, None]
    return count, mean, total(q, 1) + total(cnt * dev * dev, 1)
