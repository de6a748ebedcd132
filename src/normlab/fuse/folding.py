""":func:`fuse_conv_bn`: fold eval-mode BatchNorm into the conv or linear layer feeding it.

Which BN is fed by which conv is read off the model's data flow
(:mod:`normlab.fuse.graph`), not its module order; the numerics and checks live
in :mod:`normlab.fuse.check`, the report in :mod:`normlab.fuse.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn

from ..convert.select import Filter, Filters, Selection, select_modules
from ..feed import ForwardFn, feed
from ..kinds import activation_tail, is_frozen_batch_norm
from .check import (
    TRANSPOSED,
    SiteCheck,
    bn_error,
    compare_outputs,
    conv_error,
    fold,
    fused_module,
    out_channels,
    run_compare,
)
from .graph import find_uses, is_bn_like
from .report import REASONS, FusedPair, FuseReport, SkippedBN

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["fuse_conv_bn"]

_EXACT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *TRANSPOSED)
_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}
Slot = tuple[nn.Module, str]


def _activation_tail(bn: nn.Module) -> nn.Module | None:
    """What a norm+activation layer applies after normalizing (None for a plain norm)."""
    tail = activation_tail(bn)
    act = getattr(bn, "act", None)
    if tail is None and isinstance(act, str) and act in _ACTS:  # normlab FrozenBatchNorm(act=)
        return _ACTS[act]()
    return tail


def _guarded(check: Callable[..., float | None], *args: Any) -> tuple[float | None, str]:
    """Run a probe check; an exception (a layer that cannot be copied or cast) is a failure."""
    try:
        err = check(*args)
    except Exception as e:
        return float("nan"), f"{type(e).__name__}: {e}"
    return err, "" if err is None else f"max abs error {err:.3g} in float64"


@dataclass
class _Pair:
    conv: nn.Module
    bn: nn.Module
    fused: nn.Module
    tail: nn.Module | None


class _Plan:
    """Every BN of the model, decided: pairs to fold (grouped by BN) or a skip reason."""

    def __init__(self, model: nn.Module, strict: bool, chosen: Selection) -> None:
        self.strict = strict
        self.slots: dict[int, list[Slot]] = {}
        for parent in model.modules():
            for name, child in parent._modules.items():
                if child is not None:
                    self.slots.setdefault(id(child), []).append((parent, name))
        self.paths: dict[int, str] = {}
        for path, m in reversed(list(model.named_modules(remove_duplicate=False))):
            self.paths[id(m)] = path or "<model>"
        self.found = find_uses(model)
        self.groups: list[tuple[nn.Module, list[_Pair]]] = []
        self.report = FuseReport(
            traced=list(self.found.traced),
            untraced=list(self.found.untraced),
            sequential_fallback=list(self.found.sequential_fallback),
        )
        bns = {id(m): m for m in model.modules() if is_bn_like(m)}
        for bn in bns.values():
            if chosen(bn):
                self._decide(model, bn)
            else:
                self.skip(bn, "filtered", REASONS["filtered"])

    def skip(self, bn: nn.Module, reason: str, detail: str) -> None:
        self.report.skipped.append(SkippedBN(self.paths[id(bn)], type(bn).__name__, reason, detail))

    def _block(self, bn: nn.Module, reason: str, detail: str, error: type[Exception]) -> None:
        """A pair wired for folding that the layers' state forbids: an error when strict."""
        if self.strict:
            raise error(f"fuse_conv_bn: {self.paths[id(bn)]} ({type(bn).__name__}) {detail}")
        self.skip(bn, reason, detail.split(". ")[0])

    def _decide(self, model: nn.Module, bn: nn.Module) -> None:
        uses = self.found.uses.get(id(bn), [])
        if bn is model:
            return self.skip(bn, "model_is_bn", REASONS["model_is_bn"])
        if not uses:
            if id(bn) in self.found.covered:
                return self.skip(bn, "not_called", REASONS["not_called"])
            return self.skip(bn, "not_analysed", REASONS["not_analysed"])
        bad = [u for u in uses if u.conv is None]
        if bad:
            prefix = f"one of its {len(uses)} calls: " if len(uses) > 1 else ""
            return self.skip(bn, bad[0].reason, prefix + bad[0].detail)
        outside = [
            self.paths[id(p)] + "." + n
            for p, n in self.slots.get(id(bn), [])
            if id(p) not in self.found.covered and id(p) not in self.found.sequential_ids
        ]
        if len(self.slots.get(id(bn), [])) > 1 and outside:
            detail = f"it is also registered at {outside[0]}, in code that was not analysed"
            return self.skip(bn, "bn_shared", detail)
        convs = [u.conv for u in uses if u.conv is not None]
        if not is_frozen_batch_norm(bn) and bn.training:
            return self._block(
                bn,
                "training_mode",
                "is in training mode, where it normalizes with batch statistics that cannot be "
                "folded into weights. Call model.eval() before fusing.",
                ValueError,
            )
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            return self._block(
                bn,
                "no_running_stats",
                "keeps no running statistics (track_running_stats=False) and normalizes with "
                "batch statistics even in eval, which cannot be folded. Recreate it with "
                "track_running_stats=True and recalibrate it first.",
                ValueError,
            )
        for conv in convs:
            cpath = self.paths[id(conv)]
            n_slots = len(self.slots.get(id(conv), []))
            n_calls = self.found.conv_calls.get(id(conv), 0)
            if out_channels(conv) != bn.running_mean.shape[0]:
                return self._block(
                    bn,
                    "channel_mismatch",
                    f"has {bn.running_mean.shape[0]} channels but {cpath} feeding it has "
                    f"{out_channels(conv)} outputs. Check the model's wiring.",
                    ValueError,
                )
            if n_slots > 1 or n_calls > 1:
                how = (
                    f"registered in {n_slots} places" if n_slots > 1 else f"called {n_calls} times"
                )
                return self._block(
                    bn,
                    "conv_shared",
                    f"is fed by {cpath} ({type(conv).__name__}), which is {how}; folding would "
                    "silently untie the shared weights. Give each use its own module (or fuse "
                    "a copy) first.",
                    ValueError,
                )
        tail = _activation_tail(bn)
        err, why = _guarded(bn_error, bn, tail, convs[0].weight.dim() - 2)
        if err is not None:
            return self._block(
                bn,
                "bn_variant",
                f"does not compute (x - running_mean) / sqrt(running_var + eps) * weight + bias "
                f"in eval ({why}), so it cannot be folded. Replace it by a standard BatchNorm "
                "or leave it unfused (strict=False).",
                RuntimeError,
            )
        pairs = []
        for conv in convs:
            if type(conv) not in _EXACT:
                err, why = _guarded(conv_error, conv)
                if err is not None:
                    detail = (
                        f"{self.paths[id(conv)]} ({type(conv).__name__}): folding changes "
                        f"its output ({why})"
                    )
                    return self.skip(bn, "conv_transforms_weight", detail)
            w, b = fold(conv, bn)
            pairs.append(_Pair(conv, bn, fused_module(conv, w, b), tail))
        self.groups.append((bn, pairs))

    def drop(self, bn_ids: dict[int, str]) -> None:
        """Skip the BN groups in ``bn_ids`` (id -> why) after the site check."""
        for bn, _ in [g for g in self.groups if id(g[0]) in bn_ids]:
            self.skip(bn, "runtime_wiring", bn_ids[id(bn)])
        self.groups = [g for g in self.groups if id(g[0]) not in bn_ids]

    def pairs(self) -> list[_Pair]:
        return [p for _, pairs in self.groups for p in pairs]


