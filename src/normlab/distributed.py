r"""Cross-process batch statistics over :mod:`torch.distributed` (any backend: gloo, nccl, ...).

When each process holds a small batch, the batch statistics of BatchNorm-like
layers are noisy. Synchronizing them makes every process normalize with the
statistics of the *global* batch (the concatenation of all ranks' batches), so a
synced layer on K processes computes exactly what the unsynced layer computes on
one process holding the whole batch: the same outputs, input gradients,
parameter gradients (summed over ranks, as ``DistributedDataParallel`` does up to
its averaging) and running statistics.

**Which layers.** Every normlab layer that uses batch statistics takes a
``process_group`` argument: ``BatchNorm1d/2d/3d``, ``SwitchableNorm1d/2d/3d``
(its BN branch; IN and LN stay per sample), ``MovingAverageBatchNorm1d/2d/3d``
(χ in forward, ψ in backward), ``BatchRenorm1d/2d/3d`` and ``EvoNormB0_2d``.

* ``process_group=None`` (the default): no synchronization, the layer is local.
* ``process_group="world"``: the default group (every process of the job).
* ``process_group=<ProcessGroup>``: that group, e.g. from
  :func:`torch.distributed.new_group` (sync within each node, say).

:func:`convert_sync` turns sync on for every supported layer of a model (and
replaces torch's ``BatchNorm*d`` / ``SyncBatchNorm`` by normlab's BatchNorm);
:func:`revert_sync` turns it off again. ``convert_norms(model, to, sync=True)``
builds the new layers synced.

**Single process is a no-op.** With ``process_group=None``, when
:mod:`torch.distributed` is unavailable or not initialized, or when the group
has one process, a layer does no communication and raises nothing: it is
exactly the unsynced layer. So one script runs unchanged under ``python`` and
under ``torchrun``.

**Launch.** Initialize the default group before the first training forward,
e.g. with ``torchrun --nproc-per-node K train.py`` and in ``train.py``::

    import torch.distributed as dist
    dist.init_process_group("gloo")  # "nccl" on GPUs; torchrun sets rank/world size
    model = normlab.distributed.convert_sync(build_model())
    model = torch.nn.parallel.DistributedDataParallel(model)

**Communication.** In training, per layer and step:

* forward: **one** ``all_gather`` of a packed ``[count, shift(C), mean(C),
  M2(C)]`` vector per rank (``M2 = count·var``, the sum of squared deviations
  from the rank's mean, and ``mean`` relative to the rank's ``shift``, one
  sample per channel). Every rank merges the gathered rows the same way, in
  float64, with Chan's parallel formula around one common shift (the first
  non-empty rank's): with ``d_r = mean_r + shift_r − s``,

  .. math:: N = \sum_r n_r,\quad m = \frac{1}{N}\sum_r n_r d_r,\quad
            M_2 = \sum_r M_{2,r} + \sum_r n_r (d_r - m)^2

  so off-center data (mean 1e4, std 1e-2 in fp32) keep their digits; nothing
  ever computes ``Σx² − (Σx)²/N`` on raw values. MovingAverageBatchNorm gathers
  its second moment ``χ = E[x²]`` the same way (a count-weighted mean).
* backward: **one** ``all_reduce`` (sum) of the gradient terms: the gradients of
  the rank's loss with respect to the global mean and variance (for BatchNorm
  these are ``−Σ dy·γ/σ`` and ``−½ Σ dy·γ·x̂/σ²``, the ``Σdy`` / ``Σdy·x̂``
  terms), or, for MovingAverageBatchNorm, ``Σ dy·x`` (its ψ).
* eval: no communication (running statistics are local and identical on every
  rank).

**Uneven and empty batches.** Ranks may hold different batch sizes, and a rank
may hold an empty batch (N = 0): it still joins every collective (so nothing
hangs), contributes a count of 0, and returns an empty output. The "more than
one value per channel" rule of training applies to the *global* count, so a
rank with one sample is fine when the others hold more.

**Caveats.** Every rank of the group must run the same synced layers in the
same order, in forward and in backward (as with ``torch.nn.SyncBatchNorm``): a
rank whose loss does not depend on a synced layer's output skips that layer's
backward collective and the others wait for it until the group's timeout.
Parameter gradients stay per rank; ``DistributedDataParallel`` averages them,
which equals the single-process gradient of the global mean loss when each
rank's loss is scaled by ``world_size · n_rank / N`` (equal batches: the plain
per-rank mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "WORLD",
    "GlobalMoments",
    "resolve_process_group",
    "sync_active",
    "sync_moments",
    "local_moments",
    "safe_pivot",
    "check_global_count",
    "all_reduce_sum",
    "convert_sync",
    "revert_sync",
    "is_sync_layer",
]

WORLD = "world"
"""``process_group=WORLD`` (the string ``"world"``) syncs over the default group."""


# ----------------------------------------------------------------------------- groups


def _check_group_arg(process_group: Any) -> None:
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
    _check_group_arg(process_group)
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
    """One sample of ``x`` per channel (index 0 along ``dims``, kept dims), detached.

    Like :func:`normlab.functional._stats.pivot`, but an empty ``x`` (a rank with
    no samples) gets a zero pivot of the kept-dims shape instead of an error.
    """
    dims = tuple(sorted(d % x.dim() for d in dims))
    if x.numel() == 0:
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    p = x.detach()
    for d in dims:
        p = p.narrow(d, 0, 1)
    return p


def local_moments(xc: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Biased ``(mean, var, count)`` of ``xc`` over ``dims`` (kept dims), differentiable.

    An empty reduction (count 0) gives zeros that stay connected to the graph
    (so the rank still runs the backward collective), not NaN.
    """
    dims = tuple(sorted(d % xc.dim() for d in dims))
    count = 1
    for d in dims:
        count *= xc.shape[d]
    if count == 0:
        zero = xc.sum(dim=dims, keepdim=True)
        return zero, zero, 0
    var, mean = torch.var_mean(xc, dim=dims, correction=0, keepdim=True)
    return mean, var.clamp_min(0), count


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


