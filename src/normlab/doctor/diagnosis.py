""":func:`diagnose`: what is wrong with a model's norm layers, where, why, and the fix.

It inspects every norm layer (BatchNorm and the other batch-statistics layers, frozen
BN, GroupNorm, InstanceNorm, FRN, EvoNorm) and runs the model **once**, on a deep copy,
with hooks; the model you pass is never modified. Each :class:`Finding` has a stable
``code`` (:data:`normlab.doctor.codes.CODES`: why it matters and the fix; the overview
and what each mode judges are in ``docs/doctor.md``), a ``severity``, the dotted
``module`` path, a ``detail`` and a ``message``. :class:`Report` groups the findings by
code, prints as a table and serializes to JSON; it also lists, per layer, how many
values stand behind each statistic. ``normlab doctor path/to/file.py:factory``
(:mod:`normlab.cli.doctor`) loads its model with :func:`load_target`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._core.checks import stored_variance_as_nan
from ..feed import feed
from .checks import (
    Context,
    at_init,
    dynamic_findings,
    is_frozen,
    is_norm,
    judges_staleness,
    keeps_batch_statistics,
    model_findings,
    static_findings,
    tensor,
    tracks,
    values_per_statistic,
)
from .codes import SEVERITY_ORDER, Finding
from .report import LayerInfo, Report
from .staleness import ExampleMoments

__all__ = ["DoctorForwardError", "diagnose"]


class DoctorForwardError(RuntimeError):
    """The model failed on ``example_inputs``; the cause is attached as ``__cause__``."""


def _check_batch_size(train_batch_size: Any) -> int | None:
    if train_batch_size is None:
        return None
    if isinstance(train_batch_size, bool) or not isinstance(train_batch_size, int):
        raise TypeError(
            f"diagnose: train_batch_size must be a positive int or None, got "
            f"{type(train_batch_size).__name__} {train_batch_size!r}."
        )
    if train_batch_size < 1:
        raise ValueError(f"diagnose: train_batch_size must be >= 1, got {train_batch_size}.")
    return train_batch_size


def diagnose(
    model: nn.Module,
    example_inputs: Any,
    *,
    expect_eval: bool | None = None,
    train_batch_size: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Report:
    """Inspect ``model``'s norm layers and run it once on ``example_inputs``.

    Args:
        model: any module; not modified (the forward runs on a deep copy, in the
            modes you set).
        example_inputs: one batch as the model takes it: a tensor (``model(x)``),
            a list of (C, H, W) images (``model(images)``, torchvision's
            detectors), another tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``); see :func:`normlab.feed.feed`.
        expect_eval: True if you are about to evaluate, False if training; None
            infers it from ``model.training`` (the root's flag), so a BN left in
            training mode inside an ``eval()``-ed model is caught.
        train_batch_size: judge the batch statistics training will compute at
            this batch size (values per statistic = ``train_batch_size`` × the
            layer's spatial size on the example), also for a model in eval mode.
            None: only the batch statistics the example forward computes.
        forward_fn: ``forward_fn(model, example_inputs)`` when the model needs more
            than that.

    Returns:
        A :class:`Report`.

    Raises:
        TypeError: ``model`` is not a module, or ``train_batch_size`` not an int.
        ValueError: ``train_batch_size < 1``.
        DoctorForwardError: the model failed on ``example_inputs`` (a
            RuntimeError; the cause is attached).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: model must be an nn.Module, got {type(model).__name__}.")
    batch_size = _check_batch_size(train_batch_size)
    evaluating = (not model.training) if expect_eval is None else bool(expect_eval)
    ctx = Context(evaluating, batch_size, model.training)
    probe = copy.deepcopy(model)
    named = [(p, m) for p, m in probe.named_modules() if is_norm(m)]
    recs: dict[int, dict[str, Any]] = {}
    findings: list[Finding] = []
    for path, m in named:
        rec = recs[id(m)] = {"shape": None, "values": None, "at_init": at_init(m)}
        if tracks(m):
            rec["running"] = tuple(
                None if (t := tensor(m, n)) is None else t.detach().clone()
                for n in ("running_mean", "running_var")
            )
        findings.extend(static_findings(path, m, ctx))
    _probe(probe, named, recs, example_inputs, forward_fn, batch_size)

    layers: list[LayerInfo] = []
    for path, m in named:
        rec = recs[id(m)]
        values = rec["values"]
        batch = keeps_batch_statistics(m)
        layers.append(LayerInfo(path, type(m).__name__, m.training, batch, rec["shape"], values))
        findings.extend(dynamic_findings(path, m, rec, ctx))
    findings.extend(model_findings([(p, m, recs[id(m)]) for p, m in named], ctx))

    order = {p: i for i, (p, _) in enumerate(named)}
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.code, order.get(f.module, -1)))
    return Report(findings, layers, evaluating, batch_size)


def _probe(
    probe: nn.Module,
    named: list[tuple[str, nn.Module]],
    recs: dict[int, dict[str, Any]],
    example_inputs: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    batch_size: int | None,
) -> None:
    """Run ``probe`` once with hooks that fill each layer's record in ``recs``."""
    dropout_out: dict[int, tuple[Tensor, str]] = {}
    dropouts = {
        id(m): p
        for p, m in probe.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
    }

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        rec = recs[id(module)]
        rec["calls"] = rec.get("calls", 0) + 1
        x = args[0] if args else None
        if isinstance(x, Tensor):
            rec["shape"] = tuple(x.shape)
            values = values_per_statistic(module, x, batch_size)
            if values is not None:
                rec["values"] = values if rec["values"] is None else min(rec["values"], values)
            if judges_staleness(module) and tracks(module) and x.dim() >= 2:
                rec.setdefault("moments", ExampleMoments(split=True)).update(x)
            hit = dropout_out.get(id(x))
            if hit is not None and hit[0] is x and keeps_batch_statistics(module):
                rec["after_dropout"] = hit[1]
        if is_frozen(module):
            rec["before"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        rec = recs[id(module)]
        before = rec.pop("before", None)
        if before is not None:
            after = module.state_dict()
            changed = [
                k
                for k, v in before.items()
                if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v)
            ]
            if changed:
                rec.setdefault("frozen_changed", set()).update(changed)

    def dropout_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            dropout_out[id(output)] = (output, dropouts[id(module)])

    handles = []
    try:
        for _, m in named:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        for m in probe.modules():
            if id(m) in dropouts:
                handles.append(m.register_forward_hook(dropout_hook))
        try:
            # Corrupt (negative) running variances give NaN here, as in torch, instead of
            # stopping the forward: static_findings reports them as running_var_negative.
            with torch.no_grad(), stored_variance_as_nan():
                feed(probe, example_inputs, forward_fn)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise DoctorForwardError(
                f"diagnose: running the model on example_inputs failed ({type(e).__name__}: "
                f"{first}). The doctor needs one successful forward; check the input "
                "shape/dtype/device, or pass forward_fn=."
            ) from e
    finally:
        for h in handles:
            h.remove()
