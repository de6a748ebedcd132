"""Filter Response Normalization and TLU (Singh & Krishnan, CVPR 2020), float64 NumPy.

Per (n, c), over the spatial axes S (m = |S| elements), with e = |eps|:

    nu2  = mean_S(x^2)                 (no mean subtraction)
    s    = 1 / sqrt(nu2 + e)
    xhat = x * s
    z    = weight * xhat + bias
    y    = z              if tau is None,
           where(z > tau, z, tau)      otherwise (TLU; ties go to tau).

Backward (dz = dy * [z > tau], dtau = sum_{N,S} dy * [z <= tau]):

    dxhat = dz * weight
    dx    = s * (dxhat - xhat * mean_S(dxhat * xhat))
    de    = -1/2 * sum_{n,c} s^3 * sum_S(dxhat * x),   deps = de * sign(eps)
"""

from __future__ import annotations

import numpy as np

from ._common import affine_backward, affine_forward, as_f64, check_dy, param_view

_CHANNEL = (1,)


def _spatial_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ValueError(
            f"filter response norm expects input of shape (N, C, *spatial), got {x.shape}"
        )
    return tuple(range(2, x.ndim))


def filter_response_norm_forward(
    x, weight=None, bias=None, *, eps: float = 1e-6, tau=None
) -> tuple[np.ndarray, dict]:
    """FRN forward (followed by the TLU when ``tau`` (C,) is given); returns ``(y, cache)``.

    ``eps`` is a scalar; its absolute value is added to nu2.
    """
    x = as_f64(x)
    axes = _spatial_axes(x)
    weight, bias, tau = as_f64(weight), as_f64(bias), as_f64(tau)
    eps = float(eps)
    e = abs(eps)
    nu2 = (x * x).mean(axis=axes, keepdims=True)
    s = 1.0 / np.sqrt(nu2 + e)
    xhat = x * s
    z = affine_forward(xhat, weight, bias, _CHANNEL)
    cache = {
        "shape": x.shape,
        "x": x,
        "xhat": xhat,
        "s": s,
        "axes": axes,
        "eps": eps,
        "weight": weight,
        "has_bias": bias is not None,
        "tau": tau,
        "z": z,
    }
    if tau is None:
        return z, cache
    t = param_view("tau", tau, x.shape, _CHANNEL)
    return np.where(z > t, z, t), cache


def filter_response_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias", "dtau", "deps"}`` (None where absent)."""
    dy = check_dy(dy, cache)
    x, xhat, s, axes = cache["x"], cache["xhat"], cache["s"], cache["axes"]
    dtau = None
    dz = dy
    if cache["tau"] is not None:
        t = param_view("tau", cache["tau"], dy.shape, _CHANNEL)
        above = cache["z"] > t
        dz = np.where(above, dy, 0.0)
        other = tuple(i for i in range(dy.ndim) if i != 1)
        dtau = np.where(above, 0.0, dy).sum(axis=other)
    dxhat, dweight, dbias = affine_backward(dz, xhat, cache["weight"], cache["has_bias"], _CHANNEL)
    dx = s * (dxhat - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
    de = float((-0.5 * s**3 * (dxhat * x).sum(axis=axes, keepdims=True)).sum())
    deps = de * float(np.sign(cache["eps"]))
    return {"dx": dx, "dweight": dweight, "dbias": dbias, "dtau": dtau, "deps": deps}


def tlu_forward(x, tau) -> tuple[np.ndarray, dict]:
    """TLU: ``y = where(x > tau, x, tau)`` with per-channel ``tau`` (C,)."""
    x, tau = as_f64(x), as_f64(tau)
    if x.ndim < 2:
        raise ValueError(f"tlu expects input of shape (N, C, *), got {x.shape}")
    t = param_view("tau", tau, x.shape, _CHANNEL)
    return np.where(x > t, x, t), {"shape": x.shape, "above": x > t}


def tlu_backward(dy, cache: dict) -> dict:
    """``{"dx": dy * [x > tau], "dtau": sum over (N, *) of dy * [x <= tau]}``."""
    dy = check_dy(dy, cache)
    above = cache["above"]
    other = tuple(i for i in range(dy.ndim) if i != 1)
    return {"dx": np.where(above, dy, 0.0), "dtau": np.where(above, 0.0, dy).sum(axis=other)}
