"""The BN doctor: what is wrong with a model's norm layers, where, why, and the fix.

:func:`diagnose` inspects every norm layer and runs the model **once**, on a deep
copy, with hooks; the model you pass is never modified (parameters, buffers and
training flags are identical afterwards). Each :class:`Finding` has a stable
``code``, a ``severity`` (``"error"``, ``"warning"``, ``"info"``), the dotted
``module`` path, a ``message`` and a ``fix``. :class:`Report` prints as a table
and serializes to JSON; it also lists, per layer, how many values stand behind
each statistic.

Finding codes:

=============================  ========  ===============================================
code                           severity  meaning
=============================  ========  ===============================================
``bn_training_mode``           error     BN in training mode while the model is evaluated
``batch_stats_in_eval``        warning   ``track_running_stats=False`` while evaluating
``tiny_batch_statistic``       error/    few values (N × spatial) behind each batch
                               warning   statistic: ≤ 2 error, < 8 warning
``degenerate_statistic``       error     GroupNorm/InstanceNorm normalizing 1 value
``running_stats_nonfinite``    error     NaN or inf in running_mean / running_var
``running_var_near_zero``      warning   running_var < eps / 100 in some channels
``stale_running_stats``        warning   eval output far from train-mode output
``frozen_bn_changes``          error     a frozen BN whose state changes
``bn_params_frozen_stats_not`` warning   γ, β frozen but BN still in training mode
``dropout_before_bn``          warning   dropout output feeds a BN (variance shift)
``momentum_extreme``           warning   momentum 0 (never updates) or ≥ 0.5
``groupnorm32_blocked``        info      C not divisible by 32: GroupNorm(32) impossible
=============================  ========  ===============================================

Why ``tiny_batch_statistic`` counts values, not the batch size: in our
measurements (shared/design/LAB-NOTES.md) BN's small-batch penalty was governed by
N × H × W at the deepest BN layers — 2 values (batch 2, 1×1 map) was
catastrophic (73 % error against 12 %), 8 values (batch 2, 2×2 map) was enough.

The CLI (``normlab doctor path/to/file.py:factory``) uses :func:`load_factory`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from .feed import feed
from .kinds import is_batch_norm, is_frozen_batch_norm
from .nn.instance_norm import _InstanceNorm
from .recalibrate import _Population
from .registry import auto_groups

__all__ = ["Finding", "LayerInfo", "Report", "diagnose", "load_factory", "DoctorTargetError"]

Severity = Literal["error", "warning", "info"]
_ORDER = {"error": 0, "warning": 1, "info": 2}

#: values per batch statistic at or below which BN is catastrophic / worse than needed
TINY_ERROR = 2
TINY_WARNING = 8
#: RMS distance (in normalized units) between eval and train-mode outputs that is "stale"
STALE_DISTANCE = 0.5
#: the batch statistics must rest on this many values before staleness is judged
STALE_MIN_VALUES = 32


@dataclass(frozen=True)
class Finding:
    """One problem: ``code`` (stable), ``severity``, ``module`` path, ``message``, ``fix``."""

    code: str
    severity: Severity
    module: str
    message: str
    fix: str


@dataclass(frozen=True)
class LayerInfo:
    """What the doctor saw of one norm layer during the example forward.

    ``values_per_statistic`` is the number of values behind each statistic the
    layer computes from its input: N × spatial for batch statistics (at
    ``batch_size`` when given), (C/G) × spatial for GroupNorm, spatial for
    InstanceNorm; None if the layer did not run.
    """

    module: str
    type: str
    training: bool
    batch_statistics: bool
    input_shape: tuple[int, ...] | None
    values_per_statistic: int | None


@dataclass
class Report:
    """Findings (most severe first) and the per-layer table."""

    findings: list[Finding] = field(default_factory=list)
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def ok(self) -> bool:
        """No error and no warning."""
        return all(f.severity == "info" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [asdict(f) for f in self.findings],
            "layers": [
                {**asdict(info), "input_shape": list(info.input_shape or []) or None}
                for info in self.layers
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        """Human-readable: the findings, each with its fix, then the layer table."""
        lines: list[str] = []
        if self.findings:
            w_code = max(len(f.code) for f in self.findings)
            w_mod = max(len(f.module or "<model>") for f in self.findings)
            lines.append(f"{'SEVERITY':<8}  {'CODE':<{w_code}}  {'MODULE':<{w_mod}}  MESSAGE")
            for f in self.findings:
                lines.append(
                    f"{f.severity:<8}  {f.code:<{w_code}}  {f.module or '<model>':<{w_mod}}  "
                    f"{f.message}"
                )
                lines.append(f"{'':<8}  {'':<{w_code}}  {'':<{w_mod}}  fix: {f.fix}")
        else:
            lines.append("no findings")
        if self.layers:
            lines.append("")
            w_mod = max(len(i.module or "<model>") for i in self.layers)
            w_type = max(len(i.type) for i in self.layers)
            lines.append(
                f"{'MODULE':<{w_mod}}  {'TYPE':<{w_type}}  MODE   BATCH-STATS  VALUES/STAT"
            )
            for i in self.layers:
                values = "-" if i.values_per_statistic is None else str(i.values_per_statistic)
                lines.append(
                    f"{i.module or '<model>':<{w_mod}}  {i.type:<{w_type}}  "
                    f"{'train' if i.training else 'eval ':<5}  "
                    f"{'yes' if i.batch_statistics else 'no':<11}  {values}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


# ----------------------------------------------------------------------------- layer kinds


def _keeps_batch_statistics(m: nn.Module) -> bool:
    """Computes statistics over the batch in training (BN and layers declaring a batch kind)."""
    kind = getattr(type(m), "_recalibrate_kind", None)
    return is_batch_norm(m) or kind in ("batch_mean_var", "batch_second_moment")


def _judges_staleness(m: nn.Module) -> bool:
    """Running mean / variance that eval uses in place of the batch's (BN-like layers)."""
    return is_batch_norm(m) or getattr(type(m), "_recalibrate_kind", None) == "batch_mean_var"


