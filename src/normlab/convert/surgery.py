"""The shared machinery of model surgery: the report, the walk that replaces modules, helpers.

Modules are *replaced* in their parent, never patched. A module registered in
several places (the same object under two names) is replaced by **one** new
module, registered in all those places, so weight sharing survives. Only
references held through ``nn.Module`` children are seen: a plain Python list of
layers is not.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .. import nn as nnl
from ..kinds import activation_tail, is_norm_act, overrides_forward

_RANK_CLASSES = (
    (1, (nn.BatchNorm1d, nnl.BatchNorm1d, nnl.FrozenBatchNorm1d)),
    (2, (nn.BatchNorm2d, nnl.BatchNorm2d, nnl.FrozenBatchNorm2d)),
    (3, (nn.BatchNorm3d, nnl.BatchNorm3d, nnl.FrozenBatchNorm3d)),
)


#: normlab's BatchNorm and FrozenBatchNorm of each spatial rank (what surgery builds).
BATCH_NORM_BY_RANK = {1: nnl.BatchNorm1d, 2: nnl.BatchNorm2d, 3: nnl.BatchNorm3d}
FROZEN_BY_RANK = {1: nnl.FrozenBatchNorm1d, 2: nnl.FrozenBatchNorm2d, 3: nnl.FrozenBatchNorm3d}


def rank_of(module: nn.Module) -> int | None:
    """Spatial rank (1, 2, 3) from the class, or None when the class does not say (SyncBN)."""
    for rank, classes in _RANK_CLASSES:
        if isinstance(module, classes):
            return rank
    name = type(module).__name__
    for rank in (1, 2, 3):
        if name.endswith(f"{rank}d"):
            return rank
    return None


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """device and dtype of a module's first floating tensor."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def type_name(module: nn.Module) -> str:
    """Fully qualified class name; for a norm kept with its activation, ``norm + act``."""
    if isinstance(module, nn.Sequential) and "norm" in module._modules and "act" in module._modules:
        norm, act = module._modules["norm"], module._modules["act"]
        return f"{type_name(norm)} + {type(act).__name__}"  # type: ignore[arg-type]
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(f: Callable[..., Any]) -> str:
    """A short name for a factory (class, function or partial)."""
    if isinstance(f, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in f.keywords.items())
        return f"partial({describe(f.func)}{', ' + kw if kw else ''})"
    return getattr(f, "__qualname__", type(f).__name__)


def num_channels(module: nn.Module) -> int:
    """C of a BatchNorm or a frozen BatchNorm (foreign ones have no ``num_features``)."""
    n = getattr(module, "num_features", None)
    if isinstance(n, int):
        return n
    return int(module.running_mean.shape[0])  # type: ignore[union-attr]


def check_lazy(model: nn.Module) -> None:
    """Refuse a model with uninitialised lazy modules: their size is unknown."""
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{path or '<model>'} ({type(m).__name__}) is a lazy module whose size is not "
                "known yet, so it cannot be converted; run one forward pass first."
            )


def check_custom_forward(
    model: nn.Module, tool: str, chosen: Callable[[nn.Module], bool] = lambda m: True
) -> None:
    """Refuse BatchNorm subclasses whose forward adds something a plain norm would drop
    (among the layers ``chosen`` accepts: those ``include=`` / ``exclude=`` kept)."""
    custom = [
        f"{p or '<model>'} ({type(m).__name__})"
        for p, m in iter_matches(model, overrides_forward)
        if chosen(m) and not (is_norm_act(m) or _bare_norm_act(m))
    ]
    if custom:
        raise ValueError(
            f"{tool}: {', '.join(custom)} subclass BatchNorm with their own forward, so they "
            "may compute more than a BatchNorm (an activation, a scale, ...); replacing them "
            "by a plain norm would silently drop that. Nothing was changed. Replace these "
            "layers yourself (or subclass BatchNorm without overriding forward), then rerun."
        )


def _bare_norm_act(m: nn.Module) -> bool:
    """A norm + activation class holding neither ``act`` nor ``drop`` (timm's SyncBatchNormAct
    built directly applies them only if present), so it computes a plain BatchNorm."""
    name = type(m).__name__
    return "Norm" in name and "Act" in name and not ({"act", "drop"} & set(m._modules))


