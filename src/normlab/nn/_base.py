"""The one base class of normlab's per-channel norm layers.

Mirrors torch's ``_NormBase``: the same constructor arguments, parameter and
buffer names (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) and state_dict versioning, so checkpoints move between
torch and normlab. A subclass sets ``_ranks`` / ``_layout`` (the accepted input
ranks; a 1d/2d/3d class names its ``dims=`` instead, :class:`ByDims`) and writes
``forward``, which :func:`guards_running_stats` wraps (every subclass, via
``__init_subclass__``). ``process_group`` is stored for the layers that sync.

Non-finite batches: the functionals keep a layer's running state where a batch's
statistics are inf/NaN (per channel; per layer for windowed state, see
:mod:`normlab._core.running`); here the layer learns of it, puts
``num_batches_tracked`` back when no channel took the batch (a skipped batch is not a
batch averaged), counts
it in :attr:`NormBase.nonfinite_batches_skipped` (a plain attribute: no state_dict
key) and warns once. On CPU the flag is read at once; on a GPU the count stays on
the device until the next natural sync point (``.eval()`` / ``.train(False)``,
``state_dict()``, or reading the count), so training adds no host sync. Under
``torch.compile``, tracing or ``torch.func`` the buffers are guarded all the same,
but ``num_batches_tracked`` still advances and nothing is counted or warned.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

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
from .._core.running import NonFiniteStatisticsWarning, watch

_Forward = TypeVar("_Forward", bound=Callable[..., Any])

#: The input ranks and their layout of a 1d, 2d and 3d per-channel layer (torch's BatchNorm*d).
DIM_LAYOUTS: dict[int, tuple[tuple[int, ...], str]] = {
    1: ((2, 3), "(N, C) or (N, C, L)"),
    2: ((4,), "(N, C, H, W)"),
    3: ((5,), "(N, C, D, H, W)"),
}


class ByDims:
    """The accepted input ranks of a per-channel layer, and the input check they drive.

    ``class BatchNorm2d(_BatchNorm, dims=2)`` sets ``_ranks`` / ``_layout`` from
    ``_dim_layouts``; a class named with ``dims`` and no docstring takes its base's,
    so the three classes of a family say only which they are.
    """

    num_features: int

    _ranks: tuple[int, ...] = ()
    _layout: str = ""
    _dim_layouts: ClassVar[dict[int, tuple[tuple[int, ...], str]]] = DIM_LAYOUTS

    def __init_subclass__(cls, dims: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if dims is not None:
            cls._ranks, cls._layout = cls._dim_layouts[dims]
            if cls.__doc__ is None:
                cls.__doc__ = cls.__mro__[1].__doc__

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        check_floating(name, x)
        check_rank(name, x, self._ranks, self._layout)
        check_channels(name, x, self.num_features)


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


def _eager() -> bool:
    """Plain eager code: not compiling, exporting, tracing or under a torch.func transform."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
    )


def read_at_once(flag: Tensor) -> bool:
    """Whether a skip flag is read as it comes (CPU: free) or kept on the device until
    the next natural sync point (a GPU: no host sync per layer per step)."""
    return flag.device.type == "cpu"


def guards_running_stats(forward: _Forward) -> _Forward:
    """Wrap the ``forward`` of a :class:`NormBase` layer (done for every subclass).

    In an eager training forward it collects the finite flags of the layer's guarded
    writes (:func:`normlab._core.running.watch`); when a channel was kept back it counts
    the batch, and when no channel took it puts ``num_batches_tracked`` back to its
    value before the call (see the module doc).
    """

    @functools.wraps(forward)
    def guarded(self: NormBase, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and _eager()):
            return forward(self, *args, **kwargs)
        counter = self._buffers.get("num_batches_tracked")
        before = None if counter is None else counter.detach().clone()
        with watch() as flags:
            out = forward(self, *args, **kwargs)
        if flags and not any(isinstance(f, torch.fx.Proxy) for f in flags):
            self._record_finite(flags, counter, before)
        return out

    guarded._guards_running_stats = True  # type: ignore[attr-defined]
    return guarded  # type: ignore[return-value]


