"""Collectives of the synchronized layers over :mod:`torch.distributed` (any backend).

The op-level half of cross-process statistics: which group a layer syncs over, each
rank's local moments (by the rule of :mod:`normlab._core.stats`), one
``all_gather`` that merges them into the global batch's
(Chan's parallel formula around a common shift, in float64), the backward
``all_reduce`` of the gradient terms, and the global-count check. What a synced
layer computes, and how to convert a model, is described in :mod:`normlab.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .stats import centered_moments, pivot

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "WORLD",
    "GlobalMoments",
    "all_reduce_sum",
    "check_global_count",
    "check_group_arg",
    "group_moments",
    "local_moments",
    "resolve_process_group",
    "safe_pivot",
    "sync_active",
    "sync_moments",
]


WORLD = "world"
"""``process_group=WORLD`` (the string ``"world"``) syncs over the default group."""


# ----------------------------------------------------------------------------- groups


def check_group_arg(process_group: Any) -> None:
    if process_group is None or process_group == WORLD:
        return
    if isinstance(process_group, str) or not _is_process_group(process_group):
        raise TypeError(
            f"process_group must be None (no sync), {WORLD!r} (the default group) or a "
            f"torch.distributed.ProcessGroup, got {process_group!r}. Create a group with "
            "torch.distributed.new_group(ranks) or pass 'world'."
        )


def _is_process_group(obj: Any) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def resolve_process_group(process_group: ProcessGroup | str | None) -> ProcessGroup | None:
    """The group to synchronize over, or None when there is nothing to synchronize.

    None is returned (no communication, no error) for ``process_group=None``, when
    :mod:`torch.distributed` is unavailable or not initialized, and when the group
    has a single process. ``"world"`` means the default group.

    Raises:
        TypeError: ``process_group`` is none of None, ``"world"``, a ProcessGroup.
    """
    if process_group is None:
        return None
    check_group_arg(process_group)
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if process_group == WORLD else process_group
    if dist.get_world_size(group) <= 1:
        return None
    return group


def sync_active(process_group: ProcessGroup | str | None) -> bool:
    """True when a layer built with ``process_group`` communicates in training now."""
    return resolve_process_group(process_group) is not None


# ----------------------------------------------------------------------------- local moments


def safe_pivot(x: Tensor, dims: Sequence[int]) -> Tensor:
    """:func:`normlab._core.stats.pivot`: one sample per group, zeros for an empty ``x``."""
    return pivot(x, dims)


def local_moments(xc: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Biased ``(mean, var, count)`` of ``xc`` over ``dims`` (kept dims), differentiable.

    The statistics core's rule (:func:`normlab._core.stats.centered_moments`); an
    empty reduction (count 0) gives zeros that stay connected to the graph (so the
    rank still runs the backward collective), not NaN.
    """
    m = centered_moments(xc, dims, xc.new_zeros(()))
    return m.mean, m.var, m.count


# ----------------------------------------------------------------------------- collectives


