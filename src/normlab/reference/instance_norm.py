"""Instance normalization (Ulyanov et al., 2017), float64 NumPy.

Per (n, c), over the spatial dims S:  xhat = (x - mean) / sqrt(var + eps) (var biased),
y = weight[c] * xhat + bias[c]. With ``use_input_stats=False`` the running statistics
(shape (C,)) are used as constants instead.
"""

from __future__ import annotations

import numpy as np

from ._common import as_f64, channel_norm_forward, moments, norm_backward, reduced_count
from ._running import running_update


def _spatial_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ValueError(
            f"instance norm expects input of shape (N, C, *spatial) with at least one "
            f"spatial dim, got {x.shape}"
        )
    return tuple(range(2, x.ndim))


def _check_count(x: np.ndarray, axes: tuple[int, ...]) -> int:
    n = reduced_count(x.shape, axes)
    if n <= 1:
        raise ValueError(
            f"instance norm needs more than 1 spatial element per (sample, channel), got "
            f"input of shape {x.shape}; use LayerNorm, GroupNorm or BatchNorm instead"
        )
    return n


def instance_norm_forward(
    x,
    weight=None,
    bias=None,
    *,
    running_mean=None,
    running_var=None,
    use_input_stats: bool = True,
    eps: float = 1e-5,
) -> tuple[np.ndarray, dict]:
    """Instance norm forward; returns ``(y, cache)``.

    ``use_input_stats=True``: per-(n, c) statistics over S (the running stats are ignored
    here: see :func:`instance_norm_update_running`). ``False``: ``running_mean`` and
    ``running_var`` (shape (C,), both required) as constants.
    """
    x = as_f64(x)
    axes = _spatial_axes(x)
    weight, bias = as_f64(weight), as_f64(bias)
    if use_input_stats:
        _check_count(x, axes)
    elif running_mean is None or running_var is None:
        raise ValueError(
            "instance norm with use_input_stats=False needs running_mean and running_var"
        )
    return channel_norm_forward(
        x, weight, bias, eps, axes if use_input_stats else None, running_mean, running_var
    )


def instance_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias"}`` (None where weight/bias was None).

    Input stats: ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` over S per
    (n, c). Running stats: ``dx = dy * weight / sqrt(running_var + eps)``.
    """
    return norm_backward(dy, cache)


def _instance_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: the mean over n of the per-(n, c) means and unbiased variances over S."""
    axes = _spatial_axes(x)
    n = _check_count(x, axes)
    mean, var = moments(x, axes)
    unbiased = var * n / (n - 1)
    return mean.reshape(x.shape[:2]).mean(axis=0), unbiased.reshape(x.shape[:2]).mean(axis=0)


instance_norm_update_running = running_update(
    "instance_norm_update_running",
    _instance_stats,
    """``(x, running_mean, running_var, *, momentum=0.1, num_batches_tracked=0)``: new
    ``(running_mean, running_var, num_batches_tracked)``, torch's InstanceNorm semantics.

    The batch values are the mean over n of the per-(n, c) means and of the per-(n, c)
    *unbiased* variances (count prod(S)); then ``running <- (1 - m) running + m batch``.
    ``momentum=None`` here means the cumulative average ``m = 1 / (num_batches_tracked + 1)``
    (note: torch's ``nn.InstanceNorm*`` module instead passes momentum 0.0, i.e. no update).
    """,
)
