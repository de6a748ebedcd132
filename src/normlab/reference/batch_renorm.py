"""Batch Renormalization (Ioffe, NeurIPS 2017), float64 NumPy.

Per channel c, over (N, *S), with running statistics mu, var (shape (C,)):

    training:  sigma_B = sqrt(var_B + eps)   (var_B biased),  sigma = sqrt(var + eps)
               r = clip(sigma_B / sigma, 1/r_max, r_max)
               d = clip((mean_B - mu) / sigma, -d_max, d_max)
               xhat = (x - mean_B) / sigma_B * r + d
    eval:      xhat = (x - mu) / sigma
    y = weight * xhat + bias

r and d are constants for the backward pass, so with xb = (x - mean_B) / sigma_B:

    dxhat = dy * weight,  dxb = dxhat * r
    dx = (1/sigma_B) * (dxb - mean(dxb) - xb * mean(dxb * xb))        (BatchNorm's)
    dweight = sum(dy * xhat), dbias = sum(dy)

Running statistics are updated exactly as BatchNorm's (torch's convention) with
:func:`batch_renorm_update_running`, after r and d were computed from the old ones.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    affine_backward,
    affine_forward,
    as_f64,
    check_dy,
    make_cache,
    norm_backward,
    normalize_backward,
    normalize_with,
    param_view,
    reduced_count,
    standardize,
)
from .batch_norm import batch_norm_update_running

_CHANNEL = (1,)


def batch_renorm_forward(
    x,
    weight=None,
    bias=None,
    *,
    running_mean,
    running_var,
    training: bool = True,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> tuple[np.ndarray, dict]:
    """Batch renorm forward; returns ``(y, cache)``. The running stats are not changed."""
    x = as_f64(x)
    if x.ndim < 2:
        raise ValueError(f"batch renorm expects input of shape (N, C, *spatial), got {x.shape}")
    weight, bias = as_f64(weight), as_f64(bias)
    rm, rv = as_f64(running_mean), as_f64(running_var)
    if training:
        axes = (0, *range(2, x.ndim))
        if reduced_count(x.shape, axes) <= 1:
            raise ValueError(f"batch renorm in training needs > 1 value per channel, got {x.shape}")
        xb, mean_b, rstd = standardize(x, axes, eps)
        sigma_b = 1.0 / rstd
        mu = param_view("running_mean", rm, x.shape, _CHANNEL)
        sigma = np.sqrt(param_view("running_var", rv, x.shape, _CHANNEL) + eps)
        r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
        d = np.clip((mean_b - mu) / sigma, -d_max, d_max)
        xhat = xb * r + d
        renorm = {"renorm": True, "xb": xb, "r": r, "d": d}
    else:  # the running statistics as constants (``axes=None``): BatchNorm's eval
        axes = None
        xhat, rstd = normalize_with(x, rm, rv, eps, _CHANNEL)
        renorm = {"renorm": False}
    cache = make_cache(x, xhat, rstd, axes, weight, bias, _CHANNEL) | renorm
    return affine_forward(xhat, weight, bias, _CHANNEL), cache


def batch_renorm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias"}`` with r and d held constant."""
    if not cache["renorm"]:
        return norm_backward(dy, cache)
    dy = check_dy(dy, cache)
    dxhat, dweight, dbias = affine_backward(
        dy, cache["xhat"], cache["weight"], cache["has_bias"], _CHANNEL
    )
    dx = normalize_backward(dxhat * cache["r"], cache["xb"], cache["rstd"], cache["axes"])
    return {"dx": dx, "dweight": dweight, "dbias": dbias}


#: New ``(running_mean, running_var, num_batches_tracked)``: BatchNorm's update,
#: ``running <- (1 - m) running + m batch`` with the unbiased batch variance (the same
#: function as :func:`~normlab.reference.batch_norm.batch_norm_update_running`).
batch_renorm_update_running = batch_norm_update_running