def _all_gather_flat(local: Tensor, group: ProcessGroup) -> Tensor:
    """(world, L) rows of every rank's (L,) ``local``, in one collective."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = local.new_empty(world * local.numel())
    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.13
    if gather is None:
        gather = dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=group)
    return out.reshape(world, local.numel())


def all_reduce_sum(t: Tensor, group: ProcessGroup) -> Tensor:
    """Sum of ``t`` over ``group`` (one ``all_reduce``), returned as a new tensor."""
    import torch.distributed as dist

    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class GlobalMoments(NamedTuple):
    """Moments of the global batch (every rank's samples), per channel, kept dims.

    ``mean`` is relative to the calling rank's ``shift`` (differentiable), ``var``
    the biased variance (differentiable), ``count`` the global number of values
    per channel (a float64 0-d tensor), ``mean_abs`` the mean itself (no
    gradient; bitwise the same on every rank, for the running statistics).
    """

    mean: Tensor
    var: Tensor
    count: Tensor
    mean_abs: Tensor


class _SyncMoments(torch.autograd.Function):
    """Chan's merge of per-rank (count, mean, M2) in forward; one all_reduce in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mean: Tensor,  # (1, C, 1, ...) local mean relative to shift, accumulation dtype
        var: Tensor,  # (1, C, 1, ...) local biased variance
        shift: Tensor,  # (1, C, 1, ...) local shift, detached
        count: int,  # local values per channel (may be 0)
        group: ProcessGroup,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        shape, acc = mean.shape, mean.dtype
        c = mean.numel()
        f64 = torch.float64
        packed = torch.cat(
            [
                torch.full((1,), float(count), dtype=f64, device=mean.device),
                shift.reshape(-1).to(f64),
                mean.detach().reshape(-1).to(f64),
                (var.detach().reshape(-1).to(f64) * count),
            ]
        )
        rows = _all_gather_flat(packed, group)  # (world, 1 + 3C)
        n = rows[:, :1]  # (world, 1)
        shifts, means, m2s = rows[:, 1 : 1 + c], rows[:, 1 + c : 1 + 2 * c], rows[:, 1 + 2 * c :]
        total = n.sum()
        # The first non-empty rank's shift, chosen on the device (no host sync).
        first = torch.argmax((n.reshape(-1) > 0).to(torch.int8)).reshape(1)
        s = shifts.index_select(0, first).reshape(-1)
        d = means + (shifts - s)  # each rank's mean relative to the common shift
        safe_total = total.clamp_min(1.0)
        m = (n * d).sum(0) / safe_total
        m2 = m2s.sum(0) + (n * (d - m).square()).sum(0)
        g_var = (m2 / safe_total).clamp_min(0)
        local_shift = shift.reshape(-1).to(f64)
        g_mean = (m + (s - local_shift)).to(acc).reshape(shape)  # relative to this rank's shift
        g_mean_abs = (m + s).to(acc).reshape(shape)
        g_var = g_var.to(acc).reshape(shape)
        ctx.group = group
        ctx.count = count
        ctx.save_for_backward(mean, g_mean, total)
        ctx.mark_non_differentiable(total, g_mean_abs)
        return g_mean, g_var, total, g_mean_abs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, d_mean: Tensor, d_var: Tensor, _d_count: Tensor, _d_abs: Tensor
    ) -> tuple[Tensor | None, ...]:
        mean, g_mean, total = ctx.saved_tensors
        c = mean.numel()
        # The one backward collective: every rank's ∂L_r/∂(global mean, global var).
        summed = all_reduce_sum(torch.cat([d_mean.reshape(-1), d_var.reshape(-1)]), ctx.group)
        gm, gv = summed[:c].reshape(mean.shape), summed[c:].reshape(mean.shape)
        # m = Σ n_r d_r / N and V = (Σ n_r var_r + Σ n_r (d_r − m)²) / N, so
        # ∂m/∂mean_r = n_r/N, ∂V/∂var_r = n_r/N, ∂V/∂mean_r = 2 n_r (d_r − m)/N.
        w = (ctx.count / total.clamp_min(1.0)).to(mean.dtype)  # n_r / N, no host sync
        dev = mean.detach() - g_mean  # d_r − m, both relative to this rank's shift
        grad_mean = w * (gm + 2.0 * gv * dev)
        grad_var = w * gv
        return grad_mean, grad_var, None, None, None


def sync_moments(
    mean: Tensor, var: Tensor, count: int, shift: Tensor, group: ProcessGroup
) -> GlobalMoments:
    """Merge every rank's per-channel moments into the global batch's, differentiably.

    Args:
        mean: this rank's mean relative to ``shift`` (kept dims, e.g. (1, C, 1, 1)),
            the accumulation dtype; may carry a gradient.
        var: this rank's *biased* variance, same shape; may carry a gradient.
        count: values per channel on this rank (0 for an empty batch, then
            ``mean`` and ``var`` are ignored).
        shift: this rank's per-channel shift (detached), same shape.
        group: the process group (from :func:`resolve_process_group`).

    Returns:
        :class:`GlobalMoments`. Forward: one ``all_gather``. Backward (when
        ``mean`` or ``var`` needs a gradient): one ``all_reduce`` of the gradients
        with respect to the global mean and variance, from which each rank's
        gradient with respect to its own moments follows exactly.
    """
    out = _SyncMoments.apply(mean, var, shift.detach(), int(count), group)
    return GlobalMoments(*out)


def group_moments(
    xc: Tensor, dims: Sequence[int], shift: Tensor, group: ProcessGroup
) -> tuple[GlobalMoments, int]:
    """Moments of the global batch from this rank's shifted data ``xc = x − shift``.

    The cross-process companion of :func:`normlab._core.stats.centered_moments`:
    this rank's moments by the same rule, merged over ``group`` by
    :func:`sync_moments`. Returns the global moments and this rank's count.
    """
    mean, var, count = local_moments(xc, dims)
    return sync_moments(mean, var, count, shift, group), count


def check_global_count(layer: str, shape: Sequence[int], local: int, total: Tensor) -> None:
    """Refuse a batch variance from at most one value over all ranks.

    Reads ``total`` on the host only when this rank's own count is <= 1 (then
    every rank may be in the same case, and all of them raise together).
    """
    if local > 1:
        return
    n = int(total)
    if n <= 1:
        raise ValueError(
            f"{layer}: training needs more than 1 value per channel over all processes to "
            f"compute a batch variance, but the global batch has {n} (this rank's input has "
            f"shape {tuple(shape)}). Use bigger per-rank batches, GroupNorm, "
            "FilterResponseNorm, FrozenBatchNorm, or call .eval() to use the running "
            "statistics."
        )