# ----------------------------------------------------------------------------- conversion


def is_sync_layer(module: nn.Module) -> bool:
    """True for a normlab layer that takes ``process_group`` (batch statistics)."""
    from .nn.batch_norm import _BatchNorm
    from .nn.batch_renorm import _BatchRenorm
    from .nn.evonorm import EvoNormB0_2d
    from .nn.moving_average_batch_norm import _MovingAverageBatchNorm
    from .nn.switchable_norm import _SwitchableNorm

    return isinstance(
        module, (_BatchNorm, _SwitchableNorm, _MovingAverageBatchNorm, _BatchRenorm, EvoNormB0_2d)
    )


_TORCH_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _from_torch_bn(old: nn.Module, process_group: Any) -> nn.Module:
    """normlab BatchNorm sharing ``old``'s parameters and buffers (same tensors)."""
    from . import nn as nnl

    by_class = {
        torch.nn.BatchNorm1d: nnl.BatchNorm1d,
        torch.nn.BatchNorm2d: nnl.BatchNorm2d,
        torch.nn.BatchNorm3d: nnl.BatchNorm3d,
    }
    cls = next((v for k, v in by_class.items() if isinstance(old, k)), nnl.BatchNorm2d)
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",
        process_group=process_group,
    )
    _share_state(old, new)
    if type(old) in _TORCH_BN:  # exact classes: a subclass may take other arguments
        new._sync_reverts_to = type(old)  # type: ignore[assignment]
    return new


def _share_state(old: nn.Module, new: nn.Module) -> None:
    """Point ``new``'s parameters and buffers at ``old``'s (an optimizer keeps working)."""
    for name in ("weight", "bias"):
        new._parameters[name] = old._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)


def _replace_modules(model: nn.Module, build: Any) -> nn.Module:
    """Replace each module for which ``build`` returns a module; one new per old object."""
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                new = build(child)
                done[id(child)] = child if new is None else new
                if new is None:
                    visit(child)
            setattr(module, name, done[id(child)])

    root = build(model)
    if root is not None:
        return root
    visit(model)
    return model


def convert_sync(model: nn.Module, process_group: ProcessGroup | str | None = None) -> nn.Module:
    """Turn on cross-process statistics for every batch-statistics layer of ``model``.

    * normlab's BatchNorm, SwitchableNorm, MovingAverageBatchNorm, BatchRenorm
      and EvoNormB0 layers get ``process_group`` set (the same objects: parameters,
      buffers, the training flag and any optimizer stay as they are);
    * torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` are replaced by normlab's
      ``BatchNorm1d/2d/3d`` (SyncBatchNorm, whose class gives no rank, by
      ``BatchNorm2d``) that *share* their parameter and buffer tensors, with the
      same eps, momentum, affine, track_running_stats and training flag.

    Args:
        model: modified in place and returned (a new object only when ``model``
            itself is a torch BatchNorm).
        process_group: the group; ``None`` (as in
            ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) or ``"world"``
            means the default group.

    Returns:
        The model. On a single process it still runs unchanged (sync is a no-op).
    """
    group = WORLD if process_group is None else process_group
    _check_group_arg(group)

    def build(m: nn.Module) -> nn.Module | None:
        if is_sync_layer(m):
            m.process_group = group
            return m
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
            isinstance(m, _TORCH_BN) or isinstance(m, torch.nn.SyncBatchNorm)
        ):
            return _from_torch_bn(m, group)
        return None

    return _replace_modules(model, build)


def revert_sync(model: nn.Module) -> nn.Module:
    """Turn cross-process statistics off again (the inverse of :func:`convert_sync`).

    Every supported normlab layer gets ``process_group=None``; layers that
    :func:`convert_sync` made from torch's ``BatchNorm1d/2d/3d`` become that torch
    class again (sharing parameters and buffers). Those made from
    ``SyncBatchNorm`` stay normlab BatchNorm, unsynced.

    Returns:
        The model, modified in place.
    """

    def build(m: nn.Module) -> nn.Module | None:
        if not is_sync_layer(m):
            return None
        m.process_group = None
        cls = m.__dict__.get("_sync_reverts_to")
        if cls is None:
            return m
        old = cls(
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            device="meta",
        )
        _share_state(m, old)
        return old

    return _replace_modules(model, build)
