"""The user's own network in the lab: build it with each lab norm and check it fits the task.

Each lab norm name gets the layer the lab's own ResNet uses for it
(:mod:`normlab.lab.models.resnet`): a factory that takes ``norm_layer=`` is handed a
``normlab.registry.norm_layer`` for it; every BatchNorm left in the model (all of them
for a factory without ``norm_layer=``) is converted by :func:`normlab.convert.convert_norms`.
``bn`` too becomes normlab's ``BatchNorm*d`` (same math and state_dict as torch's), the
class the lab's ResNet uses for ``bn``, so every norm of a sweep runs normlab's code.
Loading the factory is :mod:`normlab.lab.models.user_factory` (re-exported here).
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn

from ...convert import convert_norms
from ...convert.surgery import type_name
from ...kinds import is_batch_norm, is_frozen_batch_norm
from ...registry import create_norm
from ...registry import norm_layer as registry_norm_layer
from . import resnet as models
from .user_detector import check_detector
from .user_factory import ModelFactoryError, UserFactory, load_factory, short_text

__all__ = [
    "TASKS",
    "ConversionSummary",
    "ModelFactoryError",
    "UserFactory",
    "build_user_model",
    "check_output",
    "lab_target",
    "load_factory",
]

TASKS = ("classification", "segmentation", "detection")


def _lab_group_norm(num_features: int) -> nn.Module:
    """The lab's GroupNorm (:mod:`normlab.lab.models.resnet`'s rule), one group below 4 C."""
    if num_features < 4:  # the lab's rule asks for >= 4 channels per group
        return create_norm("gn", num_features, num_groups=1)
    return models._norm("gn", num_features)


_GN_REASON = "the lab's rule: the largest divisor of C up to min(32, C // 4), >= 4 per group"


def lab_target(norm: str) -> tuple[str | Callable[..., nn.Module], dict[str, Any]]:
    """``(to, kwargs)`` for :func:`normlab.convert.convert_norms` giving the lab's layer.

    The same layers :mod:`normlab.lab.models.resnet` builds for ``norm``: GroupNorm with the
    lab's groups rule, FRN with a learned ε, the registry's layer otherwise (rank-matched
    to BatchNorm1d / 3d layers by ``convert_norms``).
    """
    base = models.resolve_norm(norm)
    if base == "gn":
        return _lab_group_norm, {}
    if base == "frn":
        return "frn", {"learnable_eps": True}
    return base, {}


_NOTES = {
    "bn": "the BatchNorm layers are normlab's BatchNorm (same math and state_dict as "
    "torch's), the class the lab's ResNet uses for 'bn'",
    "frn": "the lab's ResNet drops the ReLU after each FRN (its TLU is the activation); "
    "this model keeps its own activations after the TLU",
    "mabn": "the lab's ResNet feeds MABN from weight-centred convs (CenteredConv2d); this "
    "model keeps its own convs",
    "bn+recal": "the trainer recomputes the BatchNorm running statistics before evaluating",
    "+sync": "batch statistics are synchronized over the default process group "
    "(normlab.distributed.convert_sync; a no-op on one process)",
}


@dataclass(frozen=True)
class ConversionSummary:
    """What the lab did to the user's model for one norm; JSON-able via :meth:`to_dict`.

    Attributes:
        norm: the lab norm name; ``layer``: the registry name behind it.
        factory: the factory's display name; ``source_hash``: its source hash.
        built_with: ``"norm_layer"``, ``"convert_norms"`` or both joined by ``" + "``.
        built: layers the factory built through the lab's ``norm_layer=``.
        converted: BatchNorm layers ``convert_norms`` replaced.
        new_types: class name -> count of the lab's norm layers now in the model.
        layers: one dict per replacement (path, aliases, old_type, new_type, details).
        skipped: layers left in place (path, type, reason), e.g. frozen BatchNorm.
        warnings: ``convert_norms``' warnings and the lab's (norm_layer fallback, ...).
        notes: how this model differs from the lab's ResNet for this norm.
        num_parameters: trainable and frozen parameters of the built model.
        output_shape: the output shape for a batch of 2 images.
    """

    norm: str
    layer: str
    factory: str
    source_hash: str
    built_with: str
    built: int
    converted: int
    new_types: dict[str, int]
    layers: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, Any], ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    num_parameters: int
    output_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("layers", "skipped", "warnings", "notes", "output_shape"):
            d[k] = list(d[k])
        d["new_types"] = dict(self.new_types)
        return d


def build_user_model(
    factory: UserFactory,
    norm: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    seed: int,
    *,
    task: str = "classification",
    frozen: bool = False,
) -> tuple[nn.Module, ConversionSummary]:
    """Build the user's model with the lab's layer for ``norm``, check it, say what changed.

    Seeds torch with ``seed``, calls the factory with the keywords it names (a
    ``norm_layer=`` for ``norm``; if the factory raises with it, it is called again with
    ``torch.nn.BatchNorm2d`` and converted, with a warning), converts every BatchNorm
    left, synchronizes ``+sync`` norms, then checks one train-mode forward
    (:func:`check_output`). ``frozen``: convert frozen BatchNorm too (by default they
    stay, listed under ``skipped``, the same in every run of the sweep).

    Raises:
        ModelFactoryError: the factory raises or returns no nn.Module, the model has
            no BatchNorm and takes no ``norm_layer=``, ``norm`` cannot convert one of
            its layers, or its output does not fit ``task``.
        ValueError: ``norm`` is not a lab norm name.
    """
    base = models.resolve_norm(norm)
    to, kwargs = lab_target(norm)
    kw: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
    kw = {k: v for k, v in kw.items() if k in factory.accepts}
    built: list[nn.Module] = []
    warnings: list[str] = []

    make = registry_norm_layer(to, **kwargs)

    def lab_norm_layer(num_features: int, **extra: Any) -> nn.Module:
        layer = make(num_features, **extra)
        built.append(layer)
        return layer

    if "norm_layer" in factory.accepts:
        try:
            model = _call(factory, {**kw, "norm_layer": lab_norm_layer}, seed)
        except ModelFactoryError as e:
            cause = e.__cause__ or e
            warnings.append(
                f"{factory.name} raised {type(cause).__name__}: {cause} with the lab's "
                f"norm_layer for {norm!r}; built it with norm_layer=torch.nn.BatchNorm2d and "
                "converted that instead."
            )
            built.clear()
            model = _call(factory, {**kw, "norm_layer": nn.BatchNorm2d}, seed)
    else:
        model = _call(factory, kw, seed)
    ours = {id(m) for m in built}
    left = [
        m
        for m in model.modules()
        if id(m) not in ours and (is_batch_norm(m) or (frozen and is_frozen_batch_norm(m)))
    ]
    report = None
    if left:
        try:
            model, report = convert_norms(model, to, frozen=frozen, **kwargs)
        except (ValueError, TypeError) as e:
            raise ModelFactoryError(
                f"norm {norm!r} cannot be used with {factory.name}: {e} Drop {norm!r} from "
                "--norms, or change that layer of the model."
            ) from e
    elif not built:
        only_frozen = any(is_frozen_batch_norm(m) for m in model.modules())
        frozen_note = " (only frozen BatchNorm; frozen=True converts them)" if only_frozen else ""
        raise ModelFactoryError(
            f"{factory.name}: the model has no BatchNorm layer{frozen_note} and the factory "
            f"takes no norm_layer=, so norm {norm!r} would change nothing and every norm of "
            "the sweep would train the same network; build it with nn.BatchNorm2d layers or "
            "accept norm_layer= and use it for the norm layers."
        )
    models.sync_if_asked(model, norm)
    check = functools.partial(
        check_output,
        task=task,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        name=factory.name,
        accepts_num_classes="num_classes" in factory.accepts,
    )
    try:
        shape = check(model)
    except ModelFactoryError as e:
        _blame(factory, kw, seed, norm, e, check)
    info = report.to_dict() if report is not None else {"replacements": [], "skipped": []}
    layers = info["replacements"]
    if base == "gn":
        for r in layers:
            if "groups_reason" in r["details"]:
                r["details"]["groups_reason"] = _GN_REASON
    present = {id(m) for m in model.modules()}
    new_types = Counter(type_name(m) for m in built if id(m) in present)
    new_types.update(r["new_type"] for r in layers)
    if report is not None:
        warnings.extend(report.warnings)
    key = norm.lower().replace("-", "_")
    notes = [_NOTES[k] for k in dict.fromkeys((base, key)) if k in _NOTES]
    if models.is_synced(norm):
        notes.append(_NOTES["+sync"])
    summary = ConversionSummary(
        norm=norm,
        layer=base,
        factory=factory.name,
        source_hash=factory.source_hash,
        built_with=" + ".join(
            w for w, used in (("norm_layer", built), ("convert_norms", report)) if used
        ),
        built=len(built),
        converted=len(layers),
        new_types=dict(new_types),
        layers=tuple(layers),
        skipped=tuple(info["skipped"]),
        warnings=tuple(warnings),
        notes=tuple(notes),
        num_parameters=sum(p.numel() for p in model.parameters()),
        output_shape=shape,
    )
    return model, summary


def _blame(
    factory: UserFactory,
    kw: dict[str, Any],
    seed: int,
    norm: str,
    error: ModelFactoryError,
    check: Callable[[nn.Module], tuple[int, ...]],
) -> NoReturn:
    """Raise the model's own error if it fails with torch BatchNorm too, else blame ``norm``."""
    if "norm_layer" in factory.accepts:
        kw = {**kw, "norm_layer": nn.BatchNorm2d}
    check(_call(factory, kw, seed))  # raises the model's own error
    cause, where = error.__cause__, getattr(error, "where", "")
    detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
    detail = f"in {where}, {detail}" if where else detail
    raise ModelFactoryError(
        f"norm {norm!r} does not fit {factory.name}: with the lab's {norm!r} layers the model "
        f"fails ({detail}), with torch BatchNorm it runs. A layer may not take the input it "
        f"gets there (e.g. a BatchNorm1d after a Linear sees (N, C) features); drop {norm!r} "
        "from --norms, or change that layer of the model."
    ) from error


