r"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), functional form.

BN at small batch sizes estimates its statistics from few samples. CBN pools them
with the statistics of the previous ``k`` iterations, which were computed under
older network weights; each is carried over to the current weights ``θ_t`` of the
preceding convolution by the first-order Taylor term. Per channel, at step ``t``::

    μ_t, v_t      mean and biased variance of this batch (``_core.stats``)
    ∂μ_t/∂θ, ∂v_t/∂θ   their gradients with respect to the convolution's weight
                  (plain autograd; stored with θ_t, μ_t, v_t in the window)
    for τ = 1..k (the filled entries, newest first):
        Δθ   = θ_t − θ_{t−τ}                          (no gradient, as the authors)
        δμ   = ρ·⟨∂μ_{t−τ}/∂θ, Δθ⟩,  δv = ρ·⟨∂v_{t−τ}/∂θ, Δθ⟩   (sum over the channel's
               weights: channel c's statistics depend on θ[c] only)
        μ̃_τ  = μ_{t−τ} + δμ
        ṽ_τ  = v_{t−τ} + δv − δμ²     (= ν̃_τ − μ̃_τ² with ν = E[x²], as the authors
               compensate ν; this form never subtracts two large second moments)
        entry τ counts where ṽ_τ ≥ 0 (the authors' code drops the others; the
               paper's text clamps ν̃ at μ̃² instead)
    K  = 1 + number of counted entries
    μ̄  = (μ_t + Σ μ̃_τ) / K
    σ̄² = (v_t + Σ ṽ_τ)/K + ((μ_t − μ̄)² + Σ (μ̃_τ − μ̄)²)/K    (= mean ν̃ − μ̄²)
    y  = γ·(x − μ̄)/sqrt(σ̄² + ε) + β

Gradients flow through ``μ_t`` and ``v_t`` only; the window entries are constants.
The running statistics are torch BatchNorm's, of this batch alone (mean, unbiased
variance, ``momentum``), as in the authors' code. ``∂v/∂θ = ∂ν/∂θ − 2μ·∂μ/∂θ``, so
storing the variance's gradient is the authors' second-moment gradient exactly.

With a process group the batch moments are the global batch's (merged by
:mod:`normlab._core.collectives`, as BN) and so are their gradients: every rank's
count-weighted gradients summed in one ``all_reduce``, using
``∂V/∂θ = Σ_r n_r(∂v_r/∂θ + 2(μ_r − μ)∂μ_r/∂θ)/N``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .._core.checks import (
    check_batch_count,
)
from .._core.collectives import (
    all_reduce_sum,
    check_global_count,
    local_moments,
    sync_moments,
)
from .._core.dispatch import Op, choose_path
from .._core.normalize import affine_normalize
from .._core.running import all_finite, guarded_copy_, note, update_running_stats
from .._core.stats import acc_dtype, centered, centered_moments, pivot, reduced_count
from .batch_norm import check_batch_norm_input, check_batch_norm_params

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["IterationWindow", "cross_iteration_batch_norm"]

_LAYER = "cross_iteration_batch_norm"


class IterationWindow(NamedTuple):
    """The previous iterations' statistics, newest first, updated in place.

    ``mean``, ``var``: (k, C); ``grad_mean``, ``grad_var``, ``conv_weight``: (k,
    \\*θ.shape); ``filled``: a 0-d integer tensor, the number of valid entries.
    """

    mean: Tensor
    var: Tensor
    grad_mean: Tensor
    grad_var: Tensor
    conv_weight: Tensor
    filled: Tensor

    @classmethod
    def empty(cls, size: int, conv_weight: Tensor, dtype: torch.dtype) -> IterationWindow:
        """A window of ``size`` entries for the statistics of ``conv_weight``'s output."""
        f = {"dtype": dtype, "device": conv_weight.device}
        stats = (size, conv_weight.shape[0])
        weights = (size, *conv_weight.shape)
        return cls(
            torch.zeros(stats, **f),
            torch.zeros(stats, **f),
            torch.zeros(weights, **f),
            torch.zeros(weights, **f),
            torch.zeros(weights, **f),
            torch.zeros((), dtype=torch.long, device=conv_weight.device),
        )


