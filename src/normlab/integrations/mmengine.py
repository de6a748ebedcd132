"""mmengine / OpenMMLab adapters: normlab's layers in the ``MODELS`` registry, a precise-BN hook.

:func:`register` puts every layer under a prefixed name (:data:`NAMES`: ``NL-BN``,
``NL-GN``, ``NL-FRN``, ...) so that configs name them as they name mmcv's norms,
``norm_cfg=dict(type="NL-GN", num_groups=32, requires_grad=True)``. Each entry follows
mmcv's ``build_norm_layer`` conventions: it is a class (mmcv infers the layer's name
from its ``_abbr_``) called with the channel count first (``num_channels=`` too, as
mmcv passes it to GroupNorm), ``requires_grad=False`` freezes the parameters, and what
it builds is normlab's own layer (``create_norm``'s, the classes of :mod:`normlab.nn`).

:class:`PreciseBNHook` recalibrates the model's running statistics
(:func:`normlab.recalibrate.recalibrate`) from the first ``num_batches`` training
batches before every validation; in a distributed run each rank feeds its own and the
statistics pool over the ranks, then every other running buffer is made identical
(:func:`normlab.distributed.sync_running_stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import MODELS, Registry
from torch import nn

from ..distributed import WORLD
from ..registry import create_norm
from ._precise import batch_count, first_batches, recalibrate_in_eval

__all__ = ["NAMES", "PreciseBNHook", "register"]

#: The registered name -> (normlab registry name, keywords bound).
NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "NL-BN": ("bn", {}),
    "NL-BN1d": ("bn1d", {}),
    "NL-BN2d": ("bn", {}),
    "NL-BN3d": ("bn3d", {}),
    "NL-SyncBN": ("bn", {"process_group": WORLD}),
    "NL-FrozenBN": ("frozen_bn", {}),
    "NL-GN": ("gn", {}),
    "NL-LN": ("ln", {}),
    "NL-IN": ("in", {}),
    "NL-FRN": ("frn", {}),
    "NL-FRNLinear": ("frn_linear", {}),
    "NL-SN": ("sn", {}),
    "NL-MABN": ("mabn", {}),
    "NL-BRN": ("brn", {}),
    "NL-EvoNormB0": ("evonorm_b0", {}),
    "NL-EvoNormS0": ("evonorm_s0", {}),
    "NL-RMS": ("rms", {}),
}


def _entry(type_name: str, norm: str, bound: dict[str, Any]) -> type:
    """A class whose call builds normlab's ``norm`` (``__new__`` returns the layer itself)."""

    def __new__(  # noqa: N807 - the class's constructor
        cls: type,
        num_features: int | None = None,
        *,
        num_channels: int | None = None,
        requires_grad: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        channels = num_features if num_features is not None else num_channels
        if channels is None or (num_features is not None and num_channels is not None):
            raise TypeError(
                f"{type_name}: pass the channel count once, as num_features (first "
                "argument) or num_channels=, as mmcv's build_norm_layer does."
            )
        layer = create_norm(norm, int(channels), **{**bound, **kwargs})
        for p in layer.parameters():
            p.requires_grad_(bool(requires_grad))
        return layer

    doc = f"mmengine ``{type_name}``: normlab's ``create_norm({norm!r}, C)``."
    return type(
        type_name.replace("-", "_"), (), {"__new__": __new__, "_abbr_": norm, "__doc__": doc}
    )


def register(registry: Registry = MODELS, *, force: bool = False) -> list[str]:
    """Register normlab's layers into ``registry`` (mmengine's ``MODELS`` by default;
    pass mmdet's or mmseg's ``MODELS`` for theirs) under :data:`NAMES`; the names.

    ``force=True`` replaces entries of the same name.
    """
    for type_name, (norm, bound) in NAMES.items():
        registry.register_module(type_name, force=force, module=_entry(type_name, norm, bound))
    return list(NAMES)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """An mmengine ``BaseModel`` on one dataloader batch: its data preprocessor, then
    ``mode="tensor"`` (the plain forward, no loss)."""
    data = model.data_preprocessor(batch, True)
    if isinstance(data, dict):
        return model(**data, mode="tensor")
    return model(*data, mode="tensor")


class PreciseBNHook(Hook):
    """Recalibrate the running statistics from training batches before each validation.

    Args:
        num_batches: training batches per recalibration (per rank when distributed).
        method, variance: as :func:`normlab.recalibrate.recalibrate`.
        forward_fn: ``forward_fn(model, batch)``; default: the model's data
            preprocessor, then ``model(**data, mode="tensor")``.
    """

    priority = "ABOVE_NORMAL"

    def __init__(
        self,
        num_batches: int = 200,
        method: str = "precise",
        variance: str = "population",
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        self.num_batches = batch_count("PreciseBNHook", num_batches)
        self.method = method
        self.variance = variance
        self.forward_fn = forward_fn or _default_forward
        self.last: Any = None

    def before_val_epoch(self, runner: Any) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.last = recalibrate_in_eval(
            model,
            first_batches(runner.train_dataloader, self.num_batches),
            method=self.method,
            variance=self.variance,
            forward_fn=self.forward_fn,
            distributed=get_world_size() > 1,
        )
