r"""Switchable Norm's mixing: IN, LN and BN moments from per-(n, c) moments, softmax-mixed.

Every implementation of Switchable Norm (the plain autograd path, the fused CPU
Function, the Triton kernels) reduces ``x`` once to per-(n, c) moments of
``x − s`` (``s`` a per-(n, c) pivot, an element of the group) and then calls
:func:`mix_moments` on those small tensors. It is written in torch ops, so plain
autograd differentiates it; the fused Function has a hand-derived adjoint of the
same formulas and reads the intermediates returned here.

Shapes: ``shift``, ``mu`` and ``var`` are (N, C) matrices or (N, C, 1, ...) with kept
spatial dims; every reduction is over dim 0 (BN: the samples) or dim 1 (LN: the
channels) with kept dims, so both layouts work.

The LN and BN moments are the *exact* moments of the union of the (n, c) groups
(law of total variance, :func:`normlab._core.stats.union_moments`), taken around
one pivot of the union (the first channel's for LN, the first sample's for BN):
differences of nearby pivots are exact, so every mean keeps its digits on
off-center data. Every returned mean is relative to its own group's pivot ``s``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .stats import rstd, union_moments

__all__ = [
    "BnMerge",
    "BnSource",
    "Mixed",
    "mix_moments",
    "mixed_scale",
    "switchable_norm_components",
]

BnSource = Literal["batch", "running", "none"]
"""Where the BN branch's moments come from: this batch, the running statistics, nowhere."""

BnMerge = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
"""``(mean relative to shift, biased var, shift) -> (mean relative to shift, var, mean)``:
turns one process's BN moments into the moments of a larger batch (the cross-process
merge of a synchronized layer); the third result is the absolute mean, for running
statistics."""


class Mixed(NamedTuple):
    """Result of :func:`mix_moments`; every tensor in the accumulation dtype.

    ``mean`` (mixed mean minus ``shift``) and ``var`` (mixed variance) have the
    shape of ``mu``. ``batch_mean`` (absolute) and ``batch_var`` (biased) are the BN
    branch's (1, C, ...) batch moments when ``bn="batch"``, for the running
    statistics, else None. The rest serve a hand-derived adjoint: the softmax
    weights ``wm``/``wv`` (K,), ``dev_ln``/``dev_bn`` (each group's mean minus its
    union's, relative to the union's pivot) and the (K, ...) stacks of the
    normalizers' means and variances, in the order of ``names``.
    """

    mean: Tensor
    var: Tensor
    batch_mean: Tensor | None
    batch_var: Tensor | None
    wm: Tensor
    wv: Tensor
    dev_ln: Tensor
    dev_bn: Tensor | None
    stack_m: Tensor
    stack_v: Tensor


def switchable_norm_components(rank: int, using_bn: bool = True) -> tuple[str, ...]:
    """The normalizers mixed for an input of ``rank`` dims, in the order of the logits.

    ``("in", "ln", "bn")`` for (N, C, \\*spatial) input, ``("ln", "bn")`` for (N, C)
    (an instance of one value has no statistics); without ``"bn"`` when ``using_bn=False``.
    """
    names = ("in", "ln", "bn") if rank >= 3 else ("ln", "bn")
    return names if using_bn else names[:-1]


def _identity_merge(mean: Tensor, var: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return mean, var, mean + shift


def mix_moments(
    shift: Tensor,
    mu: Tensor,
    var: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    names: tuple[str, ...],
    bn: BnSource,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    merge: BnMerge | None = None,
) -> Mixed:
    """Mix the IN/LN/BN moments of per-(n, c) moments with softmax weights.

    Args:
        shift: per-(n, c) pivots, (N, C) or (N, C, 1, ...), accumulation dtype.
        mu: per-(n, c) mean of ``x − shift``; same shape.
        var: per-(n, c) biased variance; same shape.
        mean_weight, var_weight: (K,) logits in the order of ``names``.
        names: the mixed normalizers, a subsequence of ``("in", "ln", "bn")``.
        bn: source of the BN moments (ignored unless ``"bn" in names``).
        running_mean, running_var: (C,) running statistics, read when ``bn="running"``.
        merge: with ``bn="batch"``, merges this process's BN moments with other
            processes' (:data:`BnMerge`); None keeps them local. With a merge, an
            empty batch (N = 0) contributes zero moments that stay in the graph.

    Returns:
        :class:`Mixed`.
    """
    if "bn" in names and bn not in ("batch", "running"):
        raise ValueError(
            f"mix_moments: names include 'bn', so bn must be 'batch' or 'running', got {bn!r}."
        )
    acc = mu.dtype
    wm = torch.softmax(mean_weight if mean_weight.dtype == acc else mean_weight.to(acc), 0)
    wv = torch.softmax(var_weight if var_weight.dtype == acc else var_weight.to(acc), 0)
    d_ln = shift - shift[:, :1]
    mu_ln, var_ln, dev_ln = union_moments(mu + d_ln, var, 1)
    means = {"in": mu, "ln": mu_ln - d_ln}
    variances = {"in": var, "ln": var_ln}
    batch_mean = batch_var = dev_bn = None
    if "bn" in names and bn == "batch":
        n, c = mu.shape[:2]
        stat_shape = (1, c, *mu.shape[2:])
        if n > 0:
            shift_bn = shift[:1]
            d_bn = shift - shift_bn
            mu_bn, var_bn, dev_bn = union_moments(mu + d_bn, var, 0)
        else:  # an empty process in a merged batch: zeros, still in the graph
            shift_bn = torch.zeros(stat_shape, dtype=acc, device=mu.device)
            d_bn = shift - shift_bn
            mu_bn = var_bn = mu.sum(0, keepdim=True)
        mu_bn, var_bn, batch_mean = (merge or _identity_merge)(mu_bn, var_bn, shift_bn)
        means["bn"], variances["bn"], batch_var = mu_bn - d_bn, var_bn, var_bn
    elif "bn" in names and bn == "running":
        if running_mean is None or running_var is None:
            raise ValueError("mix_moments: bn='running' needs running_mean and running_var.")
        stat_shape = (1, -1, *([1] * (mu.dim() - 2)))
        means["bn"] = running_mean.to(acc).reshape(stat_shape) - shift
        variances["bn"] = running_var.to(acc).reshape(stat_shape)
    # One (K, ...) stack per moment: the mix is one product and one sum over K.
    stack_m = torch.stack([means[k].expand_as(mu) for k in names])
    stack_v = torch.stack([variances[k].expand_as(mu) for k in names])
    k_shape = (-1, *([1] * mu.dim()))
    mean = (wm.reshape(k_shape) * stack_m).sum(0)
    mixed_var = (wv.reshape(k_shape) * stack_v).sum(0)
    return Mixed(mean, mixed_var, batch_mean, batch_var, wm, wv, dev_ln, dev_bn, stack_m, stack_v)


def mixed_scale(var: Tensor, eps: float, weight: Tensor | None) -> Tensor:
    """``γ / sqrt(max(var, 0) + eps)`` with ``γ`` (C,) broadcast on dim 1 of ``var``."""
    scale = rstd(var, eps)
    if weight is None:
        return scale
    w = weight if weight.dtype == var.dtype else weight.to(var.dtype)
    return scale * w.reshape(1, -1, *([1] * (var.dim() - 2)))
