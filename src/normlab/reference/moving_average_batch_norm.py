"""Moving Average Batch Normalization (Yan et al., ICLR 2020), one step, float64 NumPy.

Per channel c, with the statistics over the batch and spatial axes (N, *S) and
``t`` the number of training steps taken before this one:

    chi_B     = mean(x^2)                                   (no mean subtracted)
    chi_win[t % m] <- chi_B
    chi_SMA   = sum(chi_win) / min(t + 1, m)                (written slots only)
    warm      = t < warmup_iters
    chi       = chi_B if warm else chi_SMA
    xhat      = x / sqrt(chi + eps)
    r_off     = t < r_warmup_iters  (warm when r_warmup_iters is None)
    r         = 1 if r_off else clip(sqrt(chi + eps) / sqrt(running_var + eps), 1/r_clip, r_clip)
    y         = weight * r * xhat + bias
    running_var <- (1 - m_t) running_var + m_t chi          (m_t = momentum, or 1/(t+1))

    backward, with g = weight * r * dy:
    psi_B     = mean(g * xhat)
    psi_win[t % m] <- psi_B;  psi_filled <- min(psi_filled + 1, m)
    psi       = psi_B if warm else sum(psi_win) / psi_filled
    dx        = (g - xhat * psi) / sqrt(chi + eps)
    dweight   = sum(dy * r * xhat),   dbias = sum(dy)

Eval: ``y = weight * x / sqrt(running_var + eps) + bias``, constant statistics.

The state is never modified in place: the forward's cache carries the new
``running_var``, ``chi_window`` and ``num_batches_tracked``; the backward's result
carries the new ``psi_window`` and ``psi_filled``.
"""

from __future__ import annotations

import numpy as np

from ._common import affine_backward, affine_forward, as_f64, check_dy, param_view

_CHANNEL = (1,)


def _stat_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"MABN expects input of shape (N, C, *spatial), got {x.shape}")
    return (0, *range(2, x.ndim))


def moving_average_batch_norm_forward(
    x,
    weight=None,
    bias=None,
    *,
    running_var,
    chi_window=None,
    psi_window=None,
    psi_filled: int = 0,
    num_batches_tracked: int = 0,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    warmup_iters: int = 100,
    r_clip: float = 5.0,
    r_warmup_iters: int | None = None,
) -> tuple[np.ndarray, dict]:
    """One MABN step; returns ``(y, cache)``; the cache holds the updated state.

    ``chi_window`` / ``psi_window`` have shape (m, C) (training only);
    ``psi_filled`` and ``num_batches_tracked`` are ints. New state in
    ``cache["running_var"]``, ``cache["chi_window"]``, ``cache["num_batches_tracked"]``.
    """
    x = as_f64(x)
    weight, bias = as_f64(weight), as_f64(bias)
    axes = _stat_axes(x)
    running_var = as_f64(running_var)
    c = x.shape[1]
    bshape = [1] * x.ndim
    bshape[1] = c
    if not training:
        rstd = 1.0 / np.sqrt(param_view("running_var", running_var, x.shape, _CHANNEL) + eps)
        xhat = x * rstd
        cache = {
            "shape": x.shape,
            "training": False,
            "xhat": xhat,
            "rstd": rstd,
            "r": np.ones(bshape),
            "weight": weight,
            "has_bias": bias is not None,
        }
        return affine_forward(xhat, weight, bias, _CHANNEL), cache

    chi_window = np.array(as_f64(chi_window), copy=True)
    m = chi_window.shape[0]
    t = int(num_batches_tracked)
    chi_b = (x * x).mean(axis=axes)
    chi_window[t % m] = chi_b
    chi_sma = chi_window.sum(axis=0) / min(t + 1, m)
    warm = t < warmup_iters
    chi = chi_b if warm else chi_sma
    if warm if r_warmup_iters is None else t < r_warmup_iters:
        r = np.ones(c)
    else:
        r = np.clip(np.sqrt(chi + eps) / np.sqrt(running_var + eps), 1.0 / r_clip, r_clip)
    rstd = (1.0 / np.sqrt(chi + eps)).reshape(bshape)
    xhat = x * rstd
    y = affine_forward(xhat * r.reshape(bshape), weight, bias, _CHANNEL)
    mt = 1.0 / (t + 1) if momentum is None else float(momentum)
    cache = {
        "shape": x.shape,
        "training": True,
        "axes": axes,
        "xhat": xhat,
        "rstd": rstd,
        "r": r.reshape(bshape),
        "warm": warm,
        "slot": t % m,
        "psi_window": np.array(as_f64(psi_window), copy=True),
        "psi_filled": int(psi_filled),
        "weight": weight,
        "has_bias": bias is not None,
        "running_var": (1.0 - mt) * running_var + mt * chi,
        "chi_window": chi_window,
        "num_batches_tracked": t + 1,
    }
    return y, cache


def moving_average_batch_norm_backward(dy, cache: dict) -> dict:
    """MABN's backward (the paper's rule, not the exact gradient of the forward).

    Returns ``{"dx", "dweight", "dbias"}`` (None where weight/bias was None) and,
    after a training forward, the new ``"psi_window"`` and ``"psi_filled"``.
    """
    dy = check_dy(dy, cache)
    xhat, rstd, r = cache["xhat"], cache["rstd"], cache["r"]
    dxhat, dweight, dbias = affine_backward(
        dy, xhat * r, cache["weight"], cache["has_bias"], _CHANNEL
    )
    g = dxhat * r
    if not cache["training"]:
        return {"dx": g * rstd, "dweight": dweight, "dbias": dbias}
    axes = cache["axes"]
    psi_window = cache["psi_window"].copy()
    m = psi_window.shape[0]
    psi_b = (g * xhat).mean(axis=axes)
    psi_window[cache["slot"]] = psi_b
    psi_filled = min(cache["psi_filled"] + 1, m)
    psi = psi_b if cache["warm"] else psi_window.sum(axis=0) / psi_filled
    bshape = [1] * len(cache["shape"])
    bshape[1] = psi.shape[0]
    dx = (g - xhat * psi.reshape(bshape)) * rstd
    return {
        "dx": dx,
        "dweight": dweight,
        "dbias": dbias,
        "psi_window": psi_window,
        "psi_filled": psi_filled,
    }
