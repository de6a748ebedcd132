"""BatchNorm1d/2d/3d (torch-exact semantics) and FrozenBatchNorm1d/2d/3d."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as NF
from .._core.checks import check_eps
from ._base import ByDims, NormBase, UpgradesStateDict, check_num_features
from ._kernel_options import options_repr, take_act_backend

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
]


class _BatchNorm(NormBase):
    r"""Batch normalization over (N, \*spatial) per channel (Ioffe & Szegedy, 2015).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    Behaves exactly like ``torch.nn.BatchNorm*d``:

    * ``train()`` with ``track_running_stats=True``: batch statistics (biased
      variance), and the running statistics are updated *inside forward* with
      the unbiased variance: ``running = (1 − momentum)·running + momentum·batch``;
      ``momentum=None`` is the cumulative average over ``num_batches_tracked``.
    * ``eval()`` with ``track_running_stats=True``: running statistics.
    * ``track_running_stats=False``: batch statistics in both modes (so eval
      depends on the batch and fails at one value per channel).
    * An empty batch in training (a rank with no samples) gives an empty output
      and zero gradients; it counts in ``num_batches_tracked`` but leaves the
      running statistics untouched.

    Accurate on off-center data (see :mod:`normlab._core.stats`).

    Args:
        num_features: C.
        eps: added to the variance: >= 0, and > 0 to train (torch's rule).
        momentum: weight of the new batch statistic, or None.
        affine: learn γ (``weight``) and β (``bias``).
        track_running_stats: keep ``running_mean``, ``running_var``,
            ``num_batches_tracked``.
        bias: with ``affine``, learn β too; ``bias=False`` leaves ``self.bias``
            None and out of the state_dict, as in torch.
        process_group: in training, compute the batch statistics over every
            process of this group: None (default) for no sync, ``"world"`` for the
            default group, or a ``torch.distributed.ProcessGroup``. A no-op on a
            single process; see :mod:`normlab.distributed`.

    Example::

        >>> bn = normlab.nn.BatchNorm2d(16)
        >>> y = bn(torch.randn(4, 16, 8, 8))
    """

    _eps_zero_ok = True

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = self._momentum_factor()
        return NF.batch_norm(
            input, *self._batch_norm_args(factor), process_group=self._sync_group()
        )


class BatchNorm1d(_BatchNorm, dims=1):
    pass


class BatchNorm2d(_BatchNorm, dims=2):
    pass


class BatchNorm3d(_BatchNorm, dims=3):
    pass


class _FrozenBatchNorm(ByDims, UpgradesStateDict):
    r"""BatchNorm with statistics and affine fixed forever.

    .. math:: y = (x - \mu_{\text{run}})\,\frac{\gamma}{\sqrt{\sigma^2_{\text{run}} + \epsilon}}
              + \beta

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are *buffers*, not
    parameters: no optimizer updates them and ``.train()`` changes nothing, so a
    frozen layer cannot silently un-freeze. A BatchNorm state_dict loads as is
    (``num_batches_tracked`` is ignored; a missing ``weight`` or ``bias``, from
    ``affine=False`` or ``bias=False``, loads as 1 or 0). Freshly built it is the exact identity
    (``running_var`` starts at the value that makes ``γ/sqrt(var + eps) == 1``).

    Args:
        num_features: C.
        eps: added to the variance, >= 0.
        act: None, ``"silu"`` or ``"relu"``: an activation applied after the affine
            map (fused into the one-pass kernel on the Triton backend).
        backend: ``"auto"`` (the Triton kernel for CUDA input when triton imports),
            ``"torch"`` or ``"triton"``; see :func:`normlab.functional.frozen_batch_norm`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
        act: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_num_features(name, num_features)
        check_eps(name, eps, zero_ok=True)
        take_act_backend(self, name, act, backend)
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Back to the exact identity map."""
        self.weight.fill_(1)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.copy_(_identity_var(self.eps, self.running_var))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return NF.frozen_batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            act=self.act,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + options_repr(self)

    def _upgrade_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        if prefix + "running_mean" in state_dict:  # a BatchNorm without weight or bias
            for key, value in (("weight", 1.0), ("bias", 0.0)):
                if prefix + key not in state_dict:
                    state_dict[prefix + key] = torch.full_like(getattr(self, key), value)


def _identity_var(eps: float, like: Tensor) -> Tensor:
    """The running_var for which ``rsqrt(var + eps) == 1`` exactly, in ``like``'s dtype.

    Exact for fp32 and fp64 buffers (statistics are applied in that precision);
    for half buffers the nearest representable value.
    """
    one = torch.ones((), dtype=like.dtype, device=like.device)
    v = one - eps
    for _ in range(64):  # a few ulp steps at most
        s = torch.rsqrt(v + eps)
        if bool(s == one):
            break
        v = torch.nextafter(v, v + 1 if bool(s > one) else v - 1)
    return v.expand_as(like)


class FrozenBatchNorm1d(_FrozenBatchNorm, dims=1):
    pass


class FrozenBatchNorm2d(_FrozenBatchNorm, dims=2):
    pass


class FrozenBatchNorm3d(_FrozenBatchNorm, dims=3):
    pass