def with_tail(new: nn.Module, old: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """``new`` followed by ``old``'s dropout and activation when ``old`` is a norm + activation.

    The result is ``nn.Sequential(norm=new, drop=..., act=...)`` sharing ``old``'s
    ``drop`` / ``act`` modules, so the activation survives the swap.
    """
    tail = activation_tail(old)
    if tail is None:
        return new, {}
    parts: OrderedDict[str, nn.Module] = OrderedDict(norm=new)
    parts.update(tail._modules)  # type: ignore[arg-type]
    seq = nn.Sequential(parts)
    seq.train(old.training)
    act = tail._modules["act"]
    return seq, {"activation": f"kept ({type(act).__name__}) after the new norm"}


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Replacement:
    """One replaced module.

    Attributes:
        path: dotted path of its first occurrence ("" for the model itself).
        aliases: the other paths of the same object (a module used twice).
        old_type, new_type: fully qualified class names (``norm + Act`` when a
            norm + activation layer was replaced by the new norm and its kept
            activation).
        details: what was carried or chosen (e.g. ``num_groups`` and why), and
            what changed in the architecture (``nonlinearity``, ``activation``).
    """

    path: str
    aliases: tuple[str, ...]
    old_type: str
    new_type: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A normalization layer that was seen but deliberately left in place, and why."""

    path: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    """Every replacement :func:`convert_norms` made, the layers it left, and warnings.

    ``warnings`` holds one sentence per architectural change or surprise: an
    added nonlinearity, GroupNorm groups of one or two channels, frozen layers
    not converted, nothing found.
    """

    replacements: list[Replacement] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replacements)

    @property
    def added_nonlinearity(self) -> list[str]:
        """Paths where the new layer applies a nonlinearity the old BatchNorm did not."""
        return [r.path for r in self.replacements if "nonlinearity" in r.details]

    def to_dict(self) -> dict[str, Any]:
        return {
            "replacements": [
                {
                    "path": r.path,
                    "aliases": list(r.aliases),
                    "old_type": r.old_type,
                    "new_type": r.new_type,
                    "details": dict(r.details),
                }
                for r in self.replacements
            ],
            "skipped": [{"path": s.path, "type": s.type, "reason": s.reason} for s in self.skipped],
            "added_nonlinearity": self.added_nonlinearity,
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        lines = [f"{len(self.replacements)} replacement(s)"]
        for r in self.replacements:
            where = r.path or "<model>"
            if r.aliases:
                where += f" (also {', '.join(r.aliases)})"
            extra = ", ".join(f"{k}={v}" for k, v in r.details.items())
            lines.append(
                f"  {where}: {r.old_type} -> {r.new_type}" + (f" [{extra}]" if extra else "")
            )
        if self.skipped:
            lines.append(f"{len(self.skipped)} left in place")
            lines.extend(f"  {s.path or '<model>'}: {s.type} ({s.reason})" for s in self.skipped)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- walking


def iter_matches(
    model: nn.Module, match: Callable[[nn.Module], bool]
) -> Iterator[tuple[str, nn.Module]]:
    """(first path, module) for every distinct matching module, parents before children."""
    seen: set[int] = set()
    for path, m in model.named_modules(remove_duplicate=False):
        if id(m) not in seen and match(m):
            seen.add(id(m))
            yield path, m


def prebuild(
    model: nn.Module,
    match: Callable[[nn.Module], bool],
    build: Callable[[nn.Module, str], tuple[nn.Module, dict[str, Any]]],
) -> tuple[Callable[[nn.Module, str], tuple[nn.Module, dict[str, Any]]], list[dict[str, Any]]]:
    """Build every replacement before touching the model, so a refusal leaves it unchanged.

    Only the outermost matches are built (a match is not searched inside another).
    Returns the lookup to pass to :func:`replace` and the details of every build.
    """
    built: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    inside: set[int] = set()
    for path, m in iter_matches(model, match):
        if id(m) in inside:
            continue
        built[id(m)] = build(m, path)
        inside.update(id(s) for s in m.modules())
    return (lambda old, path: built[id(old)]), [d for _, d in built.values()]


def replace(
    model: nn.Module,
    match: Callable[[nn.Module], bool],
    build: Callable[[nn.Module, str], tuple[nn.Module, dict[str, Any]]],
) -> tuple[nn.Module, list[Replacement]]:
    """Replace every matching module by ``build(old, path)``: the one walker of model surgery.

    ``build`` returns ``(new, details)``; ``new`` may be ``old`` itself, changed in
    place. Matches are not searched inside; a module registered under several
    names is built once and the new module registered under all of them (the
    other names become its ``aliases``). Returns the new root (``model`` unless it
    matches itself) and one :class:`Replacement` per built module.
    """
    new_of: dict[int, nn.Module] = {}
    new_ids: dict[int, int] = {}  # id(new) -> index into records
    records: list[dict[str, Any]] = []

    def make(old: nn.Module, path: str) -> nn.Module:
        old_type = type_name(old)  # before ``build``, which may change ``old`` in place
        new, details = build(old, path)
        new_of[id(old)] = new
        new_ids[id(new)] = len(records)
        records.append(
            {"path": path, "aliases": [], "old": old_type, "new": new, "details": details}
        )
        return new

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if id(child) in new_of:  # the same old module, met again under another name
                setattr(module, name, new_of[id(child)])
                records[new_ids[id(new_of[id(child)])]]["aliases"].append(path)
            elif id(child) in new_ids:  # inside a shared container we already converted
                records[new_ids[id(child)]]["aliases"].append(path)
            elif match(child):
                setattr(module, name, make(child, path))
            else:
                visit(child, path)

    if match(model):
        root = make(model, "")
    else:
        root = model
        visit(model, "")
    return root, [
        Replacement(r["path"], tuple(r["aliases"]), r["old"], type_name(r["new"]), r["details"])
        for r in records
    ]


def copy_into(new: nn.Module, name: str, value: Tensor | None, channels: int) -> bool:
    """Copy a per-channel tensor into ``new.<name>`` when it exists with shape (C,)."""
    import torch

    target = getattr(new, name, None)
    if value is None or not isinstance(target, Tensor) or tuple(target.shape) != (channels,):
        return False
    with torch.no_grad():
        target.copy_(value.to(target.dtype))
    return True


def left_out(
    model: nn.Module, candidates: Callable[[nn.Module], bool], chosen: Any, done: str
) -> list[Skipped]:
    """A :class:`Skipped` for every candidate the ``include=`` / ``exclude=`` selection
    ``chosen`` (:class:`normlab.convert.select.Selection`) left out; ``done`` says what was
    not done to it (e.g. ``"not frozen"``)."""
    why = "left out by include= / exclude=" + (f" ({done})" if done else "")
    return [
        Skipped(p or "<model>", type_name(m), why)
        for p, m in iter_matches(model, lambda m: candidates(m) and not chosen(m))
    ]
