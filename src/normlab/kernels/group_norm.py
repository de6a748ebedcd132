r"""GroupNorm (+ SiLU/ReLU) in Triton: forward, backward, one autograd.Function.

Per (sample n, group g) of C/G channels, over those channels and every position:

.. math:: \hat x = (x - \mu_{n,g})\,r_{n,g}, \quad r = 1/\sqrt{\sigma^2 + \epsilon},
          \quad z = \gamma_c \hat x + \beta_c, \quad y = \mathrm{act}(z)

**Layout.** Tensors are read as (N, C, S) through their strides (see
:mod:`._common`): NCHW and channels_last go through the same kernels without a copy;
each program walks its group in (BLOCK_C, BLOCK_S) tiles laid along the contiguous axis.

**Statistics** (``docs/numerics.md`` rules 1-2). Everything is shifted by a pivot,
the group's first element (exact for nearby values, so data with mean 1e4 and std 1e-2
keep their digits); every lane of the tile keeps its own Welford (count, mean, M2),
and the lanes are merged once at the end with Chan's formula. The variance is clamped
at 0 before eps.

**Parallelism** (:class:`._common.Plan`). One program per (n, g) when N·G fills the
device; otherwise each group's (C/G)·S extent is cut into SPLIT pieces (channel chunks
× position chunks, the tile shrinking until there are about 4 programs per SM):
``_group_norm_fwd_stats`` writes per-piece (count, mean, M2), which every program of
``_group_norm_fwd`` merges (same formula, fixed order) before it normalizes its own
piece. With SPLIT = 1 the single program computes the statistics itself (``ONE_PASS``)
and no partial buffer exists.

**Backward**, with :math:`dz = dy\cdot \mathrm{act}'(z)`, :math:`d\hat x = dz\,\gamma`,
M = (C/G)·S elements per group:

.. math:: dx = r\,\big(d\hat x - \overline{d\hat x} - \hat x\,\overline{d\hat x\,\hat x}\big),
          \quad d\gamma_c = \textstyle\sum dz\,\hat x, \quad d\beta_c = \sum dz

The group sums come from ``_group_norm_bwd_stats`` (per split) or from the first loop of
``_group_norm_bwd_dx`` (one split). dγ and dβ: every program writes its channels of one
row, (n, position chunk), of an fp32 buffer (2, N·SPLIT_S, C), and ``_group_norm_bwd_dwdb``
adds the rows: deterministic, no atomics, no locks, nothing accumulated in half precision.

The forward kernels and their launcher are in :mod:`.group_norm_forward`, the backward
ones in :mod:`.group_norm_backward`; this module holds the autograd.Function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import kernel_backward, kernel_forward
from .group_norm_backward import gradients
from .group_norm_forward import normalize

__all__ = ["GroupNormTriton"]


class GroupNormTriton(torch.autograd.Function):
    """``act(group_norm(x, G, γ, β, eps))`` with the kernels of :mod:`.group_norm_forward`
    and :mod:`.group_norm_backward`; ``act`` is the kernels' code (0 none, 1 SiLU,
    2 ReLU). Saves x, γ, β and the (N·G,) statistics, recomputes x̂ and z in the
    backward."""

    @staticmethod
    @kernel_forward
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
        act: int,
    ) -> Tensor:
        x, y, mean, rstd = normalize(x, weight, bias, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        ctx.act = act
        return y

    @staticmethod
    @kernel_backward("group_norm (triton)")
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = gradients(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if need[2] else None,
            None,
            None,
            None,
        )
