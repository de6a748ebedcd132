"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._core.checks import (
    check_batch_count,
    check_groups,
    check_norm_input,
    check_params,
    stored_variance,
)
from .._core.collectives import check_global_count, group_moments, resolve_process_group
from .._core.dispatch import Op, Path, choose_path
from .._core.normalize import channel_shape
from .._core.running import update_running_stats
from .._core.stats import acc_dtype, centered, moments, pivot, reduced_count
from ._evonorm_autograd import b0_apply, b0_normalize, s0_apply, s0_composite

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["evonorm_b0", "evonorm_s0"]


def evonorm_b0(
    input: Tensor,
    running_var: Tensor | None,
    v: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    process_group: ProcessGroup | str | None = None,
) -> Tensor:
    r"""EvoNorm-B0: a batch-dependent norm-activation layer.

    .. math:: y = \frac{x}{\max\!\big(\sqrt{\sigma^2_{B,c} + \epsilon},\;
              v_c x + \sqrt{\sigma^2_{I,n,c} + \epsilon}\big)}\,\gamma_c + \beta_c

    ``σ²_B`` is the biased variance over (N, \*spatial) per channel (training), or
    ``running_var`` (eval); ``σ²_I`` the biased variance over \*spatial per
    (sample, channel), always from the input. No mean is subtracted from ``x``.
    In training, where ``running_var`` is given it is updated in place with
    torch's convention (unbiased batch variance, ``momentum`` the weight of the
    new value). The gradient of the max goes to the larger side (ties: the batch
    side).

    In eager CPU training an autograd.Function with a hand-derived backward keeps only
    ``input`` (plus per-(sample, channel) statistics) for backward; under
    ``torch.compile``, ``torch.func``, forward-mode AD and with a process group
    the same math runs as plain differentiable ops (see
    ``normlab.functional._evonorm_autograd``).

    Args:
        input: (N, C, \*spatial), at least one spatial dim.
        running_var: (C,) or None (required when ``training=False``).
        v: (C,) the learned coefficient of ``x`` in the instance branch.
        weight, bias: (C,) or None.
        training: batch variance (and update ``running_var``) or running variance.
        momentum: weight of the new batch variance in the running average.
        eps: > 0, added to both variances.
        process_group: with ``training=True``, ``σ²_B`` is the variance over every
            process of this group (None: this process only; ``"world"``: the
            default group); see :mod:`normlab.distributed`.
    """
    layer = "evonorm_b0"
    check_norm_input(layer, input, eps, 3)
    group = resolve_process_group(process_group) if training else None
    # The fused Function gives running_var no gradient: one that asks for it keeps
    # the composite.
    path = choose_path(
        Op.EVONORM_B0, input, backend, group, v, weight, bias, constants=(running_var,)
    )
    c = input.shape[1]
    check_params(layer, (c,), v=v, weight=weight, bias=bias, running_var=running_var)
    if v is None:
        raise ValueError(f"{layer}: v (shape ({c},)) is required.")
    if path is Path.FUSED:
        # Eager: an autograd.Function that saves only the input (see _evonorm_autograd).
        if training:
            check_batch_count(layer, input, reduced_count(input, (0, *range(2, input.dim()))))
        elif running_var is None:
            _missing_running_var(layer)
        else:
            running_var = stored_variance(layer, running_var)
        return b0_apply(input, running_var, v, weight, bias, training, momentum, eps)
    acc = acc_dtype(input.dtype)
    shape = channel_shape(input)
    spatial = tuple(range(2, input.dim()))
    if group is not None:  # one all_gather here, one all_reduce in backward
        dims = (0, *spatial)
        shift = pivot(input, dims).to(acc)
        g, local_count = group_moments(centered(input, shift), dims, shift, group)
        check_global_count(layer, input.shape, local_count, g.count)
        batch_var = g.var
        if running_var is not None:
            unbiased = g.var.detach() * (g.count / (g.count - 1)).to(acc)
            update_running_stats(None, running_var, g.mean_abs, unbiased, momentum)
    elif training:
        dims = (0, *spatial)
        check_batch_count(layer, input, reduced_count(input, dims))
        mb = moments(input, dims)
        batch_var = mb.var
        if running_var is not None:
            n = mb.count
            update_running_stats(None, running_var, mb.mean, mb.var * (n / (n - 1)), momentum)
    else:
        if running_var is None:
            _missing_running_var(layer)
        batch_var = stored_variance(layer, running_var).to(acc).reshape(shape)
    batch_std = torch.sqrt(batch_var.clamp_min(0) + eps)
    return b0_normalize(input, batch_std, v, weight, bias, eps)


def _missing_running_var(layer: str) -> None:
    raise ValueError(
        f"{layer}: training=False needs running_var; pass training=True to use the batch variance."
    )


def evonorm_s0(
    input: Tensor,
    num_groups: int,
    v: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""EvoNorm-S0: a batch-independent norm-activation layer (a swish over a group std).

    .. math:: y = \frac{x\,\operatorname{sigmoid}(v_c x)}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}}
              \,\gamma_c + \beta_c

    ``σ²`` is the biased variance over (C/G, \*spatial) per (sample, group), as
    in GroupNorm; it is assembled exactly from per-(sample, channel) moments
    (law of total variance), so it is stable on off-center data and any memory
    format. No mean is subtracted from ``x``. Same in train and eval.

    In eager CPU training an autograd.Function with a hand-derived backward keeps only
    ``input`` (plus per-(sample, channel) statistics) for backward; under
    ``torch.compile``, ``torch.func`` and forward-mode AD the same math runs as
    plain differentiable ops (see ``normlab.functional._evonorm_autograd``).

    Args:
        input: (N, C, \*spatial), at least one spatial dim.
        num_groups: G, must divide C.
        v: (C,) the swish coefficient.
        weight, bias: (C,) or None.
        eps: > 0, added to the group variance.
    """
    layer = "evonorm_s0"
    check_norm_input(layer, input, eps, 3)
    path = choose_path(Op.EVONORM_S0, input, backend, None, v, weight, bias)
    c = input.shape[1]
    check_groups(layer, c, num_groups)
    check_params(layer, (c,), v=v, weight=weight, bias=bias)
    if v is None:
        raise ValueError(f"{layer}: v (shape ({c},)) is required.")
    if path is Path.FUSED:
        # Eager: an autograd.Function that saves only the input (see _evonorm_autograd).
        return s0_apply(input, num_groups, v, weight, bias, eps)
    return s0_composite(input, num_groups, v, weight, bias, eps)
