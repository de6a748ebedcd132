"""The one base class of normlab's per-channel norm layers.

Mirrors torch's ``_NormBase``: the same constructor arguments, parameter and
buffer names (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) and state_dict versioning, so checkpoints move between
torch and normlab. A subclass sets ``_ranks`` / ``_layout`` (the accepted input
ranks) and writes ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._core.checks import (
    check_channels,
    check_count,
    check_eps,
    check_floating,
    check_rank,
    refuse_under_transforms,
)


def check_num_features(layer: str, num_features: int) -> int:
    """``num_features`` as an int, refused below 1 or when not an integer (2.5, '8')."""
    return check_count(layer, "num_features", num_features)


def add_affine(
    module: nn.Module,
    shape: int | tuple[int, ...],
    affine: bool,
    factory: dict[str, Any],
    *,
    bias: bool = True,
) -> None:
    """Register ``weight`` (ones) and ``bias`` (zeros) of ``shape`` on ``module``, torch's way.

    Without ``affine`` both are None; with ``bias=False`` only ``bias`` is. A None
    parameter is absent from the state_dict, as in torch's norms.
    """
    if affine:
        module.weight = nn.Parameter(torch.ones(shape, **factory))
        if bias:
            module.bias = nn.Parameter(torch.zeros(shape, **factory))
        else:
            module.register_parameter("bias", None)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    """Set ``weight`` to 1 and ``bias`` to 0 (those that are not None): the identity map."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class NormBase(nn.Module):
    """Constructor, buffers, the momentum rule, repr and state_dict versioning (see above)."""

    _version = 2
    _ranks: tuple[int, ...] = ()
    _layout: str = ""
    # Whether eps=0 is accepted at construction (torch accepts it for BatchNorm,
    # which refuses it only in training, and for InstanceNorm).
    _eps_zero_ok: bool = False

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_num_features(name, num_features)
        check_eps(name, eps, zero_ok=self._eps_zero_ok)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"{name}: momentum must be in [0, 1] (the weight of the new batch statistic) "
                f"or None (cumulative average), got {momentum}."
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        add_affine(self, self.num_features, affine, factory, bias=bias)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        check_floating(name, x)
        check_rank(name, x, self._ranks, self._layout)
        check_channels(name, x, self.num_features)

    def _momentum_factor(self) -> float:
        """Advance ``num_batches_tracked`` and return the weight of the new batch.

        ``momentum=None`` is the cumulative average 1/num_batches_tracked, as in torch.
        """
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            if self.momentum is None:
                refuse_under_transforms(
                    type(self).__name__,
                    "momentum=None reads num_batches_tracked on the host (a cumulative "
                    "average 1/num_batches_tracked)",
                    "Build the layer with a float momentum (e.g. momentum=0.1), or call "
                    ".eval() to use the running statistics.",
                )
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def extra_repr(self) -> str:
        s = "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, ".format(
            **self.__dict__
        )
        if self.affine and self.bias is None:
            s += "bias=False, "
        return s + f"track_running_stats={self.track_running_stats}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats and self._version >= 2:
            # Checkpoints from before num_batches_tracked existed (torch < 0.4.1); a class
            # still at version 1 never had such checkpoints.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