def _is_instance_norm(m: nn.Module) -> bool:
    return isinstance(m, (_TorchInstanceNorm, _InstanceNorm))


def _is_group_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) or (
        isinstance(getattr(m, "num_groups", None), int)
        and isinstance(getattr(m, "num_channels", None), int)
    )


def _is_norm(m: nn.Module) -> bool:
    return (
        _keeps_batch_statistics(m)
        or is_frozen_batch_norm(m)
        or _is_instance_norm(m)
        or _is_group_norm(m)
        or "Frozen" in type(m).__name__
        and hasattr(m, "running_var")
    )


def _tensor(m: nn.Module, name: str) -> Tensor | None:
    t = getattr(m, name, None)
    return t if isinstance(t, Tensor) else None


# ----------------------------------------------------------------------------- static checks


def _static(path: str, m: nn.Module, evaluating: bool) -> list[Finding]:
    out: list[Finding] = []
    name = type(m).__name__
    batch = _keeps_batch_statistics(m)
    mean, var = _tensor(m, "running_mean"), _tensor(m, "running_var")
    tracks = mean is not None or var is not None

    if batch and evaluating and m.training:
        out.append(
            Finding(
                "bn_training_mode",
                "error",
                path,
                f"{name} is in training mode while the model is evaluated: it normalizes each "
                "batch with its own statistics (outputs depend on the other samples, and "
                "batch 1 fails) and overwrites its running statistics.",
                "Call model.eval() before evaluating (and do not call .train() on submodules "
                "afterwards); to keep it in eval mode during training use "
                "normlab.convert.freeze_bn(model).",
            )
        )
    if batch and not tracks and evaluating:
        out.append(
            Finding(
                "batch_stats_in_eval",
                "warning",
                path,
                f"{name} has track_running_stats=False, so even in eval mode it normalizes with "
                "the statistics of the evaluation batch: predictions depend on what else is "
                "in the batch, and a batch of 1 with a 1×1 map gives 0.",
                "Create it with track_running_stats=True and compute the statistics with "
                "normlab.recalibrate.recalibrate(model, batches); or use a batch-independent "
                "norm (convert_norms(model, 'gn')).",
            )
        )
    if batch and m.training and tracks and _frozen_affine(m):
        out.append(
            Finding(
                "bn_params_frozen_stats_not",
                "warning",
                path,
                f"{name}'s γ and β have requires_grad=False, but the layer is in training mode: "
                "it still normalizes with batch statistics and updates its running statistics, "
                "so it is not frozen.",
                "Use normlab.convert.freeze_bn(model) (stays frozen after model.train()), or "
                "call .eval() on these layers after every model.train().",
            )
        )
    trainable = ", ".join(n for n, p in m.named_parameters(recurse=False) if p.requires_grad)
    if "Frozen" in name and trainable:
        out.append(
            Finding(
                "frozen_bn_changes",
                "error",
                path,
                f"{name} is meant to be frozen but holds trainable parameters ({trainable}); "
                "an optimizer will change them.",
                "Use normlab.nn.FrozenBatchNorm*d (buffers only), e.g. via "
                "normlab.convert.freeze_bn(model), or set requires_grad_(False).",
            )
        )
    momentum = getattr(m, "momentum", None)
    if batch and tracks and isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        if momentum <= 0:
            out.append(
                Finding(
                    "momentum_extreme",
                    "warning",
                    path,
                    f"{name} has momentum={momentum}: its running statistics never move from "
                    "their initial values (mean 0, variance 1), so eval uses made-up statistics.",
                    "Use momentum=0.1 (torch's default) or None (cumulative average), or "
                    "recalibrate after training.",
                )
            )
        elif momentum >= 0.5:
            out.append(
                Finding(
                    "momentum_extreme",
                    "warning",
                    path,
                    f"{name} has momentum={momentum}: the running statistics are mostly the last "
                    f"{'batch' if momentum >= 1 else 'few batches'}, as noisy as one batch "
                    "estimate.",
                    "Use momentum=0.1 (or smaller for tiny batches), None for a cumulative "
                    "average, or recalibrate after training.",
                )
            )
    for buf_name, buf in (("running_mean", mean), ("running_var", var)):
        if buf is not None and buf.is_floating_point() and not bool(torch.isfinite(buf).all()):
            bad = int((~torch.isfinite(buf)).sum())
            out.append(
                Finding(
                    "running_stats_nonfinite",
                    "error",
                    path,
                    f"{name}.{buf_name} has {bad} NaN/inf value(s): every eval output of "
                    "these channels is NaN.",
                    "Find the step that diverged (lower the learning rate, check the data for "
                    "NaN/inf), then recompute the statistics with "
                    "normlab.recalibrate.recalibrate(model, batches).",
                )
            )
    eps = getattr(m, "eps", 1e-5)
    eps = float(eps) if isinstance(eps, (int, float)) else 1e-5
    if var is not None and var.is_floating_point():
        finite = torch.isfinite(var)
        tiny = finite & (var < eps / 100)
        if bool(tiny.any()):
            out.append(
                Finding(
                    "running_var_near_zero",
                    "warning",
                    path,
                    f"{name}.running_var is below eps/100 = {eps / 100:.3g} in {int(tiny.sum())} "
                    f"of {var.numel()} channel(s): eval divides by about sqrt(eps), amplifying "
                    f"any input change in those channels up to {1 / math.sqrt(eps):.0f}×.",
                    "If the channels are dead (constant input), prune them or ignore this; "
                    "otherwise recompute the statistics on representative data with "
                    "normlab.recalibrate.recalibrate(model, batches).",
                )
            )
    if batch:
        channels = getattr(m, "num_features", None)
        if isinstance(channels, int) and channels % 32 != 0:
            g = auto_groups(channels)
            out.append(
                Finding(
                    "groupnorm32_blocked",
                    "info",
                    path,
                    f"{channels} channels are not divisible by 32, so GroupNorm(32) cannot replace "
                    f"this layer; convert_norms(model, 'gn') would use {g} group(s) "
                    f"({channels // g} channel(s) per group).",
                    "Fine if intended; otherwise use a multiple of 32 channels or choose the "
                    "number of groups explicitly (convert_norms(model, 'gn', num_groups=...)).",
                )
            )
    return out


