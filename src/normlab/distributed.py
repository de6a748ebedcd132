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

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._core.collectives import (
    WORLD,
    GlobalMoments,
    all_reduce_sum,
    check_global_count,
    check_group_arg,
    local_moments,
    resolve_process_group,
    safe_pivot,
    sync_active,
    sync_moments,
)
from .convert.frozen_stats import asked_training, carry_stats_freeze, is_stats_frozen
from .convert.select import Filter, select_modules
from .convert.surgery import BATCH_NORM_BY_RANK, rank_of, replace
from .kinds import has_trait, holds_running_stats

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
    "sync_running_stats",
]


# ----------------------------------------------------------------------------- conversion


def is_sync_layer(module: nn.Module) -> bool:
    """True for a normlab layer that takes ``process_group`` (its traits say ``syncable``)."""
    return has_trait(module, "syncable")


_TORCH_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _is_torch_bn(module: nn.Module) -> bool:
    """torch's BatchNorm1d/2d/3d (and subclasses) or SyncBatchNorm."""
    return isinstance(module, (*_TORCH_BN, torch.nn.SyncBatchNorm))


def _from_torch_bn(old: nn.Module, process_group: Any) -> nn.Module:
    """normlab BatchNorm sharing ``old``'s parameters and buffers (same tensors)."""
    new = _twin(BATCH_NORM_BY_RANK[rank_of(old) or 2], old, process_group=process_group)
    if type(old) in _TORCH_BN:  # exact classes: a subclass may take other arguments
        new._sync_reverts_to = type(old)  # type: ignore[assignment]
    return new


def _twin(cls: type[nn.Module], old: nn.Module, **kwargs: Any) -> nn.Module:
    """A ``cls`` BatchNorm with ``old``'s arguments, pointing at ``old``'s parameters and
    buffers (the same tensors, so an optimizer keeps working) and training flag."""
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",
        **kwargs,
    )
    for name in ("weight", "bias"):
        new._parameters[name] = old._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(asked_training(old))
    if is_stats_frozen(old):  # freeze_bn(stats_only=True) survives the swap
        carry_stats_freeze(new)
    return new


def convert_sync(
    model: nn.Module,
    process_group: ProcessGroup | str | None = None,
    *,
    include: Filter = None,
    exclude: Filter = None,
) -> nn.Module:
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
        include, exclude: which layers (module-path globs or a predicate
            ``(name, module) -> bool``; :func:`normlab.convert.select.select_modules`);
            the others are left as they are.

    Returns:
        The model. On a single process it still runs unchanged (sync is a no-op).
        There is no report: ``select_modules(model, include, exclude).left_out``
        lists the modules the filters leave out.
    """
    group = WORLD if process_group is None else process_group
    check_group_arg(group)
    selection = select_modules(
        model, include, exclude, candidates=_convertible, tool="convert_sync"
    )

    def build(m: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        if is_sync_layer(m):
            m.process_group = group
            return m, {}
        return _from_torch_bn(m, group), {}

    return replace(model, selection.match(_convertible), build)[0]


def _convertible(m: nn.Module) -> bool:
    return is_sync_layer(m) or _is_torch_bn(m)


def revert_sync(model: nn.Module, *, include: Filter = None, exclude: Filter = None) -> nn.Module:
    """Turn cross-process statistics off again (the inverse of :func:`convert_sync`).

    Every supported normlab layer gets ``process_group=None``; layers that
    :func:`convert_sync` made from torch's ``BatchNorm1d/2d/3d`` become that torch
    class again (sharing parameters and buffers). Those made from
    ``SyncBatchNorm`` stay normlab BatchNorm, unsynced. ``include`` / ``exclude``
    pick the layers, as in :func:`convert_sync`.

    Returns:
        The model, modified in place (no report; ``select_modules(model, include,
        exclude).left_out`` lists what the filters leave out).
    """
    selection = select_modules(
        model, include, exclude, candidates=is_sync_layer, tool="revert_sync"
    )

    def build(m: nn.Module, path: str) -> tuple[nn.Module, dict[str, Any]]:
        m.process_group = None
        cls = m.__dict__.get("_sync_reverts_to")
        if cls is None:
            return m, {}
        return _twin(cls, m), {}

    return replace(model, selection.match(is_sync_layer), build)[0]


# ----------------------------------------------------------------------------- running statistics

SYNC_MODES = ("reduce", "broadcast")


def _running_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(dotted name, buffer)`` of every running buffer, in ``named_modules`` order."""
    found = []
    for path, module in model.named_modules():
        if holds_running_stats(module):
            for name, buf in module._buffers.items():
                if buf is not None:
                    found.append((f"{path}.{name}" if path else name, buf))
    return found