def _call(factory: UserFactory, kw: dict[str, Any], seed: int) -> nn.Module:
    shown = ", ".join(f"{k}={getattr(v, '__name__', v)!s}" for k, v in kw.items())
    call = f"{factory.name.rpartition(':')[2]}({shown})"
    torch.manual_seed(seed)
    try:
        model = factory.factory(**kw)
    except Exception as e:
        raise ModelFactoryError(
            f"the model factory {factory.name} raised {type(e).__name__}: {e} (called as "
            f"{call}); fix the factory so that this call returns the model."
        ) from e
    if not isinstance(model, nn.Module):
        hint = " (the class itself: instantiate it)" * isinstance(model, type)
        raise ModelFactoryError(
            f"the model factory {factory.name} returned {type(model).__name__} "
            f"{short_text(model)}{hint} when called as {call}, not a torch.nn.Module; return the "
            "network."
        )
    return model


def _enter(stack: list[str], path: str, *_: Any) -> None:
    stack.append(path)


def _leave(stack: list[str], *_: Any) -> None:
    stack.pop()


def check_output(
    model: nn.Module,
    task: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    name: str = "the model",
    accepts_num_classes: bool | None = None,
) -> tuple[int, ...]:
    """Run a copy of ``model`` in train mode on 2 random off-center images; check the output.

    ``task`` ``"classification"`` needs (2, num_classes) logits, ``"segmentation"`` needs
    (2, num_classes, image_size, image_size), ``"detection"`` the torchvision detection
    API (:func:`~normlab.lab.models.user_detector.check_detector`). The model itself and
    torch's global RNG are left untouched (running statistics included). Returns the output shape.

    Raises:
        ModelFactoryError: the forward fails, or gives no tensor or the wrong shape.
        ValueError: an unknown ``task``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    if task == "detection":  # num_classes: torchvision's, the background included
        return check_detector(
            model,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            name=name,
        )
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.3 * torch.randn(2, in_channels, image_size, image_size, generator=gen)
    x = x.to(device=device, dtype=dtype)
    probe = copy.deepcopy(model).train()
    stack: list[str] = []  # the modules entered and not yet left: the last one failed
    for path, m in probe.named_modules():
        m.register_forward_pre_hook(functools.partial(_enter, stack, path))
        m.register_forward_hook(functools.partial(_leave, stack))
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = probe(x)
    except Exception as e:
        where = f"{stack[-1]} ({type(probe.get_submodule(stack[-1])).__name__})" if stack else ""
        error = ModelFactoryError(
            f"{name}: a forward pass on a batch of shape {tuple(x.shape)} failed"
            f"{' in ' + where if where else ''} with {type(e).__name__}: {e} The lab's images "
            f"have {in_channels} channel(s) of {image_size}×{image_size}: make the first layer "
            f"take in_channels={in_channels} (or accept in_channels=) and every layer fit that "
            "size."
        )
        error.where = where  # type: ignore[attr-defined]
        raise error from e
    if not isinstance(out, torch.Tensor):
        keys = f" with keys {list(out)}" if isinstance(out, dict) else ""
        raise ModelFactoryError(
            f"{name}: the forward returned a {type(out).__name__}{keys}, not a tensor; the "
            f"lab needs the {task} logits alone: return that tensor from forward."
        )
    got, k, s = tuple(out.shape), num_classes, image_size
    want = (2, k) if task == "classification" else (2, k, s, s)
    if got == want:
        return got
    fix = f"make the model output {want}"
    if task == "classification" and len(got) == 4 and got[2:] == (1, 1):
        fix = "flatten the pooled features before the classifier (torch.flatten(x, 1))"
    elif len(got) == len(want) and got[0] == 2 and got[1] != k:
        fix = (
            "the factory accepts num_classes= but the model ignores it: pass it on to the "
            "last layer"
            if accepts_num_classes
            else f"set the last layer to num_classes={k} or accept num_classes= in the factory"
        )
    elif task == "segmentation" and len(got) == 4 and got[2:] != (s, s):
        fix = "upsample the logits to the input size (F.interpolate(..., size=x.shape[-2:]))"
    raise ModelFactoryError(
        f"{name}: a batch of 2 images of {in_channels}×{s}×{s} gives output of shape {got}, "
        f"but {task} needs {want}; {fix}."
    )
