"""The doctor's checks: what kind of norm a layer is, and what can be wrong with it.

:mod:`normlab.doctor` runs the model and calls these; each check returns
:class:`~normlab.doctor.codes.Finding` objects whose codes are explained in
:data:`normlab.doctor.codes.CODES`.

Which checks apply depends on the mode being judged (see :class:`Context`): an
evaluated model is judged on what eval uses (running statistics, layers left in
training mode); statistics that only exist in training are judged when the
model is in training mode, or when a training batch size is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import nn as nnl
from .._core.checks import negative_channels
from ..convert.frozen_stats import is_stats_frozen
from ..kinds import is_frozen_batch_norm
from ..nn.traits import traits_of
from ..registry import auto_groups
from .codes import Finding, Severity, finding
from .staleness import ExampleMoments, layer_eps, stale_distance

__all__ = ["Context", "dynamic_findings", "model_findings", "static_findings"]

#: values per batch statistic at or below which BN fails / is worse than it needs to be
TINY_ERROR = 2
TINY_WARNING = 8
#: values per per-sample statistic (GroupNorm group, InstanceNorm, FRN, EvoNorm-S) at or
#: below which the layer keeps little more than the sign pattern of its input
TINY_INSTANCE = 4
#: median over channels of the eval − batch-statistics output distance that is stale
STALE_DISTANCE = 0.5


@dataclass(frozen=True)
class Context:
    """The mode being judged.

    ``evaluating``: the caller is about to evaluate. ``train_batch_size``: judge
    the statistics training will compute at this batch size (None: only those the
    example forward computes). ``model_training``: the root module's flag.
    """

    evaluating: bool
    train_batch_size: int | None
    model_training: bool


# ----------------------------------------------------------------------------- layer kinds


_FRN = (nnl.FilterResponseNorm1d, nnl.FilterResponseNorm2d, nnl.FilterResponseNorm3d)


def keeps_batch_statistics(m: nn.Module) -> bool:
    """Computes statistics over the batch in training (its traits say so)."""
    traits = traits_of(m)
    return traits is not None and traits.batch_statistics


def judges_staleness(m: nn.Module) -> bool:
    """Running mean / variance that eval uses in place of the batch's (BN-like layers)."""
    traits = traits_of(m)
    return traits is not None and traits.recalibrate_kind == "batch_mean_var"


def is_instance_norm(m: nn.Module) -> bool:
    traits = traits_of(m)
    return traits is not None and traits.recalibrate_kind == "instance_mean_var"


def is_group_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) or (
        isinstance(getattr(m, "num_groups", None), int)
        and isinstance(getattr(m, "num_channels", None), int)
    )


def is_frn(m: nn.Module) -> bool:
    """normlab's FRN and FRN-like layers of other libraries (timm's FilterResponseNorm*)."""
    return isinstance(m, _FRN) or "FilterResponseNorm" in type(m).__name__


def is_evonorm_s(m: nn.Module) -> bool:
    """EvoNorm-S layers (per-sample group statistics): normlab's and timm's EvoNorm2dS*."""
    if isinstance(m, nnl.EvoNormS0_2d):
        return True
    name = type(m).__name__
    return (
        "EvoNorm" in name
        and "S" in name.rsplit("EvoNorm", 1)[-1]
        and isinstance(getattr(m, "groups", None), int)
    )


def is_frozen(m: nn.Module) -> bool:
    return is_frozen_batch_norm(m) or ("Frozen" in type(m).__name__ and hasattr(m, "running_var"))


def is_norm(m: nn.Module) -> bool:
    return (
        keeps_batch_statistics(m)
        or is_frozen(m)
        or is_instance_norm(m)
        or is_group_norm(m)
        or is_frn(m)
        or is_evonorm_s(m)
    )


def tensor(m: nn.Module, name: str) -> Tensor | None:
    t = getattr(m, name, None)
    return t if isinstance(t, Tensor) else None


def tracks(m: nn.Module) -> bool:
    return tensor(m, "running_mean") is not None or tensor(m, "running_var") is not None


def at_init(m: nn.Module) -> bool:
    """Running statistics untouched since construction: mean 0, variance 1, no batch tracked."""
    mean, var = tensor(m, "running_mean"), tensor(m, "running_var")
    count = tensor(m, "num_batches_tracked")
    if mean is None and var is None:
        return False
    return (
        (mean is None or bool((mean == 0).all()))
        and (var is None or bool((var == 1).all()))
        and (count is None or int(count) == 0)
    )


