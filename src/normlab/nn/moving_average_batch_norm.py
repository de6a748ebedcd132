"""MovingAverageBatchNorm1d/2d/3d (Yan et al., ICLR 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as NF
from ..functional.moving_average_batch_norm import check_mabn_options
from ._base import NormBase

__all__ = [
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
]


class _MovingAverageBatchNorm(NormBase):
    r"""Moving Average Batch Normalization: BN that trains at batch size 1 to 2.

    .. math:: y = \gamma\, r\, \frac{x}{\sqrt{\chi_{SMA} + \epsilon}} + \beta,
              \qquad \chi_B = \mathrm{E}_{N,S}[x^2]

    From "Towards Stabilizing Batch Statistics in Backward Propagation of Batch
    Normalization" (Yan et al., ICLR 2020). BN's backward depends on batch
    statistics too; MABN drops the mean (use :class:`CenteredConv2d` before it)
    and replaces the two statistics left, the forward ``χ = E[x²]`` and the
    backward ``ψ = E[g·x̂]``, by their simple moving averages over the last
    ``window`` training steps:

    * forward: ``x̂ = x / sqrt(χ_SMA + ε)``, ``y = γ·r·x̂ + β`` with the clipped
      renormalization ratio ``r = sqrt(χ_SMA + ε) / sqrt(χ_EMA + ε)`` ∈
      ``[1/r_clip, r_clip]`` (``r·x̂`` is then what eval computes);
    * backward: ``∂L/∂x = (g − x̂·ψ_SMA) / sqrt(χ_SMA + ε)`` with ``g = γ·r·∂L/∂y``;
    * the first ``warmup_iters`` steps are plain mean-free BN (batch ``χ`` and
      ``ψ``, ``r = 1``; ``r`` may stay 1 longer, ``r_warmup_iters``); the
      windows fill meanwhile;
    * eval: ``y = γ·x / sqrt(running_var + ε) + β``.

    ``running_var`` is the EMA of the normalizing ``χ`` (a second moment about 0,
    not a variance; no Bessel correction), updated in forward with torch's
    convention: ``momentum`` is the weight of the new value. The default 0.1
    is BatchNorm's, not the paper's: the authors weight the *old* value by
    ``α = 0.98``, i.e. ``momentum=0.02``.

    The authors' schedule differs from the defaults: their ``MABN2d(C, B,
    real_B, momentum=α, warmup_iters=W)`` switches to the moving averages one
    step earlier (step W counted from 1, once its window is full) and starts
    ``r`` at step max(1000, W) + 1. For W − 1 ≥ real_B // B it is exactly
    ``MovingAverageBatchNorm2d(C, momentum=1 − α, window=real_B // B,
    warmup_iters=W − 1, r_warmup_iters=max(1000, W))``.
    Full algorithm: :mod:`normlab.functional.moving_average_batch_norm`.

    Works at any batch size: one value per channel (``N·H·W ≥ 1``) is a valid
    second moment. No host synchronisation per step, and all state lives in
    buffers, so ``state_dict()`` → ``load_state_dict()`` resumes training
    bit-identically:

    * ``running_var`` (C,), ``num_batches_tracked`` () — the step ``t``; the χ
      window's write slot is ``t % window`` and its filled count ``min(t, window)``;
    * ``chi_window`` (window, C), ``psi_window`` (window, C) — the ring buffers;
    * ``psi_filled`` () — slots of ``psi_window`` written so far (ψ is written
      in backward, which a training forward may not be followed by).

    Args:
        num_features: C.
        eps: added to ``χ`` inside the square root, > 0.
        momentum: weight of the new statistic in ``running_var`` (or None for a
            cumulative average).
        window: m, the length of the simple moving averages (>= 1; the paper: 16).
        warmup_iters: steps of plain mean-free BN before the moving averages
            and renormalization start (>= 0; the paper's code: 100).
        r_clip: after warm-up ``r`` is clipped to ``[1/r_clip, r_clip]`` (>= 1;
            the paper: 5). ``r_clip=1`` turns renormalization off.
        r_warmup_iters: steps with ``r = 1`` (>= 0); None (default): the same
            as ``warmup_iters``. The authors' code: max(1000, warmup).
        affine: learn γ (``weight``) and β (``bias``).
        process_group: in training, compute χ (forward) and ψ (backward) over
            every process of this group: None (default) for no sync, ``"world"``
            for the default group, or a ``torch.distributed.ProcessGroup``. A
            no-op on a single process; see :mod:`normlab.distributed`.

    Shape:
        Input (N, C) or (N, C, L) for 1d, (N, C, H, W) for 2d, (N, C, D, H, W)
        for 3d; output the same.

    Example::

        >>> block = torch.nn.Sequential(
        ...     normlab.nn.CenteredConv2d(3, 16, 3, padding=1, bias=False),
        ...     normlab.nn.MovingAverageBatchNorm2d(16),
        ...     torch.nn.ReLU(),
        ... )
        >>> y = block(torch.randn(2, 3, 32, 32))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        window: int = 16,
        warmup_iters: int = 100,
        r_clip: float = 5.0,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        process_group: Any = None,
        *,
        r_warmup_iters: int | None = None,
    ) -> None:
        name = type(self).__name__
        check_mabn_options(name, window, warmup_iters, r_clip, momentum, r_warmup_iters)
        # The base registers running_mean/running_var together; MABN has no mean,
        # so it takes neither and registers its own state below.
        super().__init__(num_features, eps, momentum, affine, False, device, dtype, process_group)
        self.track_running_stats = True
        self.window = int(window)
        self.warmup_iters = int(warmup_iters)
        self.r_clip = float(r_clip)
        self.r_warmup_iters = None if r_warmup_iters is None else int(r_warmup_iters)
        factory = {"device": device, "dtype": dtype}
        del self.running_mean
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.register_buffer("chi_window", torch.zeros(self.window, num_features, **factory))
        self.register_buffer("psi_window", torch.zeros(self.window, num_features, **factory))
        self.register_buffer("psi_filled", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        # The base constructor calls this before the buffers below exist.
        if "chi_window" not in self._buffers:
            return
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self.chi_window.zero_()
        self.psi_window.zero_()
        self.psi_filled.zero_()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return NF.moving_average_batch_norm(
            input,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
            chi_window=self.chi_window,
            psi_window=self.psi_window,
            psi_filled=self.psi_filled,
            num_batches_tracked=self.num_batches_tracked,
            warmup_iters=self.warmup_iters,
            r_clip=self.r_clip,
            r_warmup_iters=self.r_warmup_iters,
            process_group=self._sync_group(),
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"window={self.window}, warmup_iters={self.warmup_iters}, r_clip={self.r_clip}, "
            f"affine={self.affine}"
        )
        if self.r_warmup_iters is not None:
            s += f", r_warmup_iters={self.r_warmup_iters}"
        return s


class MovingAverageBatchNorm1d(_MovingAverageBatchNorm, dims=1):
    pass


class MovingAverageBatchNorm2d(_MovingAverageBatchNorm, dims=2):
    pass


class MovingAverageBatchNorm3d(_MovingAverageBatchNorm, dims=3):
    pass