def _frozen_affine(m: nn.Module) -> bool:
    params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
    return bool(params) and all(isinstance(p, nn.Parameter) and not p.requires_grad for p in params)


# ----------------------------------------------------------------------------- the probe run


def _values_per_statistic(m: nn.Module, x: Tensor, batch_size: int | None) -> int | None:
    if not isinstance(x, Tensor) or x.dim() < 2:
        return None
    spatial = math.prod(x.shape[2:])
    if _keeps_batch_statistics(m):
        return (batch_size if batch_size is not None else x.shape[0]) * spatial
    if _is_group_norm(m):
        return x.shape[1] // max(int(m.num_groups), 1) * spatial
    if _is_instance_norm(m):
        rank = getattr(type(m), "_spatial", None)
        if isinstance(rank, int) and x.dim() == rank + 1:  # unbatched (C, *spatial)
            return math.prod(x.shape[1:])
        return spatial
    return None


def _stale_distance(m: nn.Module, rec: dict[str, Any]) -> float | None:
    """RMS over channels of the eval − train output difference, in normalized units.

    The batch statistics are those of all the layer's inputs in the forward (a
    layer called twice sees both inputs), against its running statistics before
    the forward.
    """
    pop: _Population | None = rec.get("population")
    running = rec.get("running")
    if pop is None or running is None or pop.mean is None or pop.n < STALE_MIN_VALUES:
        return None
    mean, var = running
    if mean.shape != pop.mean.shape:
        return None
    eps = float(getattr(m, "eps", 1e-5))
    mean_b, var_b = pop.mean, pop.m2 / pop.n
    s_b = torch.sqrt(var_b + eps)
    s_r = torch.sqrt(var.double() + eps)
    # y_eval/γ − y_train/γ = x̂·(s_b/s_r − 1) + (μ_b − μ_r)/s_r, with x̂ of mean 0, var 1.
    per_channel = (s_b / s_r - 1).square() + ((mean_b - mean.double()) / s_r).square()
    value = float(torch.sqrt(per_channel.mean()))
    return value if math.isfinite(value) else None


