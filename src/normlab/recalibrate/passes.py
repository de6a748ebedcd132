"""The machinery of :func:`normlab.recalibrate.recalibrate`: finding the layers, running
passes over the batches, validating and writing the statistics all or nothing (the
exact method's passes level by level: :mod:`normlab.recalibrate.exact`).

What is computed and why: ``docs/recalibrate.md`` and :mod:`normlab.recalibrate.population`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..feed import feed
from ..kinds import is_frozen_batch_norm
from ..nn.traits import traits_of
from .population import Population, declared_kind, recalibration_kind

__all__ = ["Buffers", "Survey", "progress_bar", "replay", "run_pass", "write"]

_STAT_BUFFERS = ("running_mean", "running_var")


def _listing(paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


class Survey:
    """The model's normalization layers, sorted into recalibrated, frozen, untracked, unknown."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[int, tuple[nn.Module, str, str]] = {}
        self.frozen: list[str] = []
        self.untracked: list[str] = []
        self.unknown: list[str] = []
        for path, m in model.named_modules():
            path = path or "<model>"
            if is_frozen_batch_norm(m):
                self.frozen.append(path)
            elif (kind := recalibration_kind(m)) is not None:
                self.layers[id(m)] = (m, path, kind)
            elif declared_kind(m) is not None:
                self.untracked.append(path)
            elif any(isinstance(m._buffers.get(b), Tensor) for b in _STAT_BUFFERS):
                self.unknown.append(path)

    def items(self) -> Iterable[tuple[int, tuple[nn.Module, str, str]]]:
        return self.layers.items()

    def nothing_to_do(self) -> str:
        """The warning for a model without a layer to recalibrate: what was found instead."""
        msg = "recalibrate: the model has no layer with running statistics to recalibrate"
        parts = []
        if self.frozen:
            parts.append(
                f"{len(self.frozen)} frozen BatchNorm layer(s) ({_listing(self.frozen)}) are "
                "frozen by design: their statistics are fixed and are not recalibrated. To "
                "recalibrate them, make them trainable BatchNorms first "
                "(normlab.convert.unfreeze_bn)"
            )
        if self.untracked:
            parts.append(
                f"{len(self.untracked)} layer(s) ({_listing(self.untracked)}) keep no running "
                "statistics (track_running_stats=False: they always normalize with batch "
                "statistics)"
            )
        if self.unknown:
            parts.append(
                f"{_listing(self.unknown)} hold running_mean/running_var but their class "
                "declares no _recalibrate_kind (see normlab.recalibrate)"
            )
        return msg + ("; " + "; ".join(parts) if parts else "") + ". Nothing was changed."