class _Batch(NamedTuple):
    mean: Tensor  # (C,) absolute, differentiable
    var: Tensor  # (C,) biased, differentiable
    count: Tensor | int  # values per channel (global with a group)
    group: ProcessGroup | None
    local: tuple[Tensor, Tensor, int] | None  # this rank's (mean, var, count) with a group


def _batch_moments(input: Tensor, group: ProcessGroup | None) -> _Batch:
    dims = (0, *range(2, input.dim()))
    acc = acc_dtype(input.dtype)
    shift = pivot(input, dims).to(acc)
    xc = centered(input, shift)
    if group is None:
        check_batch_count(_LAYER, input, reduced_count(input, dims))
        m = centered_moments(xc, dims, shift)
        return _Batch(m.mean.reshape(-1), m.var.reshape(-1), m.count, None, None)
    mean, var, count = local_moments(xc, dims)
    g = sync_moments(mean, var, count, shift, group)
    check_global_count(_LAYER, input.shape, count, g.count)
    local = ((mean + shift).reshape(-1), var.reshape(-1), count)
    return _Batch((g.mean + shift).reshape(-1), g.var.reshape(-1), g.count, group, local)


def _grad(stat: Tensor, conv_weight: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(stat.sum(), conv_weight, retain_graph=True, allow_unused=True)
    if g is None:
        raise ValueError(
            f"{_LAYER}: the input does not depend on conv_weight, so its statistics cannot "
            "be carried across iterations. Pass the weight of the convolution whose output "
            "this layer normalizes (or conv_weight=None for plain batch statistics)."
        )
    return g.detach()


def _moment_grads(batch: _Batch, conv_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``∂μ/∂θ`` and ``∂v/∂θ`` of a batch's per-channel moments, each of ``θ``'s shape.

    Channel c's moments depend on ``θ[c]`` only, so the gradient of their sum holds
    every channel's gradient in its own row (the authors' one backward per moment).
    For a synced batch, the global moments' gradients, merged from every rank's in
    one ``all_reduce`` (see the module doc).
    """
    if batch.local is None or batch.group is None:
        return _grad(batch.mean, conv_weight), _grad(batch.var, conv_weight)
    mean_r, var_r, n_r = batch.local
    gm, gv = _grad(mean_r, conv_weight), _grad(var_r, conv_weight)
    row = (-1, *([1] * (conv_weight.dim() - 1)))
    dev = (mean_r.detach() - batch.mean.detach()).reshape(row).to(gm.dtype)
    both = all_reduce_sum(torch.stack([gm, gv + 2.0 * dev * gm]) * float(n_r), batch.group)
    both = both / batch.count.to(both.dtype)  # type: ignore[union-attr]
    return both[0], both[1]


def _pooled(
    batch: _Batch, window: IterationWindow, theta: Tensor, rho: float
) -> tuple[Tensor, Tensor]:
    """(μ̄, σ̄²) over this batch and the window's counted entries (module doc)."""
    k = window.mean.shape[0]
    with torch.no_grad():
        dw = theta.detach().to(window.conv_weight.dtype).unsqueeze(0) - window.conv_weight
        red = tuple(range(2, dw.dim()))
        d_mu = rho * (window.grad_mean * dw).sum(red)
        d_var = rho * (window.grad_var * dw).sum(red)
        mu = window.mean + d_mu
        var = window.var + d_var - d_mu * d_mu
        filled = torch.arange(k, device=mu.device).unsqueeze(1) < window.filled
        counted = (filled & (var >= 0)).to(mu.dtype)
        mu, var = mu * counted, var * counted
    acc = window.mean.dtype
    mean_t, var_t = batch.mean.to(acc), batch.var.to(acc)
    n = 1.0 + counted.sum(0)
    mean = (mean_t + mu.sum(0)) / n
    spread = (mean_t - mean).square() + (counted * (mu - mean).square()).sum(0)
    return mean, ((var_t + var.sum(0) + spread) / n).clamp_min(0)


def _push(
    window: IterationWindow, batch: _Batch, grads: tuple[Tensor, Tensor], theta: Tensor
) -> None:
    """Push this batch's entry, newest first; a non-finite entry is not pushed."""
    with torch.no_grad():
        new = [
            v.detach().to(buf.dtype)
            for buf, v in zip(window[:5], (batch.mean, batch.var, *grads, theta), strict=True)
        ]
        ok = all_finite(*new)
        for buf, value in zip(window[:5], new, strict=True):
            guarded_copy_(buf, torch.cat([value.unsqueeze(0), buf[:-1]]), ok)
        window.filled.add_(ok.to(window.filled.dtype)).clamp_(max=window.mean.shape[0])
    note(ok)


def cross_iteration_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    conv_weight: Tensor | None = None,
    window: IterationWindow | None = None,
    rho: float = 1.0,
    backend: str = "auto",
    process_group: ProcessGroup | str | None = None,
) -> Tensor:
    r"""Cross-Iteration BN of (N, C, \*spatial): batch statistics pooled with ``window``'s.

    With ``training=False`` it is BN in eval (running statistics). In training
    without ``conv_weight`` or ``window`` (or with no gradient recorded) it is
    BN's training forward on this batch alone and the window is left as is;
    otherwise it pools, normalizes, updates the running statistics with this
    batch's and pushes this batch's entry into ``window`` (module doc).

    Args:
        input: the output of the convolution whose weight is ``conv_weight``.
        running_mean, running_var: (C,) buffers or None (torch's contract).
        weight, bias: γ, β of shape (C,) or None.
        momentum: weight of the new batch statistic in the running average.
        eps: added to the variance inside the square root (> 0 to train).
        conv_weight: θ_t, the convolution's weight (output channels first); the
            input must depend on it.
        window: the previous iterations (:class:`IterationWindow`), updated in place.
        rho: the factor of the Taylor term (the authors' ρ; 1 is the paper's CBN,
            0 pools uncompensated statistics).
        backend: "auto" or "torch" ("triton" raises: no kernel).
        process_group: in training, pool the global batch's statistics over this
            group (None: this process; ``"world"``: the default group).

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    group = check_batch_norm_input(_LAYER, input, eps, training, process_group)
    op = Op.CROSS_ITERATION_BATCH_NORM if training else Op.CROSS_ITERATION_BATCH_NORM_EVAL
    choose_path(op, input, backend, group)
    c = input.shape[1]
    var = check_batch_norm_params(_LAYER, input, weight, bias, running_mean, running_var, training)
    if not training:
        return affine_normalize(input, running_mean, var, weight, bias, eps)
    if input.numel() == 0:
        return affine_normalize(input, input.new_zeros(c), input.new_ones(c), weight, bias, eps)
    batch = _batch_moments(input, group)
    pool = conv_weight is not None and window is not None
    if pool:
        _check_window(window, conv_weight, c)  # type: ignore[arg-type]
    if pool and not (torch.is_grad_enabled() and batch.mean.requires_grad):
        pool = False  # nothing recorded to differentiate (no_grad, a frozen stem): plain BN
    if pool:
        if not conv_weight.requires_grad:  # type: ignore[union-attr]
            raise ValueError(
                f"{_LAYER}: conv_weight does not require grad, so the statistics' gradient "
                "with respect to it cannot be computed. Pass conv_weight=None for plain "
                "batch statistics (a frozen convolution does not change between iterations)."
            )
        grads = _moment_grads(batch, conv_weight)  # type: ignore[arg-type]
        mean, var = _pooled(batch, window, conv_weight, rho)  # type: ignore[arg-type]
    else:
        mean, var = batch.mean, batch.var
    y = affine_normalize(input, mean, var, weight, bias, eps)
    n = batch.count if isinstance(batch.count, int) else batch.count.to(batch.var.dtype)
    unbiased = batch.var.detach() * (n / (n - 1))
    update_running_stats(
        running_mean, running_var, batch.mean.detach(), unbiased, momentum, per_channel=False
    )
    if pool:
        _push(window, batch, grads, conv_weight)  # type: ignore[arg-type]
    return y


def _check_window(window: IterationWindow, conv_weight: Tensor, c: int) -> None:
    if conv_weight.shape[0] != c:
        raise ValueError(
            f"{_LAYER}: conv_weight has {conv_weight.shape[0]} output channels but the input "
            f"has {c}; pass the weight of the convolution that produced this input."
        )
    if tuple(window.conv_weight.shape[1:]) != tuple(conv_weight.shape):
        raise ValueError(
            f"{_LAYER}: the window holds statistics of a convolution with weight shape "
            f"{tuple(window.conv_weight.shape[1:])}, not {tuple(conv_weight.shape)}: one "
            "layer compensates one convolution. Use one CrossIterationBatchNorm per "
            "convolution (or reset its window)."
        )