def frozen_affine(m: nn.Module) -> bool:
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
    return bool(params) and all(isinstance(p, nn.Parameter) and not p.requires_grad for p in params)


def computes_batch_statistics(m: nn.Module, ctx: Context) -> bool:
    """Whether the layer normalizes with batch statistics in the mode being judged.

    In the example forward: layers in training mode and those without running
    statistics. With a training batch size: also every batch-statistics layer of
    a model in eval mode (``model.train()`` will switch them all).
    """
    if not keeps_batch_statistics(m) or is_stats_frozen(m):
        return False
    if m.training or not tracks(m):
        return True
    return ctx.train_batch_size is not None and not ctx.model_training


def values_per_statistic(m: nn.Module, x: Tensor, batch_size: int | None) -> int | None:
    """Values behind each statistic: N × spatial (batch kinds), (C/G) × spatial, spatial."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        return None
    spatial = math.prod(x.shape[2:])
    if keeps_batch_statistics(m):
        return (batch_size if batch_size is not None else x.shape[0]) * spatial
    if is_group_norm(m):
        return x.shape[1] // max(int(m.num_groups), 1) * spatial
    if is_evonorm_s(m):
        return x.shape[1] // max(int(m.groups), 1) * spatial
    if is_instance_norm(m):
        rank = getattr(type(m), "_spatial", None)
        if isinstance(rank, int) and x.dim() == rank + 1:  # unbatched (C, *spatial)
            return math.prod(x.shape[1:])
        return spatial
    if is_frn(m):
        return spatial
    return None


# ----------------------------------------------------------------------------- checks


def _describe_momentum(momentum: float) -> str | None:
    if momentum <= 0:
        return f"momentum={momentum}: the running statistics never move."
    if momentum >= 0.5:
        return f"momentum={momentum}: the running statistics are mostly the last batch."
    return None


def static_findings(path: str, m: nn.Module, ctx: Context) -> list[Finding]:
    """Checks that need no forward: modes, flags, buffers (before the example forward)."""
    out: list[Finding] = []
    name = type(m).__name__
    batch = keeps_batch_statistics(m)
    if batch and ctx.evaluating and m.training:
        out.append(finding("bn_training_mode", "error", path, f"{name} is in training mode."))
    if batch and ctx.evaluating and not tracks(m):
        out.append(
            finding("batch_stats_in_eval", "warning", path, f"{name}: track_running_stats=False.")
        )
    if tracks(m) and frozen_affine(m) and computes_batch_statistics(m, ctx):
        detail = f"{name}: requires_grad=False on γ and β, but {'in' if m.training else 'put in'}"
        out.append(
            finding("bn_params_frozen_stats_not", "warning", path, f"{detail} training mode.")
        )
    trainable = ", ".join(n for n, p in m.named_parameters(recurse=False) if p.requires_grad)
    if is_frozen(m) and trainable:
        out.append(
            finding(
                "frozen_bn_changes", "error", path, f"{name}: trainable parameters ({trainable})."
            )
        )
    momentum = getattr(m, "momentum", None)
    if (
        batch
        and tracks(m)
        and isinstance(momentum, (int, float))
        and not isinstance(momentum, bool)
    ):
        detail = _describe_momentum(float(momentum))
        if detail is not None:
            out.append(finding("momentum_extreme", "warning", path, f"{name}: {detail}"))
    for buf_name in ("running_mean", "running_var"):
        buf = tensor(m, buf_name)
        if buf is not None and buf.is_floating_point() and not bool(torch.isfinite(buf).all()):
            bad = int((~torch.isfinite(buf)).sum())
            detail = f"{name}.{buf_name}: {bad} of {buf.numel()} value(s) NaN/inf."
            out.append(finding("running_stats_nonfinite", "error", path, detail))
    skipped = getattr(m, "nonfinite_batches_skipped", 0)
    if isinstance(skipped, int) and skipped > 0:
        detail = f"{name}: {skipped} training batch(es) with non-finite statistics skipped."
        out.append(finding("nonfinite_batches_skipped", "warning", path, detail))
    var = tensor(m, "running_var")
    if var is not None and var.is_floating_point() and bool((var < 0).any()):
        detail = f"{name}.running_var {negative_channels(var)}."
        out.append(finding("running_var_negative", "error", path, detail))
    channels = getattr(m, "num_features", None)
    if batch and isinstance(channels, int) and channels % 32 != 0:
        g = auto_groups(channels)
        detail = f"{name}: {channels} channels; 'gn' would use {g} group(s)."
        out.append(finding("groupnorm32_blocked", "info", path, detail))
    return out


def dynamic_findings(path: str, m: nn.Module, rec: dict[str, Any], ctx: Context) -> list[Finding]:
    """Checks on what the example forward showed; ``rec`` is the layer's probe record."""
    out: list[Finding] = []
    name = type(m).__name__
    values, shape = rec.get("values"), rec.get("shape")
    if values is not None and computes_batch_statistics(m, ctx) and values < TINY_WARNING:
        at = (
            f"train batch size {ctx.train_batch_size}"
            if ctx.train_batch_size is not None
            else "the example's batch size"
        )
        detail = (
            f"{name}: {values} value(s) per batch statistic (N × spatial at {at}, input {shape})."
        )
        severity: Severity = "error" if values <= TINY_ERROR else "warning"
        out.append(finding("tiny_batch_statistic", severity, path, detail))
    per_sample = is_group_norm(m) or is_instance_norm(m) or is_frn(m) or is_evonorm_s(m)
    if per_sample and values is not None and not keeps_batch_statistics(m):
        detail = f"{name}: {values} value(s) per statistic (input {shape})."
        if values == 1 and (is_group_norm(m) or is_instance_norm(m)):
            out.append(finding("degenerate_statistic", "error", path, detail))
        elif values <= TINY_INSTANCE:
            out.append(finding("tiny_instance_statistic", "warning", path, detail))
    uses_running = tracks(m) and not m.training
    mean, var = rec.get("running", (None, None))
    moments: ExampleMoments | None = rec.get("moments")
    if ctx.evaluating and uses_running and var is not None and var.is_floating_point():
        eps = layer_eps(m)
        tiny = torch.isfinite(var) & (var >= 0) & (var < eps / 100)  # < 0: running_var_negative
        if moments is not None and moments.var is not None and moments.var.shape == var.shape:
            # A channel constant in the example too is dead: harmless (NaN input: unknown).
            tiny &= ~(moments.var <= eps)
        if bool(tiny.any()):
            detail = (
                f"{name}.running_var < {eps / 100:.3g} in {int(tiny.sum())} of {var.numel()} "
                f"channel(s), amplified up to {1 / math.sqrt(eps):.0f}×."
            )
            out.append(finding("running_var_near_zero", "warning", path, detail))
    if ctx.evaluating and uses_running and judges_staleness(m) and not rec.get("at_init"):
        stale = stale_distance(m, rec)
        if stale is not None and stale > STALE_DISTANCE:
            detail = f"{name}: eval vs batch-statistics output differ by {stale:.2f}."
            out.append(finding("stale_running_stats", "warning", path, detail))
    changed = rec.get("frozen_changed")
    if changed:
        detail = f"{name}: {', '.join(sorted(changed))} changed during one forward."
        out.append(finding("frozen_bn_changes", "error", path, detail))
    calls = rec.get("calls", 0)
    if calls > 1 and keeps_batch_statistics(m) and not is_stats_frozen(m):
        detail = f"{name} runs {calls} times in one forward, its statistics shared by every call."
        out.append(finding("bn_shared_across_calls", "warning", path, detail))
    source = rec.get("after_dropout")
    if source is not None:
        detail = f"{name} takes the output of dropout {source}."
        out.append(finding("dropout_before_bn", "warning", path, detail))
    return out


def model_findings(
    layers: list[tuple[str, nn.Module, dict[str, Any]]], ctx: Context
) -> list[Finding]:
    """Whole-model checks: running statistics never computed (one note, not one per layer)."""
    tracking = [(p, m, rec) for p, m, rec in layers if judges_staleness(m) and tracks(m)]
    fresh = [(p, m) for p, m, rec in tracking if rec.get("at_init")]
    if not fresh:
        return []
    if len(fresh) == len(tracking):
        detail = (
            f"All {len(fresh)} layer(s) with running statistics are at their initial values "
            "(a model that was never trained or calibrated)."
        )
        return [
            finding(
                "uncalibrated_running_stats", "warning" if ctx.evaluating else "info", "", detail
            )
        ]
    if not ctx.evaluating:
        return []  # training fills them; the other layers show the model was calibrated
    return [
        finding(
            "uncalibrated_running_stats",
            "warning",
            p,
            f"{type(m).__name__}: running statistics at their initial values.",
        )
        for p, m in fresh
        if not m.training
    ]
