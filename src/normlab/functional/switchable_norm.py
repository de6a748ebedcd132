"""Switchable normalization (Luo et al., 2018, arXiv 1806.10779)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._core.checks import (
    check_batch_count,
    check_floating,
    check_norm_input,
    check_params,
    stored_variance,
)
from .._core.collectives import check_global_count, resolve_process_group, sync_moments
from .._core.dispatch import Op, Path, choose_path
from .._core.mixing import (
    BnMerge,
    BnSource,
    mix_moments,
    mixed_scale,
    switchable_norm_components,
)
from .._core.running import update_running_stats
from .._core.stats import acc_dtype, centered, centered_moments, pivot, reduced_count
from ._sn_autograd import SwitchableNormFunction

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["switchable_norm", "switchable_norm_components"]


def switchable_norm(
    input: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    using_bn: bool = True,
    backend: str = "auto",
    process_group: ProcessGroup | str | None = None,
) -> Tensor:
    r"""Switchable normalization: a learned mix of IN, LN and BN statistics.

    .. math::
        y = \gamma\,\frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}} + \beta,
        \qquad w = \mathrm{softmax}(\lambda),\; w' = \mathrm{softmax}(\lambda')

    with k over IN (per sample and channel, over \*spatial), LN (per sample, over
    C and \*spatial) and BN (per channel, over N and \*spatial). For (N, C) input
    only LN and BN are mixed.

    **Statistics.** One reduction over ``x`` gives the per-(n, c) biased moments
    of ``x`` minus a per-(n, c) pivot (one sample of the group, see
    :mod:`normlab._core.stats`); the LN and BN moments are then the *exact*
    moments of the union of those groups (law of total variance,
    :func:`~normlab._core.mixing.mix_moments`). Unlike the paper's
    code, nothing divides by ``count − 1``, so H·W = 1 is fine (the IN variance
    is 0). Every mean is kept relative to the pivot, so fp32 data with mean 1e4
    and std 1e-2 keep their digits. One more pass normalizes.

    **Implementation** (chosen by :func:`normlab._core.dispatch.choose_path`).
    On CUDA the Triton kernels of :mod:`normlab.kernels`. In eager CPU mode one
    autograd.Function (:mod:`normlab.functional._sn_autograd`) with a hand-derived backward: the
    input is read by one statistics pass and written by one in-place apply
    pass, the backward takes two reductions (``Σdy``, ``Σdy·u`` per (n, c)) and
    one pass, and only ``x`` plus (N, C)-sized statistics are saved for
    backward. Under ``torch.compile``/``torch.export``, ``torch.jit.trace``,
    ``torch.func`` transforms and forward-mode AD, for tensor subclasses, with a
    ``process_group``, and for a double backward (``create_graph=True``), the
    same math runs as plain autograd ops.

    **BN branch.** With ``training=True`` it uses the batch moments and, where
    ``running_mean`` / ``running_var`` are given, updates them in place with
    torch's convention: ``running = (1 − momentum)·running + momentum·batch``
    with the *unbiased* batch variance (n/(n − 1), n = N·\*spatial). The paper's
    code writes the reverse (``running = m·running + (1 − m)·batch``, m = 0.9 or
    0.997): its m is our ``1 − momentum``. With ``training=False`` the BN moments
    are the running statistics, while IN and LN stay per sample.

    Args:
        input: (N, C) or (N, C, \*spatial), floating point.
        mean_weight, var_weight: importance *logits* λ, λ' (softmaxed here), shape
            (K,) in the order of :func:`switchable_norm_components`: (IN, LN, BN)
            for rank >= 3, (LN, BN) for rank 2; (IN, LN) / (LN,) with
            ``using_bn=False``.
        weight, bias: per-channel γ, β of shape (C,), or None.
        running_mean, running_var: (C,) BN running statistics, or None.
        training: BN branch from batch statistics (True) or running ones (False).
        momentum: weight of the new batch statistic in the running average.
        eps: added to the mixed variance inside the square root, > 0.
        using_bn: mix in the BN statistics at all.
        backend: "auto" | "torch" | "triton".
        process_group: with ``training=True``, the BN branch's moments are those
            of every process of this group (None: this process only; ``"world"``:
            the default group); IN and LN stay per sample. See
            :mod:`normlab.distributed`.

    Returns:
        Tensor of the input's shape and dtype (statistics in fp32 for half input).

    Example::

        >>> x = torch.randn(2, 8, 5, 5)
        >>> logits = torch.zeros(3)  # uniform mixture of IN, LN, BN
        >>> y = normlab.functional.switchable_norm(x, logits, logits)
    """
    layer = "switchable_norm"
    check_norm_input(layer, input, eps, 2, "an (N, C) or (N, C, *spatial) input")
    bn_from_batch = using_bn and training
    group = resolve_process_group(process_group) if bn_from_batch else None
    # The fused Function reads running statistics as constants (no gradient).
    path = choose_path(
        Op.SWITCHABLE_NORM, input, backend, group, mean_weight, var_weight, weight, bias,
        constants=(running_mean, running_var),
    )  # fmt: skip
    n, c = input.shape[:2]
    check_params(
        layer, (c,), weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    names = switchable_norm_components(input.dim(), using_bn)
    for name, logits in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if tuple(logits.shape) != (len(names),):
            raise ValueError(
                f"{layer}: {name} has shape {tuple(logits.shape)}, expected ({len(names)},): "
                f"one logit per normalizer ({', '.join(n.upper() for n in names)}) for a "
                f"{input.dim()}-D input with using_bn={using_bn}."
            )
        check_floating(f"{layer} ({name})", logits)
    if not using_bn and (running_mean is not None or running_var is not None):
        raise ValueError(
            f"{layer}: running statistics belong to the BN branch, but using_bn=False; "
            "pass running_mean=None and running_var=None, or set using_bn=True."
        )
    if using_bn and not training and (running_mean is None or running_var is None):
        raise ValueError(
            f"{layer}: training=False takes the BN statistics from running_mean and "
            "running_var, which were not given; pass them, or training=True to use the "
            "batch statistics."
        )
    if using_bn and not training and running_var is not None:
        running_var = stored_variance(layer, running_var)

    if path is Path.TRITON:
        from ..kernels import fused_switchable_norm

        return fused_switchable_norm(
            input, mean_weight, var_weight, weight, bias,
            running_mean=running_mean, running_var=running_var, training=training,
            momentum=momentum, eps=eps, using_bn=using_bn,
        )  # fmt: skip
    if group is None and bn_from_batch:
        check_batch_count(layer, input, input.numel() // max(c, 1))
    if path is Path.AUTOGRAD:
        return _switchable_norm_autograd(
            input, mean_weight, var_weight, weight, bias, running_mean, running_var,
            training, momentum, eps, using_bn, group,
        )  # fmt: skip

    # The fused Function (one statistics pass, one apply pass, hand-derived
    # backward; see normlab.functional._sn_autograd). (N, C) is treated as
    # (N, C, 1): per-(n, c) "instances" of one value.
    flat = input.dim() == 2
    x = input.unsqueeze(-1) if flat else input
    bn_mode = ("batch" if training else "running") if using_bn else "none"

    def recompute(x, mean_weight, var_weight, weight, bias, running_mean, running_var):
        # The plain autograd graph of the same call, for a double backward.
        y = _switchable_norm_autograd(
            x.squeeze(-1) if flat else x, mean_weight, var_weight, weight, bias,
            running_mean, running_var, training, 0.0, eps, using_bn, None,
        )  # fmt: skip
        return y.unsqueeze(-1) if flat else y

    y = SwitchableNormFunction.apply(
        x, mean_weight, var_weight, weight, bias, running_mean, running_var, names, bn_mode,
        momentum, eps, recompute,
    )  # fmt: skip
    return y.squeeze(-1) if flat else y


def _switchable_norm_autograd(
    input: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    using_bn: bool,
    group: ProcessGroup | None,
) -> Tensor:
    """:func:`switchable_norm` in plain autograd ops, for inputs already validated.

    The path for ``torch.compile``/export/``torch.func``, for a synchronised BN
    branch (``group``), and the graph that a double backward through the fused
    Function differentiates. Same statistics, same mixing, same values.
    """
    layer = "switchable_norm"
    n, c = input.shape[:2]
    names = switchable_norm_components(input.dim(), using_bn)
    # (N, C) is treated as (N, C, 1): per-(n, c) "instances" of one value.
    x = input if input.dim() > 2 else input.unsqueeze(-1)
    spatial = tuple(range(2, x.dim()))
    hw = x.numel() // max(n * c, 1)
    bn_from_batch = using_bn and training
    if group is not None:
        hw = reduced_count(x, tuple(range(2, x.dim())))  # also right for N = 0
    elif bn_from_batch:
        check_batch_count(layer, input, n * hw)

    acc = acc_dtype(x.dtype)
    shift = pivot(x, spatial).to(acc)  # (N, C, 1...), detached
    xc = centered(x, shift)
    # The one reduction pass: biased moments of x − shift per (n, c). A zero shift
    # keeps the returned mean relative to the pivot instead of adding it back.
    inst = centered_moments(xc, spatial, torch.zeros((), dtype=acc, device=x.device))
    bn: BnSource = ("batch" if training else "running") if using_bn else "none"
    totals: list[Tensor] = []  # the merged batch's count, when synchronized
    merge: BnMerge | None = None
    if bn_from_batch and group is not None:
        merge = _group_merge(layer, input.shape, n * hw, group, totals)
    mix = mix_moments(
        shift, inst.mean, inst.var, mean_weight, var_weight, names, bn,
        running_mean, running_var, merge,
    )  # fmt: skip
    if bn_from_batch and (running_mean is not None or running_var is not None):
        assert mix.batch_mean is not None and mix.batch_var is not None
        with torch.no_grad():
            count = n * hw
            ratio = (totals[0] / (totals[0] - 1)).to(acc) if totals else count / (count - 1)
            unbiased = mix.batch_var * ratio
            update_running_stats(running_mean, running_var, mix.batch_mean, unbiased, momentum)
    mean, var = mix.mean, mix.var

    scale = mixed_scale(var, eps, weight)  # (N, C, 1...)
    param_shape = [1, c] + [1] * len(spatial)
    xn = xc - mean
    if bias is not None:
        y = torch.addcmul(bias.to(acc).reshape(param_shape), xn, scale)
    else:
        y = xn * scale
    y = y.to(input.dtype)
    return y if input.dim() > 2 else y.squeeze(-1)


def _group_merge(
    layer: str, shape: torch.Size, count: int, group: ProcessGroup, totals: list[Tensor]
) -> BnMerge:
    """The BN branch's cross-process merge over ``group``; appends the global count to
    ``totals`` (for the running-variance correction) and refuses a global count <= 1."""

    def merge(mean: Tensor, var: Tensor, shift_bn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g = sync_moments(mean, var, count, shift_bn, group)
        check_global_count(layer, shape, count, g.count)
        totals.append(g.count)
        return g.mean, g.var, g.mean_abs

    return merge