def _apply(plan: _Plan, undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Swap fused convs and BN replacements into their slots, recording how to undo it."""

    def put(parent: nn.Module, name: str, new: nn.Module) -> None:
        undo.append((parent, name, parent._modules[name]))
        parent._modules[name] = new

    for bn, pairs in plan.groups:
        for p in pairs:
            for parent, name in plan.slots[id(p.conv)]:
                put(parent, name, p.fused)
        replacement = pairs[0].tail if pairs[0].tail is not None else nn.Identity()
        for parent, name in plan.slots[id(bn)]:
            put(parent, name, replacement)
        for p in pairs:
            plan.report.fused.append(
                FusedPair(
                    plan.paths[id(p.conv)],
                    plan.paths[id(bn)],
                    type(p.conv).__name__,
                    type(bn).__name__,
                    type(replacement).__name__,
                )
            )


def _restore(undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, old in reversed(undo):
        parent._modules[name] = old
    undo.clear()


class _FuseOptions(Filters, total=False):
    rtol: float | None
    atol: float | None
    compare: Callable[[Any, Any], Any] | Literal[False] | None
    strict: bool
    forward_fn: ForwardFn | None


@overload
def fuse_conv_bn(
    model: nn.Module,
    check_inputs: Any = ...,
    *,
    return_report: Literal[False] = ...,
    **options: Unpack[_FuseOptions],
) -> nn.Module: ...
@overload
def fuse_conv_bn(
    model: nn.Module,
    check_inputs: Any = ...,
    *,
    return_report: Literal[True],
    **options: Unpack[_FuseOptions],
) -> tuple[nn.Module, FuseReport]: ...
def fuse_conv_bn(
    model: nn.Module,
    check_inputs: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    compare: Callable[[Any, Any], Any] | Literal[False] | None = None,
    strict: bool = True,
    forward_fn: ForwardFn | None = None,
    include: Filter = None,
    exclude: Filter = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Fold eval-mode BatchNorm / frozen BatchNorm into the Conv or Linear feeding it.

    .. math:: W' = W\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}},\\qquad
              b' = (b - \\mu)\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

    **What is folded**: every BN whose input is the output of a ``Conv1d/2d/3d``
    (or a ``Linear`` for ``BatchNorm1d`` on ``(N, C)``) that feeds nothing else,
    read from the model's data flow by torch.fx (any ``forward``: residual blocks,
    ``self.bn(self.conv(x))``); where the whole model does not trace (detectors,
    data-dependent control flow) its largest traceable submodules are traced,
    and where nothing traces, a conv directly followed by a BN in a plain
    ``nn.Sequential`` is a pair. The model is edited in place and keeps its
    class: the conv's slot gets a fused copy (with a bias), the BN's slot an
    ``nn.Identity`` or, for a norm+activation layer (timm's ``BatchNormAct2d``),
    its activation. A BN shared by several such convs is folded into each.
    Frozen BNs fold whatever the mode. Conv subclasses fold when folding keeps
    their output (a weight-standardized conv does not: skipped).

    **Checks**: folded weights are computed in float64 and each pair is checked
    on a random probe before anything changes. With ``check_inputs``, the model
    is run once with hooks checking every fused conv on the input its original
    really received (local, so robust to detections that reorder), then again
    fused, and ``compare(before, after)`` runs (default :func:`compare_outputs`).
    On any failure, or an exception while swapping or running, every
    replacement is undone: the same module objects, an identical state_dict.
    Without ``check_inputs`` the traced data flow is trusted; with it, a pair
    whose wiring does not hold at run time (a conv also called from code that
    did not trace) is left unfused and reported.

    Args:
        model: modified in place and returned.
        check_inputs: optional example batch, fed as :func:`normlab.feed.feed` does.
        rtol, atol: tolerances of the default comparison and site check (default
            by dtype: 1e-8 float64, 1e-4 float32, 1e-2 otherwise).
        compare: ``callable(before, after)`` returning None/True when the outputs
            agree, else a description (or False, or raising); ``False`` skips the
            output comparison (the site check still runs).
        strict: raise (the default) when a BN fed by a conv cannot be folded
            because of the layers' state (training mode, no running statistics,
            channel mismatch, shared conv, non-standard BN); with False these are
            skipped and reported.
        forward_fn: ``forward_fn(model, check_inputs)`` when the batch needs it.
        include, exclude: which BNs may fold (module-path globs or a predicate
            ``(name, module) -> bool``; :func:`normlab.convert.select.select_modules`);
            the others are reported as skipped, reason ``"filtered"``.
        return_report: return ``(model, FuseReport)`` instead of the model.

    Raises:
        ValueError: (strict) a BN fed by a conv is in training mode, keeps no
            running statistics, has other channels, or its conv is shared.
        RuntimeError: a fused layer does not reproduce the original, or the
            outputs on ``check_inputs`` differ (the model is restored).
    """
    if compare is not None and compare is not False and not callable(compare):
        raise TypeError(
            f"fuse_conv_bn: compare must be a callable(before, after), None (the default "
            f"comparison) or False (no output comparison), got {type(compare).__name__}."
        )
    chosen = select_modules(model, include, exclude, candidates=is_bn_like, tool="fuse_conv_bn")
    plan = _Plan(model, strict, chosen)
    report = plan.report
    before = None
    if check_inputs is not None:
        with SiteCheck(plan.pairs(), rtol, atol) as site, torch.no_grad():
            before = feed(model, check_inputs, forward_fn)
        for i, err in site.errors.items():
            p = plan.pairs()[i]
            raise RuntimeError(
                f"fuse_conv_bn: on check_inputs, {plan.paths[id(p.conv)]} folded with "
                f"{plan.paths[id(p.bn)]} differs from the original by up to {err:.3g}; the "
                "model was not modified. The BN may not compute the standard formula, or "
                "the layers are low precision (try model.double() to check)."
            )
        plan.drop(site.dangling())
        report.check = f"site check: {len(site.seen)} of {len(plan.pairs())} folded pairs ran"
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        _apply(plan, undo)
        if before is not None and compare is not False:
            with torch.no_grad():
                after = feed(model, check_inputs, forward_fn)
            if compare is None:
                problem = compare_outputs(before, after, rtol=rtol, atol=atol)
            else:
                problem = run_compare(compare, before, after)
            if problem:
                raise _CheckFailed(problem)
            report.check += "; outputs compared"
    except _CheckFailed as e:
        _restore(undo)
        report.fused.clear()
        raise RuntimeError(
            f"fuse_conv_bn: the fused model does not match the original on check_inputs "
            f"({e}); the model was restored. Common causes: the model is in training mode "
            "(dropout, other batch-statistics layers), or fp16 weights. compare= sets how "
            "outputs are compared (False: site check only)."
        ) from None
    except BaseException as e:
        _restore(undo)
        report.fused.clear()
        if isinstance(e, Exception) and before is not None:
            raise RuntimeError(
                f"fuse_conv_bn: the fused model failed on check_inputs ({type(e).__name__}: "
                f"{e}); the model was restored."
            ) from e
        raise
    return (model, report) if return_report else model


class _CheckFailed(Exception):
    pass