def diagnose(
    model: nn.Module,
    example_inputs: Any,
    *,
    expect_eval: bool | None = None,
    batch_size: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Report:
    """Inspect ``model``'s norm layers and run it once on ``example_inputs``.

    Args:
        model: any module; not modified (the forward runs on a deep copy, in the
            modes you set).
        example_inputs: one batch: a tensor (``model(x)``), a tuple/list
            (``model(*inputs)``) or a dict (``model(**inputs)``).
        expect_eval: True if you are about to evaluate, False if training; None
            infers it from ``model.training`` (the root's flag), so a BN left in
            training mode inside an ``eval()``-ed model is caught.
        batch_size: the training batch size, if different from the example's, used
            for the values-per-statistic count of batch-statistics layers.
        forward_fn: ``forward_fn(model, example_inputs)`` when the model needs more
            than ``model(...)``.

    Returns:
        A :class:`Report`; ``report.findings`` sorted by severity, then module path.

    Raises:
        RuntimeError: the model failed on ``example_inputs`` (the cause is attached).
    """
    evaluating = (not model.training) if expect_eval is None else bool(expect_eval)
    probe = copy.deepcopy(model)
    named = [(p, m) for p, m in probe.named_modules() if _is_norm(m)]
    findings: list[Finding] = []
    for path, m in named:
        findings.extend(_static(path, m, evaluating))

    seen: dict[int, dict[str, Any]] = {}
    dropout_out: dict[int, tuple[Tensor, str]] = {}
    paths = {id(m): p for p, m in named}
    for p, m in probe.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            paths[id(m)] = p

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        rec = seen.setdefault(id(module), {"shape": None, "values": None})
        if isinstance(x, Tensor):
            rec["shape"] = tuple(x.shape)
            values = _values_per_statistic(module, x, batch_size)
            if values is not None:
                rec["values"] = values if rec["values"] is None else min(rec["values"], values)
            mean, var = _tensor(module, "running_mean"), _tensor(module, "running_var")
            if _judges_staleness(module) and mean is not None and var is not None and x.dim() >= 2:
                if "running" not in rec:
                    rec["running"] = (mean.detach().clone(), var.detach().clone())
                    rec["population"] = _Population(module, "batch_mean_var", paths[id(module)])
                rec["population"].update(x)
            hit = dropout_out.get(id(x))
            if hit is not None and hit[0] is x and _keeps_batch_statistics(module):
                rec["after_dropout"] = hit[1]
        if is_frozen_batch_norm(module) or "Frozen" in type(module).__name__:
            rec["before"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        rec = seen[id(module)]
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
            dropout_out[id(output)] = (output, paths[id(module)])

    handles = []
    try:
        for _, m in named:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        for m in probe.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                handles.append(m.register_forward_hook(dropout_hook))
        try:
            with torch.no_grad():
                feed(probe, example_inputs, forward_fn)
        except Exception as e:
            raise RuntimeError(
                f"diagnose: running the model on example_inputs failed ({type(e).__name__}: {e}). "
                "The doctor needs one successful forward; check the input shape/dtype/device, "
                "or pass forward_fn=."
            ) from e
    finally:
        for h in handles:
            h.remove()

    layers: list[LayerInfo] = []
    for path, m in named:
        rec = seen.get(id(m), {})
        batch = _keeps_batch_statistics(m)
        values = rec.get("values")
        layers.append(
            LayerInfo(path, type(m).__name__, m.training, batch, rec.get("shape"), values)
        )
        findings.extend(_dynamic(path, m, rec, batch, values, batch_size))

    findings.sort(key=lambda f: (_ORDER[f.severity], f.module, f.code))
    return Report(findings, layers)


def _dynamic(
    path: str,
    m: nn.Module,
    rec: dict[str, Any],
    batch: bool,
    values: int | None,
    batch_size: int | None,
) -> list[Finding]:
    out: list[Finding] = []
    name = type(m).__name__
    if batch and values is not None and values < TINY_WARNING:
        at = f"batch size {batch_size}" if batch_size is not None else "the example's batch size"
        out.append(
            Finding(
                "tiny_batch_statistic",
                "error" if values <= TINY_ERROR else "warning",
                path,
                f"{name} computes each training-time batch statistic from only {values} value(s) "
                f"(N × spatial at {at}, input {rec.get('shape')}). In our measurements "
                "(LAB-NOTES) the BN penalty is governed by this number: 2 values (batch 2, 1×1 "
                "map) was catastrophic, 8 was enough.",
                "Use a larger batch or keep a larger feature map before this layer; or replace "
                "BN by a batch-independent norm (convert_norms(model, 'gn'), FRN, EvoNorm-S0); or "
                "freeze it (freeze_bn) when fine-tuning from good statistics.",
            )
        )
    if not batch and values == 1 and (_is_group_norm(m) or _is_instance_norm(m)):
        out.append(
            Finding(
                "degenerate_statistic",
                "error",
                path,
                f"{name} normalizes groups of a single value (input {rec.get('shape')}): x − mean "
                "is 0, so the output is β whatever the input, and no gradient flows through.",
                "Use fewer groups (GroupNorm) or a norm over more dims here (LayerNorm / BN), "
                "or keep a larger spatial map before this layer.",
            )
        )
    stale = _stale_distance(m, rec)
    if stale is not None and stale > STALE_DISTANCE:
        out.append(
            Finding(
                "stale_running_stats",
                "warning",
                path,
                f"{name}'s running statistics do not describe its input: on the example batch "
                f"the eval-mode output differs from the train-mode output by {stale:.2f} "
                "(RMS, in units of the normalized output; threshold "
                f"{STALE_DISTANCE}).",
                "Recompute them on training data with normlab.recalibrate.recalibrate(model, "
                "batches) — e.g. after converting, fusing or changing the data; if the example "
                "batch is unrepresentative, ignore this.",
            )
        )
    changed = rec.get("frozen_changed")
    if changed:
        out.append(
            Finding(
                "frozen_bn_changes",
                "error",
                path,
                f"{name} is meant to be frozen but its {', '.join(sorted(changed))} changed "
                "during one forward pass.",
                "Use normlab.nn.FrozenBatchNorm*d (normlab.convert.freeze_bn(model)), whose "
                "buffers never change.",
            )
        )
    source = rec.get("after_dropout")
    if source is not None:
        out.append(
            Finding(
                "dropout_before_bn",
                "warning",
                path,
                f"{name} takes the output of dropout {source}: in training it sees the variance "
                "of dropped-out activations, in eval the variance without dropout, so its "
                "running variance is wrong at test time ('variance shift', Li et al., CVPR "
                "2019).",
                "Move dropout after the last BN (e.g. just before the classifier), or "
                "recalibrate the statistics with dropout off (model.eval() then "
                "normlab.recalibrate.recalibrate).",
            )
        )
    return out


# ----------------------------------------------------------------------------- CLI helper


class DoctorTargetError(RuntimeError):
    """A ``module.py:factory`` target could not be loaded.

    ``part`` says which step failed: ``"spec"`` (malformed string), ``"file"``
    (no such file), ``"import"`` (importing the module raised), ``"attribute"``
    (no such factory), ``"call"`` (the factory raised) or ``"result"`` (it did not
    return ``(model, example_inputs)``).
    """

    def __init__(self, part: str, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}")
        self.part = part
        self.target = target


def load_factory(target: str) -> tuple[nn.Module, Any]:
    """Import ``"path/to/file.py:factory"`` (or ``"package.module:factory"``) and call it.

    The contract: ``factory`` takes no arguments and returns
    ``(model, example_inputs)`` — an ``nn.Module`` in the mode to diagnose (call
    ``.eval()`` for inference) and one batch as :func:`diagnose` accepts it (a
    tensor, a tuple of positional inputs or a dict of keyword inputs). A file's
    own folder is on ``sys.path`` while it is imported, so it may import its
    neighbours.

    Raises:
        DoctorTargetError: with ``part`` naming the step that failed.
    """
    if ":" not in target or target.endswith(":") or target.startswith(":"):
        raise DoctorTargetError(
            "spec",
            target,
            "expected 'path/to/file.py:factory' or 'package.module:factory' (a colon, then "
            "the name of a function returning (model, example_inputs)).",
        )
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(target, Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise DoctorTargetError(
                "import", target, f"importing module {where!r} failed: {type(e).__name__}: {e}"
            ) from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        raise DoctorTargetError(
            "attribute",
            target,
            f"{where} has no callable {attr!r}; callables defined there: "
            f"{', '.join(names) or 'none'}.",
        )
    try:
        result = factory()
    except Exception as e:
        raise DoctorTargetError(
            "call", target, f"calling {attr}() raised {type(e).__name__}: {e}"
        ) from e
    if (
        not isinstance(result, (tuple, list))
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
    ):
        raise DoctorTargetError(
            "result",
            target,
            f"{attr}() returned {type(result).__name__}; it must return "
            "(model: nn.Module, example_inputs).",
        )
    return result[0], result[1]


def _import_file(target: str, path: Path) -> Any:
    if not path.is_file():
        raise DoctorTargetError("file", target, f"no such file: {path}")
    name = f"_normlab_doctor_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DoctorTargetError("import", target, f"{path} cannot be imported as a module.")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise DoctorTargetError(
            "import", target, f"importing {path} failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module
