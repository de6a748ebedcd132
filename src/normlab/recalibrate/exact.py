"""The exact method's passes: one eval-mode pass per dependency level
(:mod:`normlab.recalibrate.levels`), each writing its layers' statistics before the
next, a cyclic level repeated until it settles; across processes the pools of each
pass merge over the ranks first (:mod:`normlab.recalibrate.ranks`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from . import levels as lv
from .passes import Survey, progress_bar, replay, run_pass, write
from .population import Population, Variance

if TYPE_CHECKING:
    from .ranks import Ranks

__all__ = ["exact_passes"]


def exact_passes(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    survey: Survey,
    pops: dict[int, Population],
    levels: str,
    progress: bool | None,
    ranks: Ranks | None = None,
) -> tuple[int, int, list[list[str]]]:
    """The eval-mode fixed point, level by level; returns (batches, passes, level paths).

    With ``ranks``, this process's batches are its share: each pass's pools merge over
    the ranks before they are written, and every rank follows the first rank's levels.
    """
    source = replay(batches, num_batches)
    first = next(iter(source()), None)
    layers = {lid: m for lid, (m, _, _) in survey.items()}
    if ranks is None:
        if first is None:
            raise ValueError(
                "recalibrate: `batches` yielded no batch, so there is no data to compute "
                "statistics from (an exhausted iterator or generator?). Pass a fresh iterable."
            )
        plan = _plan(model, layers, first, forward_fn, levels)
    else:
        plan = ranks.plan(
            survey,
            lambda: None if first is None else _plan(model, layers, first, forward_fn, levels),
        )
    count, passes = 0, 0
    local: list[int] = []  # this process's batches per pass
    calls: list[dict[int, int]] = []  # per batch, filled by the first pass
    with progress_bar(progress, "recalibrate (exact)", "pass", len(plan)) as bar:
        for ids, cyclic in plan:
            change, settled = 0.0, True
            for _ in range(_MAX_REPEATS if cyclic else 1):
                level_pops = {lid: _fresh(survey, lid, pops[lid].variance) for lid in ids}
                one_pass = functools.partial(
                    _level_pass,
                    model,
                    source,
                    num_batches,
                    forward_fn,
                    level_pops,
                    calls,
                    local,
                    shard=ranks is not None,
                )
                count = one_pass() if ranks is None else ranks.pooled(level_pops, one_pass)
                passes += 1
                for lid in ids:
                    pops[lid] = level_pops[lid]
                change, settled = write(survey, level_pops, count)
                if settled:
                    break
            if cyclic and not settled:
                names = ", ".join(survey.layers[lid][1] for lid in ids)
                warnings.warn(
                    f"recalibrate: {names} depend on their own output and their statistics "
                    f"still changed by {change:.2g} (relative) after {_MAX_REPEATS} passes; "
                    "they are not at the fixed point. Call recalibrate again or feed more data.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if bar is not None:
                bar.update(1)
    return count, passes, [[survey.layers[lid][1] for lid in ids] for ids, _ in plan]


_MAX_REPEATS = 30


def _level_pass(
    model: nn.Module,
    source: Callable[[], Iterable[Any]],
    num_batches: int | None,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    pops: dict[int, Population],
    calls: list[dict[int, int]],
    local: list[int],
    shard: bool = False,
) -> int:
    """One eval-mode pass of :func:`exact_passes` (the first records ``calls``, later
    ones stop early by them); ``local`` collects each pass's count, which must not vary."""
    n = run_pass(
        model,
        source(),
        num_batches,
        forward_fn,
        pops,
        False,
        None,
        record=None if local else calls,
        expect=calls if local else None,
        shard=shard,
    )
    if local and n != local[0]:
        raise ValueError(
            f"recalibrate: `batches` gave {local[0]} batches on the first pass and {n} on a "
            "later one; method='exact' needs the same batches on every pass (a list, or a "
            "DataLoader that yields a fixed number)."
        )
    local.append(n)
    return n


def _fresh(survey: Survey, lid: int, variance: Variance) -> Population:
    m, path, kind = survey.layers[lid]
    return Population(m, kind, path, variance)


def _plan(
    model: nn.Module,
    layers: dict[int, nn.Module],
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    levels: str,
) -> list[lv.Level]:
    """The passes over ``layers`` (id -> layer), read from one traced forward on ``batch``
    (``levels``: ``"graph"`` or ``"sequential"``)."""
    order, deps, ncalls, blind = lv.trace(model, layers, batch, forward_fn)
    if levels == "graph" and not blind:
        out = lv.graph_levels(order, deps)
    else:
        out = lv.sequential_levels(order, ncalls)
    # Layers the traced batch did not reach (a data-dependent branch) go last, together.
    reached = set(order)
    missing = [lid for lid in layers if lid not in reached]
    if missing:
        out.append((missing, False))
    return out
