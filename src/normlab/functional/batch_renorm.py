"""Batch Renormalization (Ioffe, NeurIPS 2017)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._core.checks import (
    check_batch_count,
    check_norm_input,
    check_params,
    host_checks_allowed,
    stored_variance,
)
from .._core.collectives import check_global_count, group_moments, resolve_process_group
from .._core.dispatch import Op, Path, choose_path
from .._core.normalize import affine_normalize, channel_shape
from .._core.running import snapshot, update_running_stats
from .._core.stats import acc_dtype, centered, centered_moments, pivot, reduced_count
from ._brn_autograd import BatchRenormFunction

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["batch_renorm", "batch_renorm_limits"]


def _check_limit(layer: str, name: str, value: float | Tensor, low: float) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{layer}: {name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}."
            )
        if not host_checks_allowed(value):  # device, torch.compile or torch.func
            return
        value = float(value)
    if not value >= low:
        raise ValueError(
            f"{layer}: {name} must be >= {low}, got {value}. r is clipped to "
            "[1/r_max, r_max] and d to [-d_max, d_max]; r_max=1, d_max=0 is plain BatchNorm."
        )


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    *,
    backend: str = "auto",
    process_group: ProcessGroup | str | None = None,
) -> Tensor:
    r"""Batch Renormalization: batch statistics corrected towards the running ones.

    Training, per channel over (N, \*spatial):

    .. math::
        \sigma_B = \sqrt{\sigma^2_B + \epsilon},\quad \sigma = \sqrt{\sigma^2_{\text{run}}
        + \epsilon},\quad
        r = \operatorname{clip}_{[1/r_{max},\,r_{max}]}\!\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \operatorname{clip}_{[-d_{max},\,d_{max}]}\!\Big(\frac{\mu_B - \mu_{\text{run}}}
        {\sigma}\Big)

        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    ``r`` and ``d`` are treated as constants in the backward pass (stopped
    gradient); the gradient through ``μ_B`` and ``σ_B`` is BatchNorm's. After the
    output is computed the running statistics are updated in place with torch's
    convention (``momentum`` is the weight of the new value, unbiased batch
    variance), so r and d of this step use the statistics *before* the update.
    ``training=False`` normalizes with the running statistics, as BatchNorm.
    With ``r_max=1, d_max=0`` this is exactly BatchNorm.

    In eager training mode this is one autograd.Function
    (:mod:`normlab.functional._brn_autograd`): one statistics pass, one
    in-place apply, BatchNorm's backward with weight ``γ·r``, and only ``x``
    plus per-channel vectors saved for backward. Under ``torch.compile``,
    export, tracing, ``torch.func`` transforms, forward-mode AD, with a
    ``process_group`` and for a double backward the same math runs as plain
    autograd ops.

    Args:
        input: (N, C) or (N, C, \*spatial), floating point.
        running_mean, running_var: (C,) buffers (required: r and d need them).
        weight, bias: (C,) or None.
        training: batch statistics with renormalization (and update the running ones).
        momentum: weight of the new batch statistic in the running average.
        eps: added to both variances inside the square root, > 0.
        r_max: >= 1, float or 0-d tensor (e.g. from :func:`batch_renorm_limits`).
        d_max: >= 0, float or 0-d tensor.
        backend: "auto" | "torch" | "triton".
        process_group: with ``training=True``, compute the batch statistics over
            every process of this group (None: this process only; ``"world"``:
            the default group); see :mod:`normlab.distributed`.

    Returns:
        Tensor of the input's shape and dtype.
    """
    layer = "batch_renorm"
    check_norm_input(layer, input, eps, 2)
    group = resolve_process_group(process_group) if training else None
    limits = [t for t in (r_max, d_max) if isinstance(t, Tensor)]
    op = Op.BATCH_RENORM if training else Op.BATCH_RENORM_EVAL
    path = choose_path(op, input, backend, group, weight, bias, running_mean, running_var, *limits)
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{layer}: running_mean and running_var are required (r and d compare the batch "
            "statistics with them); for batch statistics alone use batch_norm."
        )
    c = input.shape[1]
    check_params(
        layer, (c,), weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    if not training:
        var = stored_variance(layer, running_var)
        return affine_normalize(input, running_mean, var, weight, bias, eps)
    _check_limit(layer, "r_max", r_max, 1.0)
    _check_limit(layer, "d_max", d_max, 0.0)

    dims = (0, *range(2, input.dim()))
    if group is None:
        check_batch_count(layer, input, reduced_count(input, dims))
    if path is not Path.FUSED:
        return _batch_renorm_autograd(
            input, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max, group
        )

    def recompute(x, weight, bias, running_mean, running_var):
        # The plain graph, for a double backward, from copies of the running
        # statistics that r and d were computed from (its update goes to the copies).
        return _batch_renorm_autograd(
            x, running_mean.clone(), running_var.clone(), weight, bias, 0.0, eps, r_max, d_max,
            None,
        )  # fmt: skip

    # The fused Function (see normlab.functional._brn_autograd).
    return BatchRenormFunction.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max, recompute
    )


def _batch_renorm_autograd(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    group: ProcessGroup | None,
) -> Tensor:
    """Training-mode :func:`batch_renorm` in plain autograd ops, for validated inputs.

    The path for ``torch.compile``/export/``torch.func``, for statistics synced
    over ``group``, and the graph that a double backward through the fused
    Function differentiates. Same statistics, same values.
    """
    layer = "batch_renorm"
    dims = (0, *range(2, input.dim()))
    acc = acc_dtype(input.dtype)
    shape = channel_shape(input)
    shift = pivot(input, dims).to(acc)
    xc = centered(input, shift)
    if group is None:
        # zero shift: m.mean is the mean of the shifted data, kept exact (adding the
        # pivot back in fp32 would round it to the ulp of the raw values)
        m = centered_moments(xc, dims, torch.zeros_like(shift))
        mean_c, batch_var_b, n = m.mean, m.var, m.count
        batch_mean = mean_c + shift
    else:  # moments of every rank's batch (one all_gather; one all_reduce in backward)
        g, local_count = group_moments(xc, dims, shift, group)
        check_global_count(layer, input.shape, local_count, g.count)
        mean_c, batch_var_b, n = g.mean, g.var, g.count
        batch_mean = g.mean_abs
    # mean_c: μ_B − pivot, carries BatchNorm's gradient
    sigma_b = torch.sqrt(batch_var_b + eps)  # (1, C, 1, ...), carries BatchNorm's gradient
    with torch.no_grad():
        rm, rv = (t.to(acc).reshape(shape) for t in snapshot(running_mean, running_var))
        sigma = torch.sqrt(rv.clamp_min(0) + eps)
        r_hi = r_max.to(acc) if isinstance(r_max, Tensor) else torch.tensor(r_max, dtype=acc)
        d_hi = d_max.to(acc) if isinstance(d_max, Tensor) else torch.tensor(d_max, dtype=acc)
        r_hi, d_hi = r_hi.to(input.device).reshape(()), d_hi.to(input.device).reshape(())
        r = torch.clamp(sigma_b.detach() / sigma, min=1.0 / r_hi, max=r_hi)
        # μ_B − μ as (mean of the shifted data) + (shift − μ): both terms are small
        # differences of nearby values, exact where the raw means would cancel.
        d = torch.clamp((mean_c.detach() + (shift - rm)) / sigma, min=-d_hi, max=d_hi)
    scale = r / sigma_b
    offset = d
    if weight is not None:
        w = weight.to(acc).reshape(shape)
        scale = scale * w
        offset = offset * w
    if bias is not None:
        offset = offset + bias.to(acc).reshape(shape)
    y = (xc - mean_c) * scale + offset
    batch_var = batch_var_b * (n / (n - 1))
    update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum)
    return y.to(input.dtype)


def batch_renorm_limits(
    step: int | Tensor,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_iters: int = 5000,
    r_max_rampup_iters: int = 35000,
    d_max_rampup_iters: int = 20000,
) -> tuple[Tensor, Tensor]:
    r"""The ``(r_max, d_max)`` schedule of Batch Renormalization at training step ``step``.

    Steps ``0 … warmup_iters − 1`` use ``r_max = 1, d_max = 0`` (plain BatchNorm);
    then each limit moves linearly to its final value over its ramp-up:

    .. math:: r_{max}(t) = 1 + (r_{max} - 1)\,\operatorname{clip}_{[0,1]}
              \Big(\frac{t - t_{warm}}{T_r}\Big), \qquad
              d_{max}(t) = d_{max}\,\operatorname{clip}_{[0,1]}
              \Big(\frac{t - t_{warm}}{T_d}\Big)

    A ramp of 0 iterations jumps to the final value right after the warm-up. The
    defaults are the paper's ImageNet schedule: BatchNorm for 5k steps, r_max
    reaching 3 at step 40k and d_max reaching 5 at step 25k.

    Args:
        step: 0-based index of the training batch; an int or an integer tensor
            (e.g. ``num_batches_tracked``, computed on its device with no host sync).

    Returns:
        Two 0-d float64 tensors on ``step``'s device.
    """
    device = step.device if isinstance(step, Tensor) else None
    # float64 scalars: the final limits are exact, whatever the input's dtype.
    t = torch.as_tensor(step, device=device).to(torch.float64)

    def progress(ramp: int) -> Tensor:
        if ramp <= 0:
            return (t >= warmup_iters).to(torch.float64)
        return ((t - warmup_iters) / ramp).clamp(0.0, 1.0)

    r = 1.0 + (r_max - 1.0) * progress(r_max_rampup_iters)
    d = d_max * progress(d_max_rampup_iters)
    return r.reshape(()), d.reshape(())
