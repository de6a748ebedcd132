""":func:`recalibrate`: precise running statistics, population statistics over many batches.

A BatchNorm's running statistics are a moving average of noisy per-batch estimates
taken while the weights were still moving; :func:`recalibrate` replaces them with
the statistics of the data fed, every value counted once, the weights fixed.
``method="precise"`` (Precise BN) takes them in training mode, as training saw its
inputs, in one pass; ``method="exact"`` reaches the eval-mode fixed point level by
level (:mod:`normlab.recalibrate.levels`). ``variance`` picks the pooled
(``"population"``) or the per-batch estimate. Why each choice, the accumulator and
the protocol a layer follows to take part are in ``docs/recalibrate.md``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from torch import nn

from .._core.collectives import resolve_process_group
from ..convert.frozen_stats import asked_training, is_stats_frozen
from ..convert.select import Filter, Filters, select_modules
from .exact import exact_passes
from .passes import Buffers, Survey, progress_bar, run_pass, write
from .population import VARIANCES, Population, Variance
from .ranks import Ranks, local_forwards

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from typing_extensions import Unpack

__all__ = ["RecalibrationReport", "recalibrate"]

Method = Literal["precise", "exact"]
METHODS = ("precise", "exact")
LEVELS = ("graph", "sequential")


@dataclass(frozen=True)
class RecalibrationReport:
    """What :func:`recalibrate` did (``return_report=True``); paths as in ``named_modules``.

    Attributes:
        model: the model, recalibrated in place.
        method, variance: as passed.
        num_batches: batches per pass.
        passes: passes over the batches (exact: one per level, plus repeats).
        recalibrated: layers whose statistics were written.
        frozen: frozen BatchNorms, skipped: their statistics are fixed by design.
        untracked: normalization layers without running statistics (they always
            normalize with batch statistics): nothing to recalibrate.
        unknown: other modules holding ``running_mean`` / ``running_var`` whose
            traits name no kind (their class declares no ``_recalibrate_kind``):
            skipped.
        unseen: layers that never ran on the batches and kept their statistics.
        levels: exact: the layers of each dependency level; precise: empty.
        filtered: layers ``include=`` / ``exclude=`` left out (kept their statistics).
    """

    model: nn.Module
    method: str
    variance: str
    num_batches: int
    passes: int
    recalibrated: tuple[str, ...]
    frozen: tuple[str, ...]
    untracked: tuple[str, ...]
    unknown: tuple[str, ...]
    unseen: tuple[str, ...]
    levels: tuple[tuple[str, ...], ...] = ()
    filtered: tuple[str, ...] = ()


class _RecalibrateOptions(Filters, total=False):
    forward_fn: Callable[[nn.Module, Any], Any] | None
    method: Method
    variance: Variance
    levels: Literal["graph", "sequential"]
    progress: bool | None
    process_group: ProcessGroup | str | None


@overload
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = ...,
    *,
    return_report: Literal[False] = ...,
    **options: Unpack[_RecalibrateOptions],
) -> nn.Module: ...


@overload
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = ...,
    *,
    return_report: Literal[True],
    **options: Unpack[_RecalibrateOptions],
) -> RecalibrationReport: ...


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    method: Method = "precise",
    variance: Variance = "population",
    levels: Literal["graph", "sequential"] = "graph",
    progress: bool | None = None,
    process_group: ProcessGroup | str | None = None,
    include: Filter = None,
    exclude: Filter = None,
    return_report: bool = False,
) -> nn.Module | RecalibrationReport:
    """Set every layer's running statistics to the population statistics of the data fed.

    ``docs/recalibrate.md`` explains the two methods (which statistics each computes
    and why), the variance choice, and which layers take part.

    Args:
        model: modified in place (running buffers only) and returned.
        batches: an iterable of batches, run through :func:`normlab.feed.feed`: a
            tensor (``model(x)``), a list of (C, H, W) images (detectors), a
            tuple/list (``model(*batch)``) or a dict (``model(**batch)``), on the
            model's device. A DataLoader works; extra items such as labels must
            be dropped with ``forward_fn``. ``method="exact"`` iterates it once
            per pass: an iterator is cached in memory, a re-iterable (list,
            DataLoader) is iterated again, so it should give the same batches.
        num_batches: use the first ``num_batches`` batches (default: all).
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch,
            e.g. ``lambda m, b: m(b["image"].cuda())``.
        method: ``"precise"`` (train-mode statistics, one pass) or ``"exact"``
            (the eval-mode fixed point, one pass per dependency level).
        variance: ``"population"`` (pooled variance of all values) or
            ``"per_batch"`` (count-weighted mean of per-batch variances).
        levels: ``method="exact"`` only: ``"graph"`` reads the dependency levels
            from autograd (``"sequential"`` when the forward runs with autograd
            off); ``"sequential"`` runs one layer per pass in call order (slower;
            for models whose dependencies autograd does not see, e.g. detached).
        progress: a tqdm progress bar: True, False, or None (only on a terminal).
        process_group: ``None`` (this process alone), ``"world"`` (the default group)
            or a ``ProcessGroup``: each rank feeds its own batches (any number,
            none included; ``num_batches`` caps each rank's) and the statistics are
            those of all ranks' batches together, the same on every rank
            (:mod:`normlab.recalibrate.ranks`). Call it on every rank of the group.
            A group of one process, or torch.distributed not initialized: as None.
        include, exclude: which layers (module-path globs or a predicate
            ``(name, module) -> bool``; :func:`normlab.convert.select.select_modules`);
            the others keep their statistics (``report.filtered``). A BatchNorm
            whose statistics ``freeze_bn(stats_only=True)`` fixed counts as frozen.
        return_report: return a :class:`RecalibrationReport` instead of ``model``.

    Returns:
        ``model`` (or the report). ``num_batches_tracked`` equals the number of
        batches used (over all ranks).

    Raises:
        ValueError: ``batches`` is empty or yields fewer than ``num_batches``,
            ``num_batches < 1``, an unknown option, a train-mode layer sees one
            value per channel, or some statistic is not finite. Nothing is
            written in any of these cases.

    Warns:
        RuntimeWarning: no layer has statistics to recalibrate (frozen ones are
            named); some layers were never called (they keep their old
            statistics); a cyclic level did not converge.

    Example::

        >>> model.eval()
        >>> recalibrate(model, (x for x, _ in loader), num_batches=200)
    """
    if num_batches is not None and int(num_batches) < 1:
        raise ValueError(f"recalibrate: num_batches must be >= 1 or None, got {num_batches}.")
    for name, value, allowed in (
        ("method", method, METHODS),
        ("variance", variance, VARIANCES),
        ("levels", levels, LEVELS),
    ):
        if value not in allowed:
            raise ValueError(
                f"recalibrate: {name}={value!r} is not one of {', '.join(map(repr, allowed))}."
            )
    group = resolve_process_group(process_group)
    ranks = None if group is None else Ranks(group)
    survey = Survey(model)
    filtered = _select(model, survey, include, exclude)
    if not survey.layers:
        warnings.warn(survey.nothing_to_do(), RuntimeWarning, stacklevel=2)
        report = _report(model, method, variance, 0, 0, survey, [], [], filtered)
        return report if return_report else model

    pops = {lid: Population(m, kind, path, variance) for lid, (m, path, kind) in survey.items()}
    flags = [(m, asked_training(m)) for m in model.modules()]
    buffers = Buffers(m for m, _, _ in survey.layers.values())
    level_paths: list[list[str]] = []
    try:
        if method == "precise":
            for m, _, _ in survey.layers.values():
                m.train(True)
            total = num_batches if num_batches is not None else _len(batches)
            with progress_bar(progress, "recalibrate (precise)", "batch", total) as bar:
                run = functools.partial(
                    run_pass, model, batches, num_batches, forward_fn, pops, True, bar
                )
                if ranks is None:
                    count = run()
                else:
                    with local_forwards(model):
                        count = ranks.pooled(pops, functools.partial(run, shard=True))
            passes = 1
            buffers.restore()  # undo the train-mode updates before writing
            write(survey, pops, count)
        else:
            for m, _, _ in survey.layers.values():
                m.train(False)
            count, passes, level_paths = exact_passes(
                model, batches, num_batches, forward_fn, survey, pops, levels, progress, ranks
            )
    except BaseException:
        buffers.restore()
        raise
    finally:
        for m, flag in flags:
            m.training = flag
    unseen = [pops[lid].path for lid in survey.layers if pops[lid].mean is None]
    if unseen:
        warnings.warn(
            f"recalibrate: {', '.join(unseen)} never ran on the batches given and kept "
            "their old statistics.",
            RuntimeWarning,
            stacklevel=2,
        )
    report = _report(model, method, variance, count, passes, survey, unseen, level_paths, filtered)
    return report if return_report else model


def _select(model: nn.Module, survey: Survey, include: Filter, exclude: Filter) -> list[str]:
    """Keep in ``survey.layers`` only what the filters select; stats-frozen BNs count as frozen.
    Returns the paths the filters left out."""
    for lid, (m, path, _) in list(survey.layers.items()):
        if is_stats_frozen(m):
            survey.frozen.append(path)
            del survey.layers[lid]
    chosen = select_modules(
        model, include, exclude, candidates=lambda m: id(m) in survey.layers, tool="recalibrate"
    )
    for lid in [lid for lid in survey.layers if lid not in chosen.chosen]:
        del survey.layers[lid]
    return list(chosen.left_out)


def _len(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _report(
    model: nn.Module,
    method: str,
    variance: str,
    count: int,
    passes: int,
    survey: Survey,
    unseen: list[str],
    level_paths: list[list[str]],
    filtered: list[str],
) -> RecalibrationReport:
    done = [path for lid, (_, path, _) in survey.items() if path not in unseen]
    return RecalibrationReport(
        model=model,
        method=method,
        variance=variance,
        num_batches=count,
        passes=passes,
        recalibrated=tuple(done),
        frozen=tuple(survey.frozen),
        untracked=tuple(survey.untracked),
        unknown=tuple(survey.unknown),
        unseen=tuple(unseen),
        levels=tuple(tuple(p) for p in level_paths),
        filtered=tuple(filtered),
    )
