"""Recalibration across processes: every rank feeds its own batches, the pools merge.

With ``recalibrate(..., process_group=...)`` each rank runs the passes over its own
batches (any number of them, none included). After each pass every layer's float64
pool (count, mean, ``M_2``, the per-batch sums; :class:`Population`) is gathered from
every rank and merged in rank order with the pool's own merge (:meth:`Population.absorb`,
Chan's update), so every rank writes the same statistics, those one process would
compute fed the union of all ranks' batches. The outcome of each rank's pass travels
with its pool: an error on one rank is raised on every rank, so none waits in a
collective and no statistic is written anywhere. During the passes the model's synced
layers normalize locally (each batch with its own statistics, as one process fed
these batches would), which also lets the ranks run different numbers of forwards.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..distributed import is_sync_layer
from .levels import Level
from .population import Population

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .passes import Survey

__all__ = ["Ranks"]

_State = tuple[int, Tensor | None, Tensor | None, Tensor | None, int]


class Ranks:
    """The ranks of one distributed :func:`~normlab.recalibrate.recalibrate` call."""

    def __init__(self, group: ProcessGroup) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def _gather(self, error: Exception | None, payload: Any) -> list[Any]:
        """Every rank's payload, in rank order; raises on every rank if any rank failed."""
        import torch.distributed as dist

        message = None if error is None else f"{type(error).__name__}: {error}"
        rows: list[Any] = [None] * self.world
        dist.all_gather_object(rows, (message, payload), group=self.group)
        failed = [(r, m) for r, (m, _) in enumerate(rows) if m is not None]
        if error is not None:
            raise error
        if failed:
            r, m = failed[0]
            raise RuntimeError(
                f"recalibrate: rank {r} of {self.world} failed ({m}); no statistic was "
                "changed on any rank."
            )
        return [p for _, p in rows]

    def pooled(self, pops: dict[int, Population], run: Callable[[], int]) -> int:
        """Run this rank's pass (``run`` returns its batch count), then merge every
        layer's pool over the ranks into ``pops``; returns the batches of all ranks."""
        count, error = 0, None
        try:
            count = run()
        except Exception as e:  # raised after the exchange, on every rank
            error = e
        states = [(p.path, p.kind, _portable(p.state())) for p in pops.values()]
        rows = self._gather(error, (count, states))
        layout = [[(path, kind) for path, kind, _ in s] for _, s in rows]
        if any(lay != layout[0] for lay in layout):
            raise RuntimeError(
                "recalibrate: the ranks' models have different normalization layers; every "
                "rank must pass the same model architecture."
            )
        for i, pop in enumerate(pops.values()):
            pop.clear()
            for _, s in rows:
                pop.absorb(_to(s[i][2], pop.device))
        total = sum(c for c, _ in rows)
        if total == 0:
            raise ValueError(
                "recalibrate: no rank's `batches` yielded a batch, so there is no data to "
                "compute statistics from. Pass a fresh iterable on at least one rank."
            )
        return total

    def plan(self, survey: Survey, local: Callable[[], list[Level] | None]) -> list[Level]:
        """The dependency levels of the first rank that holds a batch, for every rank
        (so that all run the same passes); ``local`` gives this rank's, or None."""
        levels, error = None, None
        try:
            levels = local()
        except Exception as e:
            error = e
        paths = (
            None
            if levels is None
            else [([survey.layers[lid][1] for lid in ids], cyclic) for ids, cyclic in levels]
        )
        found = next((p for p in self._gather(error, paths) if p is not None), None)
        if found is None:
            raise ValueError(
                "recalibrate: no rank's `batches` yielded a batch, so there is no data to "
                "compute statistics from. Pass a fresh iterable on at least one rank."
            )
        by_path = {path: lid for lid, (_, path, _) in survey.items()}
        return [([by_path[p] for p in ps], cyclic) for ps, cyclic in found]


@contextlib.contextmanager
def local_forwards(model: nn.Module) -> Iterator[None]:
    """Within the block, normlab's synced layers and torch's ``SyncBatchNorm`` normalize
    with this process's batch statistics only (no collective in their forward)."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for m in model.modules():
            if is_sync_layer(m):
                saved.append((m, "process_group", m.process_group))
                m.process_group = None
            elif isinstance(m, nn.SyncBatchNorm):
                saved.append((m, "forward", m.__dict__.get("forward")))
                base = nn.modules.batchnorm._BatchNorm.forward
                m.forward = types.MethodType(base, m)  # type: ignore[method-assign]
        yield
    finally:
        for m, name, value in reversed(saved):
            if name == "forward" and value is None:
                del m.forward
            else:
                setattr(m, name, value)


def _portable(state: _State) -> _State:
    n, mean, m2, var_sum, var_n = state
    return (n, _cpu(mean), _cpu(m2), _cpu(var_sum), var_n)


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


def _to(state: _State, device: torch.device | None) -> _State:
    n, mean, m2, var_sum, var_n = state
    move = [t if t is None or device is None else t.to(device) for t in (mean, m2, var_sum)]
    return (n, move[0], move[1], move[2], var_n)
