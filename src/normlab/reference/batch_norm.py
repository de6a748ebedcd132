"""Batch normalization (Ioffe & Szegedy, 2015) and its frozen variant, float64 NumPy.

Per channel c, over the batch and spatial axes (N, *S):

    training:  xhat = (x - mean_B) / sqrt(var_B + eps)    (var_B biased)
    eval:      xhat = (x - running_mean) / sqrt(running_var + eps)
    y = weight * xhat + bias

Running statistics follow torch: ``running <- (1 - m) running + m batch`` with the
*unbiased* batch variance var_B * n / (n - 1).
"""

from __future__ import annotations

import numpy as np

from ._common import as_f64, channel_norm_forward, moments, norm_backward, reduced_count
from ._running import running_update


def _stat_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"batch norm expects input of shape (N, C, *spatial), got {x.shape}")
    return (0, *range(2, x.ndim))


def _check_count(x: np.ndarray, axes: tuple[int, ...], what: str) -> int:
    n = reduced_count(x.shape, axes)
    if n <= 1:
        raise ValueError(
            f"batch norm {what} needs more than 1 value per channel, got input of shape "
            f"{x.shape}; use a bigger batch, GroupNorm, FRN, FrozenBatchNorm or "
            "recalibrated running statistics"
        )
    return n


def batch_norm_forward(
    x,
    weight=None,
    bias=None,
    *,
    running_mean=None,
    running_var=None,
    training: bool = True,
    eps: float = 1e-5,
) -> tuple[np.ndarray, dict]:
    """Batch norm forward; returns ``(y, cache)``.

    ``training=True`` normalizes with the batch mean and biased batch variance over
    (N, *S) per channel (the running stats are ignored here: see
    :func:`batch_norm_update_running`). ``training=False`` uses ``running_mean`` and
    ``running_var`` (shape (C,), both required) as constants.
    """
    x = as_f64(x)
    weight, bias = as_f64(weight), as_f64(bias)
    axes = _stat_axes(x)
    if training:
        _check_count(x, axes, "in training")
    elif running_mean is None or running_var is None:
        raise ValueError("batch norm with training=False needs running_mean and running_var")
    return channel_norm_forward(
        x, weight, bias, eps, axes if training else None, running_mean, running_var
    )


def batch_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias"}`` (None where weight/bias was None).

    Training: ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` over
    (N, *S), with ``dxhat = dy * weight``. Eval: ``dx = dy * weight / sqrt(running_var + eps)``.
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over (N, *S).
    """
    return norm_backward(dy, cache)


def _batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel over (N, *S): the mean and the *unbiased* variance (count n > 1)."""
    axes = _stat_axes(x)
    n = _check_count(x, axes, "running statistics")
    mean, var = moments(x, axes)
    return mean.reshape(-1), var.reshape(-1) * n / (n - 1)


batch_norm_update_running = running_update(
    "batch_norm_update_running",
    _batch_stats,
    """``(x, running_mean, running_var, *, momentum=0.1, num_batches_tracked=0)``: new
    ``(running_mean, running_var, num_batches_tracked)`` after one training batch.

    ``running_mean <- (1 - m) running_mean + m mean_B``,
    ``running_var  <- (1 - m) running_var  + m var_B * n / (n - 1)`` (unbiased),
    n = N * prod(S); m = momentum, or 1 / (num_batches_tracked + 1) when momentum is None.
    """,
)


def frozen_batch_norm_forward(
    x, weight, bias, running_mean, running_var, eps: float = 1e-5
) -> tuple[np.ndarray, dict]:
    """Frozen batch norm: ``y = (x - running_mean) * weight / sqrt(running_var + eps) + bias``.

    Equivalently ``y = x * scale + (bias - running_mean * scale)`` with
    ``scale = weight / sqrt(running_var + eps)``. Nothing is learned or updated.
    """
    x = as_f64(x)
    _stat_axes(x)
    weight, bias = as_f64(weight), as_f64(bias)
    return channel_norm_forward(x, weight, bias, eps, None, running_mean, running_var)


def frozen_batch_norm_backward(dy, cache: dict) -> dict:
    """``{"dx": dy * weight / sqrt(running_var + eps), "dweight": None, "dbias": None}``.

    weight and bias are buffers in a frozen batch norm, so they get no gradient.
    """
    dx = norm_backward(dy, cache)["dx"]
    return {"dx": dx, "dweight": None, "dbias": None}