class UpgradesStateDict(nn.Module):
    """A module that rewrites an older or foreign checkpoint's entries before they load.

    The one override of torch's ``_load_from_state_dict`` hook for the layers here: a
    subclass writes :meth:`_upgrade_state_dict`, which edits ``state_dict`` in place.
    """

    def _upgrade_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
    ) -> None:
        """Rewrite the entries of this module (keys under ``prefix``); none by default."""

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
        self._upgrade_state_dict(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class NormBase(ByDims, UpgradesStateDict):
    """Constructor, buffers, the momentum rule, repr and state_dict versioning (see above)."""

    _version = 2
    # Whether eps=0 is accepted at construction (torch accepts it for BatchNorm,
    # which refuses it only in training, and for InstanceNorm).
    _eps_zero_ok: bool = False

    # Skipped non-finite batches: counted on the host, pending on the device (see the
    # module doc); class defaults, so modules pickled before they existed load.
    _nonfinite_skipped: int = 0
    _nonfinite_pending: Tensor | None = None
    _nonfinite_warned: bool = False

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if callable(forward) and not getattr(forward, "_guards_running_stats", False):
            cls.forward = guards_running_stats(forward)  # type: ignore[method-assign]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        process_group: Any = None,
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
        self.process_group = process_group
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

    def _batch_norm_args(self, momentum: float) -> tuple[Any, ...]:
        """The arguments after ``input`` of a BatchNorm-style functional, by torch's rule.

        ``(running_mean, running_var, weight, bias, training, momentum, eps)``, the
        order of ``F.batch_norm``: batch statistics in training or without buffers; a
        training forward gets the buffers (to update) only while ``track_running_stats``
        is on, which torch lets a user switch off after construction.
        """
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        mean, var = self.running_mean, self.running_var
        if self.training and not self.track_running_stats:
            mean = var = None
        return mean, var, self.weight, self.bias, use_batch_stats, momentum, self.eps

    def _sync_group(self) -> Any:
        """The process group a forward computes its batch statistics over: none in eval."""
        return self.process_group if self.training else None

    @property
    def nonfinite_batches_skipped(self) -> int:
        """Training batches whose non-finite statistics left the running state unchanged.

        Counted since construction, in eager mode (not under ``torch.compile``); not
        in the state_dict. Reading it syncs with the device once.
        """
        self._flush_nonfinite()
        return self._nonfinite_skipped

    def _record_finite(
        self, flags: list[Tensor], counter: Tensor | None, before: Tensor | None
    ) -> None:
        """Undo the step count of a skipped batch and count it (no host sync on a GPU)."""
        with torch.no_grad():
            ok = torch.stack([f.all() for f in flags]).all()  # nothing was kept back
            if counter is not None and before is not None:
                # The batch counts when any channel took it (packed seeds: the others).
                updated = torch.stack([f.any() for f in flags]).any()
                counter.copy_(torch.where(updated, counter, before))
            skipped = (~ok).to(torch.long)
        if read_at_once(skipped):
            self._count_skipped(int(skipped))
            return
        pending = self._nonfinite_pending
        if pending is not None and pending.device != skipped.device:
            self._flush_nonfinite()  # the layer moved: settle the old device's count
            pending = None
        self._nonfinite_pending = skipped if pending is None else pending + skipped

    def _flush_nonfinite(self) -> None:
        pending = self._nonfinite_pending
        if pending is not None:
            self._nonfinite_pending = None
            self._count_skipped(int(pending))

    def _count_skipped(self, n: int) -> None:
        if n <= 0:
            return
        self._nonfinite_skipped += n
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            warnings.warn(
                f"{type(self).__name__}({self.num_features}): a training batch had non-finite "
                "(inf/NaN) statistics, so this layer kept its previous running statistics "
                "and did not count the batch (its output is what the math gives: NaN/inf "
                "where the input was). It warns once and counts such batches in "
                ".nonfinite_batches_skipped (normlab doctor reports them). Find the inf/NaN "
                "source: an AMP overflow (bf16 autocast, torch.amp.GradScaler), a bad "
                "sample, a diverging step; normlab.guard undoes the statistics of the steps "
                "GradScaler skips.",
                NonFiniteStatisticsWarning,
                stacklevel=2,
            )

    def train(self, mode: bool = True) -> NormBase:
        if not mode:
            self._flush_nonfinite()  # a natural sync point: report a GPU's pending count
        return super().train(mode)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._flush_nonfinite()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        s = "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, ".format(
            **self.__dict__
        )
        if self.affine and self.bias is None:
            s += "bias=False, "
        return s + f"track_running_stats={self.track_running_stats}"

    def _upgrade_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
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