def sync_running_stats(
    model: nn.Module, mode: str = "reduce", group: ProcessGroup | str | None = WORLD
) -> list[str]:
    """Make every running statistic of ``model`` identical on every rank of ``group``.

    Under ``DistributedDataParallel`` each rank updates its norm layers' running
    statistics from its own batches, so the ranks' models disagree in eval and the
    checkpoint depends on which rank saves it. This makes them agree, for torch's
    norm layers as for normlab's (every buffer of every layer whose training
    forward updates buffers: ``running_mean``, ``running_var``,
    ``num_batches_tracked`` and each layer's own state, e.g. MovingAverageBN's):

    * ``mode="reduce"``: the mean over the ranks, computed in float64 (as timm's
      ``distribute_bn(reduce=True)``; a mean of variances, not the pooled variance).
      Integer buffers (step counters) take the mean rounded down.
    * ``mode="broadcast"``: rank 0's values (the group's first rank).

    One collective per buffer dtype. Call it at the same point on every rank (before
    evaluating or saving). A no-op returning ``[]`` when torch.distributed is not
    initialized or the group has one process.

    Returns:
        The dotted names of the buffers synchronized.

    Raises:
        ValueError: ``mode`` is not "reduce" or "broadcast".
        RuntimeError: the ranks' models hold different running buffers (raised on
            every rank, so none waits for the others).
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"sync_running_stats: mode must be one of {SYNC_MODES}, got {mode!r}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"sync_running_stats: expected an nn.Module, got {type(model).__name__}.")
    pg = resolve_process_group(group)
    if pg is None:
        return []
    import torch.distributed as dist

    buffers = _running_buffers(model)
    _check_same_layout(buffers, pg)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for _, buf in buffers:
        by_dtype.setdefault(buf.dtype, []).append(buf)
    world = dist.get_world_size(pg)
    for dtype in sorted(by_dtype, key=str):
        bufs = by_dtype[dtype]
        wide = torch.float64 if dtype.is_floating_point else torch.int64
        flat = torch.cat([b.detach().reshape(-1).to(wide) for b in bufs])
        if mode == "broadcast":
            dist.broadcast(flat, src=dist.get_global_rank(pg, 0), group=pg)
        else:
            dist.all_reduce(flat, group=pg)
            flat = (
                flat / world if dtype.is_floating_point else flat.div(world, rounding_mode="floor")
            )
        with torch.no_grad():
            for b, part in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                b.copy_(part.reshape(b.shape).to(dtype))
    return [name for name, _ in buffers]


def _check_same_layout(buffers: list[tuple[str, torch.Tensor]], group: ProcessGroup) -> None:
    """Raise on every rank when the ranks' running buffers differ in number or size."""
    import torch.distributed as dist

    device = buffers[0][1].device if buffers else torch.device("cpu")
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    sizes = torch.tensor([len(buffers), sum(b.numel() for _, b in buffers)], device=device)
    low, high = sizes.clone(), sizes.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            "sync_running_stats: the ranks' models hold different running buffers (between "
            f"{low.tolist()} and {high.tolist()} [buffers, values]); every rank must pass "
            "the same model architecture."
        )
