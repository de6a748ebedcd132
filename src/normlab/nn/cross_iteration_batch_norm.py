"""CrossIterationBatchNorm2d (Yao et al., CVPR 2021)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

from .. import functional as NF
from .._core.stats import acc_dtype
from ..functional.cross_iteration_batch_norm import IterationWindow
from ._base import NormBase

__all__ = ["CrossIterationBatchNorm2d", "preceding_conv_weight"]

_WINDOW = ("mean", "var", "grad_mean", "grad_var", "conv_weight", "filled")
_CASTS = ("ToCopyBackward0", "CloneBackward0")


def preceding_conv_weight(x: Tensor) -> Tensor | None:
    """The weight of the convolution that computed ``x``, read from ``x``'s autograd graph.

    ``x.grad_fn`` is the convolution's backward node; its second input is the
    weight's gradient accumulator (behind autocast's cast, if any), which holds the
    weight itself. None when ``x`` is no convolution's output or the weight needs no
    gradient (a frozen convolution, or a computed weight such as a standardized one).
    """
    fn = x.grad_fn
    if fn is None or fn.name() != "ConvolutionBackward0" or len(fn.next_functions) < 2:
        return None
    node = fn.next_functions[1][0]
    while node is not None and node.name() in _CASTS:
        node = node.next_functions[0][0]
    weight = getattr(node, "variable", None)
    return weight if isinstance(weight, Tensor) and weight.requires_grad else None


class CrossIterationBatchNorm2d(NormBase):
    r"""Cross-Iteration Batch Normalization: BN statistics pooled over recent iterations.

    From "Cross-Iteration Batch Normalization" (Yao et al., CVPR 2021). At small
    batch sizes BN's statistics are noisy; CBN averages them with those of the
    last ``buffer_size`` iterations, each carried to the current weights of the
    preceding convolution by a first-order Taylor term (the gradients of the
    batch mean and variance with respect to that weight). The math:
    :mod:`normlab.functional.cross_iteration_batch_norm`.

    **The preceding convolution** is found in the input's autograd graph at each
    training step: the layer must directly follow an ``nn.Conv2d`` (any stride,
    padding, groups) whose weight requires grad, as BN does in ResNets. So
    ``convert_norms(model, "cbn")``, ``norm_layer("cbn")`` and
    ``normlab sweep --norms cbn`` need no wiring. The weight may instead be
    passed, as the authors' layer takes it: ``cbn(x, conv.weight)``. Where there
    is none (the input is no convolution's output, the convolution is frozen or
    computes its weight, e.g. a weight-standardized one), that step uses this
    batch's statistics alone (BatchNorm), and the layer warns once.

    * training, the first ``burnin`` steps (``num_batches_tracked`` ≤ ``burnin``),
      and any step without a recorded gradient (``torch.no_grad()``, a frozen
      stem): BatchNorm on this batch; the window is neither read nor written.
    * training after burn-in: pooled statistics over this batch and the window's
      entries whose compensated variance is ≥ 0; this batch then enters the window.
    * the running statistics are BatchNorm's, of each batch alone (the unbiased
      variance, ``momentum``); eval is BatchNorm in eval.

    The state_dict is ``torch.nn.BatchNorm2d``'s (a BN checkpoint loads as is;
    ``num_batches_tracked`` is kept even with ``track_running_stats=False``, it
    counts the burn-in; ``convert_norms`` copies BN's count, so a converted model
    starts after its burn-in unless that count is reset). The window
    (``window_mean`` …, ``buffer_size`` × 3 copies of the convolution's weight) is
    a non-persistent buffer: it follows ``.to()`` but not the state_dict, and
    refills in ``buffer_size`` steps after a resume, as in the authors' code.

    Differences from the authors' ``CBatchNorm2d`` (Howal/Cross-iterationBatchNorm),
    all deliberate: ε inside the square root (their default adds it to σ; their
    ``out_p=True`` is ours); the biased variance in the burn-in steps too (theirs
    normalizes with the unbiased one there); statistics as numerics rules 1–2
    (stable variance, fp32 for half input) where theirs computes E[x²] − μ²; this
    batch always counts (theirs drops it too where E[x²] − μ² rounds below 0);
    ``momentum=None`` and a process group are supported; ``burnin`` counts steps
    (their training script converts epochs); no ``two_stage=False`` ramp and no
    ``FROZEN`` flag (use :func:`normlab.convert.freeze_bn`).

    Args:
        num_features: C.
        eps: added to the variance inside the square root (>= 0; > 0 to train).
        momentum: weight of the new batch statistic in the running average, or None.
        affine: learn γ (``weight``, ones) and β (``bias``, zeros).
        track_running_stats: keep ``running_mean`` and ``running_var``.
        process_group: in training, compute the batch statistics (and their
            gradients) over every process of this group: None, ``"world"`` or a
            ``torch.distributed.ProcessGroup``; see :mod:`normlab.distributed`.
        buffer_size: previous iterations pooled (the authors' ``buffer_num``; their
            detection configs: 3, a window of 4 iterations). 0 is BatchNorm.
        burnin: training steps of plain BN before pooling starts (>= 0). The
            authors' class default is 0; their detection configs burn in 8 of 12
            epochs (set ``burnin`` to that many steps).
        rho: factor of the Taylor term (the authors' ρ, 1.0; 0 pools the old
            statistics uncompensated, their "naive" baseline).
        bias: with ``affine``, learn β too.

    Example::

        >>> block = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
        ...     normlab.nn.CrossIterationBatchNorm2d(16),
        ... )
        >>> y = block(torch.randn(2, 3, 32, 32))
    """

    _ranks = (4,)
    _layout = "(N, C, H, W)"
    _eps_zero_ok = True

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
        buffer_size: int = 3,
        burnin: int = 0,
        rho: float = 1.0,
        bias: bool = True,
    ) -> None:
        name = type(self).__name__
        for arg, value in (("buffer_size", buffer_size), ("burnin", burnin)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {arg} must be an int >= 0, got {value!r}.")
        if not isinstance(rho, (int, float)) or not float("-inf") < float(rho) < float("inf"):
            raise ValueError(f"{name}: rho must be a finite number (1.0: the paper), got {rho!r}.")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            process_group,
            bias=bias,
        )
        self.buffer_size = buffer_size
        self.burnin = burnin
        self.rho = float(rho)
        self._warned = False
        self._conv_ref: weakref.ref[Tensor] | None = None
        if self.num_batches_tracked is None:
            self.register_buffer("num_batches_tracked", torch.tensor(0, device=device))
        for part in _WINDOW:
            self.register_buffer(f"window_{part}", None, persistent=False)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if "window_filled" in self._buffers:  # the base constructor calls this first
            for part in _WINDOW:
                setattr(self, f"window_{part}", None)
            self._conv_ref = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) adopts the copied model's convolution at its next step.
        return {**self.__dict__, "_conv_ref": None}

    def _adopt(self, weight: Tensor) -> None:
        """Remember ``weight``; refuse a second convolution feeding the same layer."""
        known = None if self._conv_ref is None else self._conv_ref()
        if known is not None and known is not weight:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) is fed by more than one "
                "convolution (a layer shared across calls): its window holds statistics of "
                "one convolution's output, which cannot be carried over to another's. Give "
                "each convolution its own layer (or GroupNorm via convert_norms(..., "
                "include=...)); reset_running_stats() forgets the convolution."
            )
        self._conv_ref = weakref.ref(weight)

    def _window(self, conv_weight: Tensor, dtype: torch.dtype) -> IterationWindow:
        """The window for ``conv_weight``'s output, allocated at first use."""
        if self.window_filled is None:
            new = IterationWindow.empty(self.buffer_size, conv_weight, dtype)
            for part, t in zip(_WINDOW, new, strict=True):
                setattr(self, f"window_{part}", t)
        return IterationWindow(*(getattr(self, f"window_{part}") for part in _WINDOW))

    def _conv_weight(self, input: Tensor, given: Tensor | None) -> Tensor | None:
        """θ_t for a pooling step, or None (this step is BatchNorm; see the class doc)."""
        if not (self.training and self.buffer_size > 0 and input.requires_grad):
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            raise RuntimeError(
                f"{type(self).__name__}: a training step with buffer_size={self.buffer_size} "
                "cannot be compiled or traced: it reads its step count on the host and "
                "differentiates its batch statistics with respect to the convolution's "
                "weight inside forward. Train it eagerly (torch.compiler.disable on the "
                "conv + CBN block), or use buffer_size=0 (BatchNorm) or eval mode."
            )
        if not torch.is_grad_enabled() or int(self.num_batches_tracked) <= self.burnin:
            return None
        weight = given if given is not None else preceding_conv_weight(input)
        if weight is not None:
            self._adopt(weight)
        if weight is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}({self.num_features}): its input is not the output of "
                "a convolution whose weight requires grad, so there is no weight to carry "
                "the statistics of earlier iterations over to; it normalizes with this "
                "batch's statistics (BatchNorm) until there is. Put it right after its "
                "nn.Conv2d, or call it as layer(x, conv.weight).",
                RuntimeWarning,
                stacklevel=3,
            )
        return weight

    def forward(self, input: Tensor, conv_weight: Tensor | None = None) -> Tensor:
        self._check_input(input)
        factor = self._momentum_factor()
        if self.training and not self.track_running_stats:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        weight = self._conv_weight(input, conv_weight)
        window = None
        if weight is not None:
            window = self._window(weight, acc_dtype(input.dtype))
        return NF.cross_iteration_batch_norm(
            input,
            *self._batch_norm_args(factor),
            conv_weight=weight,
            window=window,
            rho=self.rho,
            process_group=self._sync_group(),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, buffer_size={self.buffer_size}, burnin={self.burnin}, "
            f"rho={self.rho}"
        )
