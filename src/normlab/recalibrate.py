"""Precise running statistics: population statistics over many batches, right at any depth.

A BatchNorm's running statistics are an exponential moving average of noisy
per-batch estimates taken while the weights were still moving. After training
(or after converting, fusing, changing the data), :func:`recalibrate` replaces
them with the statistics of the data you feed, every value counted once
whatever the batch sizes, with the weights fixed. Which inputs a layer's
statistics are taken from is the ``method``:

``method="precise"`` (default): the statistics the network was trained with
    Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore's
    ``update_bn_stats``). During the pass(es) the recalibrated layers run in
    *training* mode, normalizing with the batch's own statistics exactly as in
    a training step, so every layer sees the inputs it saw in training, and its
    running statistics become the population statistics of those inputs: what
    the moving average was estimating, without its lag and noise. One pass over
    the batches. Feed batches of the training batch size: a train-mode layer's
    output, hence every downstream input, depends on it. A layer needs at least
    2 values per channel in every batch (as in training).
``method="exact"``: the eval-mode fixed point
    Every layer's running statistics equal the population statistics of its
    input when the whole model runs in *eval* mode with the *new* statistics of
    the layers upstream of it: evaluating on these batches, every layer's
    normalized output (before γ and β) then has exactly zero mean and, up to eps
    and n/(n − 1), unit variance per channel over the batches, and calling
    :func:`recalibrate` again changes nothing. Eval-mode inputs depend
    on the upstream running statistics, so the layers are recalibrated level by
    level: one traced forward finds which layers feed which (see
    :mod:`normlab._recal_levels`), then one pass per dependency level, each
    writing its layers' statistics before the next. Layers that depend on each
    other (one layer called twice in a forward) have their pass repeated until
    their statistics stop changing. A pass stops each forward as soon as its
    level's layers have run (the call counts of the first pass tell when), so
    a shallow level costs only the forward up to it. Use it when eval-mode
    behaviour on this data is what matters and train-mode batch statistics are
    not (batches of one, layers that were never trained in training mode).

Nothing else changes: momentum, parameters, every module's training flag (the
other modules keep the mode you set, so call ``model.eval()`` first unless you
want dropout active during the passes) and, until the end, the running buffers
(train-mode forwards update them; they are restored and then overwritten).

Which variance is stored (``variance``), for the batch kinds
    ``"population"`` (default): the unbiased variance of all values seen,
    pooled over the batches with Chan's merge (:mod:`normlab._population`). The
    running variance normalizes single examples drawn from the whole data at
    inference, so it should be the variance of that whole distribution, which
    includes the spread of the batch means. The mean of per-batch variances
    misses that spread: it estimates the population variance only when the
    values in a batch are independent, and a convolution's N·H·W values come
    from a few spatially correlated images. This is the estimator Wu & Johnson
    recommend and fvcore uses (fvcore divides by n, not n − 1: a relative
    difference of 1/(n − 1) with n the values per channel over all batches).
    ``"per_batch"``: the BN paper's Algorithm 2, the mean of the per-batch
    unbiased variances, weighted by each batch's count (what torch's moving
    average and ``torch.optim.swa_utils.update_bn`` estimate, unweighted). A
    layer called twice in one forward normalizes each call with that call's
    statistics in training, so each call counts as one batch.

The protocol: which layers are recalibrated
    A module takes part when its traits name a kind (below) and it holds a
    ``running_mean`` and/or ``running_var`` buffer that is not None. normlab's
    layers and torch's BatchNorm / InstanceNorm have theirs in
    :mod:`normlab.nn.traits`; any other class declares ``_recalibrate_kind``.
    Frozen BatchNorms (:func:`normlab.kinds.is_frozen_batch_norm`: normlab's and
    torchvision's / detectron2's ``FrozenBatchNorm2d``) keep their statistics by
    design and are skipped, as are layers without running buffers (they always
    normalize with batch statistics); the report names them. The statistics are
    taken from the layer's first positional input, channels on dim 1, and written
    into whichever of ``running_mean`` / ``running_var`` exist (shape (C,));
    ``num_batches_tracked`` (if present) is set to the number of batches, except
    in layers whose schedule runs on it (BatchRenorm, MovingAverageBatchNorm; a
    class of your own sets ``_step_counter = True``): those keep it. Kinds:

    ``"batch_mean_var"``
        statistics over all dims but 1 (N and spatial): ``running_mean`` the
        mean, ``running_var`` the variance (BN, BRN, SN's BN branch, EvoNorm B0).
    ``"batch_second_moment"``
        over the same dims, ``running_var`` gets the uncentered second moment
        E[x²] (a norm that divides by it without subtracting the mean, e.g.
        MABN's χ) and ``running_mean`` (if any) the mean.
    ``"instance_mean_var"``
        per (sample, channel) over the spatial dims, as InstanceNorm tracks them:
        ``running_mean`` the average over all instances of the instance means,
        ``running_var`` the average of the instance variances. Unbatched input
        (one rank less than the layer's batched rank) counts as one sample.

    A class may also set ``_recalibrate_unbiased = False`` to store the biased
    (divide-by-n) variance instead of torch's unbiased one.

Statistics that are not finite (NaN or inf activations, or too large for the
buffer's dtype) are refused with an error naming the layers, and the model is
left as it was. In a distributed job every process pools its own inputs: feed
the same batches on every rank, or recalibrate on one rank and broadcast.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, overload

from torch import nn

from ._population import KINDS, VARIANCES, Population, Variance, recalibration_kind
from ._recal_run import Buffers, Survey, exact_passes, progress_bar, run_pass, write

__all__ = ["KINDS", "RecalibrationReport", "recalibrate", "recalibration_kind"]

#: The exact-moments accumulator (:class:`normlab._population.Population`), importable here.
_Population = Population

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


@overload
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = ...,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = ...,
    method: Method = ...,
    variance: Variance = ...,
    levels: Literal["graph", "sequential"] = ...,
    progress: bool | None = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = ...,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = ...,
    method: Method = ...,
    variance: Variance = ...,
    levels: Literal["graph", "sequential"] = ...,
    progress: bool | None = ...,
    return_report: Literal[True],
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
    return_report: bool = False,
) -> nn.Module | RecalibrationReport:
    """Set every layer's running statistics to the population statistics of the data fed.

    See the module docstring for the two methods (which statistics each computes
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
        return_report: return a :class:`RecalibrationReport` instead of ``model``.

    Returns:
        ``model`` (or the report). ``num_batches_tracked`` equals the number of
        batches used.

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
    survey = Survey(model)
    if not survey.layers:
        warnings.warn(survey.nothing_to_do(), RuntimeWarning, stacklevel=2)
        report = _report(model, method, variance, 0, 0, survey, [], [])
        return report if return_report else model

    pops = {lid: Population(m, kind, path, variance) for lid, (m, path, kind) in survey.items()}
    flags = [(m, m.training) for m in model.modules()]
    buffers = Buffers(m for m, _, _ in survey.layers.values())
    level_paths: list[list[str]] = []
    try:
        if method == "precise":
            for m, _, _ in survey.layers.values():
                m.train(True)
            total = num_batches if num_batches is not None else _len(batches)
            with progress_bar(progress, "recalibrate (precise)", "batch", total) as bar:
                count = run_pass(model, batches, num_batches, forward_fn, pops, True, bar)
            passes = 1
            buffers.restore()  # undo the train-mode updates before writing
            write(survey, pops, count)
        else:
            for m, _, _ in survey.layers.values():
                m.train(False)
            count, passes, level_paths = exact_passes(
                model, batches, num_batches, forward_fn, survey, pops, levels, progress
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
    report = _report(model, method, variance, count, passes, survey, unseen, level_paths)
    return report if return_report else model


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
    )
