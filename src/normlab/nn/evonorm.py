"""EvoNormB0_2d and EvoNormS0_2d (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as NF
from .._core.checks import (
    check_batch_count,
    check_eps,
    check_groups,
)
from .._core.collectives import sync_active
from .._core.stats import reduced_count
from ._base import ByDims, NormBase, add_affine, check_num_features, reset_affine

__all__ = ["EvoNormB0_2d", "EvoNormS0_2d"]


class EvoNormB0_2d(NormBase):
    r"""EvoNorm-B0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020).

    .. math:: y = \frac{x}{\max\!\big(\sqrt{\sigma^2_{B,c} + \epsilon},\;
              v_c x + \sqrt{\sigma^2_{I,n,c} + \epsilon}\big)}\,\gamma_c + \beta_c

    A normalization and activation in one layer; no mean is subtracted. ``σ²_B``
    is the biased variance over (N, H, W) per channel in training and
    ``running_var`` in eval; ``σ²_I`` is the biased variance over (H, W) of each
    (sample, channel), always from the input. ``running_var`` follows torch's
    BatchNorm convention: updated inside ``forward`` with the *unbiased* batch
    variance, ``running = (1 − momentum)·running + momentum·batch``,
    ``momentum=None`` the cumulative average over ``num_batches_tracked``. With
    ``track_running_stats=False`` the batch variance is used in eval too. There is
    no ``running_mean`` (B0 never uses a mean).

    Args:
        num_features: C.
        eps: added to both variances, > 0.
        momentum: weight of the new batch variance, or None.
        affine: learn γ (``weight``, init 1) and β (``bias``, init 0).
        track_running_stats: keep ``running_var`` and ``num_batches_tracked``.
        process_group: in training, compute the batch variance over every
            process of this group: None (default) for no sync, ``"world"`` for the
            default group, or a ``torch.distributed.ProcessGroup``. A no-op on a
            single process; see :mod:`normlab.distributed`.

    Parameters: ``v`` (C,), initialised to 1.

    Shape: (N, C, H, W); training needs N·H·W > 1.

    Example::

        >>> layer = normlab.nn.EvoNormB0_2d(16)
        >>> y = layer(torch.randn(4, 16, 8, 8))
    """

    # Its checkpoints have always held num_batches_tracked: no older format to upgrade.
    _version = 1
    _ranks = (4,)
    _layout = "(N, C, H, W)"

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
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, process_group
        )
        del self.running_mean  # B0 uses no mean
        self.v = nn.Parameter(torch.ones(self.num_features, device=device, dtype=dtype))
        # v first, as in the state_dict of every EvoNormB0_2d checkpoint.
        for name in ("weight", "bias"):
            self._parameters[name] = self._parameters.pop(name)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "v" in self._parameters:  # the base constructor calls this before v exists
            nn.init.ones_(self.v)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        use_batch = self.training or not self.track_running_stats
        group = self._sync_group()
        if use_batch and not sync_active(group):  # synced: the global count is checked
            # Refuse a one-value batch before num_batches_tracked moves.
            check_batch_count(type(self).__name__, input, reduced_count(input, (0, 2, 3)))
        factor = self._momentum_factor()
        return NF.evonorm_b0(
            input,
            self.running_var,
            self.v,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
            process_group=group,
        )


class EvoNormS0_2d(ByDims, nn.Module):
    r"""EvoNorm-S0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020).

    .. math:: y = \frac{x\,\operatorname{sigmoid}(v_c x)}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}}
              \,\gamma_c + \beta_c

    A swish divided by the group standard deviation: ``σ²`` is the biased
    variance over (C/G, H, W) of each (sample, group), as in GroupNorm. No mean
    is subtracted from ``x``. Batch-independent: the same in train and eval,
    exact at batch 1. Groups are chosen like GroupNorm's (G must divide C;
    ``normlab.registry.create_norm("evonorm_s0", C)`` picks 32 or the largest
    divisor below it).

    Args:
        num_features: C.
        groups: G, must divide C (the paper: 32).
        eps: added to the group variance, > 0.
        affine: learn γ (``weight``, init 1) and β (``bias``, init 0).

    Parameters: ``v`` (C,), initialised to 1.

    Shape: (N, C, H, W), any memory format.

    Example::

        >>> layer = normlab.nn.EvoNormS0_2d(64, groups=32)
        >>> y = layer(torch.randn(2, 64, 8, 8))
    """

    _ranks = (4,)
    _layout = "(N, C, H, W)"

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_features = check_num_features(name, num_features)
        check_groups(name, self.num_features, groups, "groups")
        check_eps(name, eps)
        factory = {"device": device, "dtype": dtype}
        self.groups = int(groups)
        self.eps = float(eps)
        self.affine = affine
        c = self.num_features
        self.v = nn.Parameter(torch.empty(c, **factory))
        add_affine(self, c, affine, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.v)
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return NF.evonorm_s0(input, self.groups, self.v, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, affine={self.affine}"