class Buffers:
    """A copy of every buffer of ``modules``, to put back after train-mode passes or a failure."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        seen: set[int] = set()
        for m in modules:
            for owner in m.modules():
                if id(owner) in seen:
                    continue
                seen.add(id(owner))
                for name, buf in owner._buffers.items():
                    if isinstance(buf, Tensor):
                        self.saved.append((owner, name, buf, buf.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for owner, name, buf, copy in self.saved:
                buf.copy_(copy)
                owner._buffers[name] = buf


def replay(batches: Iterable[Any], num_batches: int | None) -> Callable[[], Iterable[Any]]:
    """A function giving the batches again on every call (an iterator is cached in memory)."""
    if isinstance(batches, Iterator):
        cached = list(itertools.islice(batches, num_batches) if num_batches else batches)
        return lambda: cached
    return lambda: batches


def progress_bar(
    progress: bool | None, desc: str, unit: str, total: int | None
) -> contextlib.AbstractContextManager[Any]:
    """A tqdm bar (None: only on a terminal), or a null context when tqdm is missing."""
    if progress is False:
        return contextlib.nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext(None)
    disable = None if progress is None else False
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)


def run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    pops: dict[int, Population],
    training: bool,
    bar: Any,
    *,
    record: list[dict[int, int]] | None = None,
    expect: list[dict[int, int]] | None = None,
    shard: bool = False,
) -> int:
    """Feed every batch under no_grad, adding each layer's inputs to ``pops``; the count.

    ``shard``: the batches are this process's share (:mod:`normlab.recalibrate.ranks`):
    none, or fewer than ``num_batches``, is not an error here.

    ``record`` (a list to fill): the calls of each module in ``model`` per batch.
    ``expect``: such a record of an earlier pass over the same batches. The
    forward of batch ``b`` then stops as soon as the layers of ``pops`` have had
    ``expect[b]`` calls, since nothing after that adds to their statistics, and
    a batch in which none of them runs is not fed at all.
    """

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        pop = pops[id(module)]
        if not args:
            raise TypeError(
                f"recalibrate: {pop.path} was called without a positional input; its "
                "statistics are taken from the first positional argument."
            )
        x = args[0]
        if (
            training
            and pop.kind != "instance_mean_var"
            and isinstance(x, Tensor)
            and x.dim() >= 2
            and x.numel() // max(1, x.shape[1]) < 2
        ):
            raise ValueError(
                f"recalibrate: {pop.path} ({pop.name}) got input of shape {tuple(x.shape)}: "
                "one value per channel. method='precise' runs it in training mode, which "
                "normalizes with the batch's statistics and needs at least 2 values per "
                "channel. Feed batches of 2 or more samples, or use method='exact'."
            )
        pop.update(x)

    left: dict[int, int] = {}

    def count_call(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls = record[-1]  # type: ignore[index]
        calls[id(module)] = calls.get(id(module), 0) + 1

    def done(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if id(module) in left:
            left[id(module)] -= 1
            if left[id(module)] == 0:
                del left[id(module)]
                if not left:
                    raise _Stop

    stream = iter(batches) if num_batches is None else itertools.islice(batches, num_batches)
    handles = [m.register_forward_pre_hook(hook) for m in _modules(model, pops)]
    if record is not None:
        handles += [m.register_forward_pre_hook(count_call) for m in model.modules()]
    if expect is not None:
        handles += [m.register_forward_hook(done) for m in _modules(model, pops)]
    count = 0
    try:
        with torch.no_grad():
            for batch in stream:
                if record is not None:
                    record.append({})
                early = expect is not None and count < len(expect)
                if early:
                    left = {k: expect[count][k] for k in pops if expect[count].get(k)}  # type: ignore[index]
                if not early or left:
                    try:
                        feed(model, batch, forward_fn)
                    except _Stop:
                        pass
                count += 1
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
    if shard:
        return count
    if count == 0:
        raise ValueError(
            "recalibrate: `batches` yielded no batch, so there is no data to compute "
            "statistics from (an exhausted iterator or generator?). Pass a fresh iterable."
        )
    if num_batches is not None and count < num_batches:
        raise ValueError(
            f"recalibrate: asked for num_batches={num_batches} but `batches` yielded only "
            f"{count}; no statistics were changed. Pass num_batches<={count} or more data."
        )
    return count


class _Stop(BaseException):
    """Ends a forward early (a BaseException, so that ``except Exception`` lets it through)."""


def _modules(model: nn.Module, pops: dict[int, Population]) -> list[nn.Module]:
    return [m for m in model.modules() if id(m) in pops]


def write(survey: Survey, pops: dict[int, Population], count: int) -> tuple[float, bool]:
    """Validate, then write the statistics of every layer in ``pops`` that saw input.

    All or nothing: a non-finite statistic or a shape mismatch raises before
    anything is written. Returns the largest change of a written buffer relative
    to its largest old value, and whether every change is within 4 rounding
    errors of the buffer's dtype or 1e-9 (the fixed-point test for repeated passes).
    """
    writes: list[tuple[Tensor, Tensor]] = []
    counters: list[Tensor] = []
    bad: list[str] = []
    for lid, pop in pops.items():
        if pop.mean is None:
            continue
        m = survey.layers[lid][0]
        finite = True
        for name, value in zip(_STAT_BUFFERS, pop.result(), strict=True):
            buf = getattr(m, name, None)
            if isinstance(buf, Tensor):
                if buf.shape != value.shape:
                    raise ValueError(
                        f"recalibrate: {pop.path}.{name} has shape {tuple(buf.shape)} but "
                        f"its input has {value.shape[0]} channels on dim 1."
                    )
                # Finite in float64 is not enough: it must fit the buffer's dtype.
                finite = finite and bool(torch.isfinite(value.to(buf.dtype)).all())
                writes.append((buf, value))
        if not finite:
            bad.append(pop.path)
            continue
        nbt = getattr(m, "num_batches_tracked", None)
        # Layers whose schedule runs on num_batches_tracked (BRN's r/d relaxation,
        # MABN's warm-up and windows) keep their step count.
        traits = traits_of(m)
        if isinstance(nbt, Tensor) and not (traits is not None and traits.step_counter):
            counters.append(nbt)
    if bad:
        raise ValueError(
            f"recalibrate: the statistics of {_listing(bad)} are not finite: their inputs "
            "hold NaN or inf on these batches, or values too large for the buffers' dtype "
            "(non-finite data, an overflow, or a diverged model upstream of them). No "
            "statistic was changed. Find where the activations "
            "first become non-finite (normlab.doctor) and fix the data or the model."
        )
    worst, settled = 0.0, True
    with torch.no_grad():
        for buf, value in writes:
            new = value.to(buf.dtype)
            old = buf.to(torch.float64)
            change = float((new.to(torch.float64) - old).abs().max())
            scale = float(old.abs().max().clamp_min(torch.finfo(torch.float64).tiny))
            eps = torch.finfo(buf.dtype).eps if buf.is_floating_point() else 0.0
            worst = max(worst, change / scale)
            settled = settled and change <= max(4 * eps, 1e-9) * scale
            buf.copy_(new)
        for nbt in counters:
            nbt.fill_(count)
    return worst, settled
