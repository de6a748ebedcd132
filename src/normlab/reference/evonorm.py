"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., NeurIPS 2020), float64 NumPy.

B0, per channel c (sb) and per (n, c) (si), with biased variances:

    sb  = sqrt(var_{N,S}(x) + eps)   (training)   or sqrt(running_var + eps)   (eval)
    si  = sqrt(var_S(x) + eps)
    q   = v * x + si
    den = where(q > sb, q, sb)                  (ties go to the batch side)
    y   = weight * x / den + bias

S0, per (n, g) over the group's (C/G, *S) elements:

    s = sqrt(var_group(x) + eps)
    y = weight * x * sigmoid(v * x) / s + bias

Both backward passes use d var / dx = 2 (x - mean) / m over the reduced set of m
elements.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    affine_backward,
    affine_forward,
    as_f64,
    check_dy,
    moments,
    param_view,
    reduced_count,
)

_CHANNEL = (1,)


def _check(x: np.ndarray, name: str) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ValueError(f"{name} expects input of shape (N, C, *spatial), got {x.shape}")
    return tuple(range(2, x.ndim))


def evonorm_b0_forward(
    x,
    v,
    weight=None,
    bias=None,
    *,
    running_var=None,
    training: bool = True,
    eps: float = 1e-5,
) -> tuple[np.ndarray, dict]:
    """EvoNorm-B0 forward; returns ``(y, cache)`` (the running variance is not changed)."""
    x = as_f64(x)
    spatial = _check(x, "evonorm b0")
    weight, bias, v = as_f64(weight), as_f64(bias), as_f64(v)
    vv = param_view("v", v, x.shape, _CHANNEL)
    batch_axes = (0, *spatial)
    if training:
        if reduced_count(x.shape, batch_axes) <= 1:
            raise ValueError(f"evonorm b0 in training needs > 1 value per channel, got {x.shape}")
        mean_b, var_b = moments(x, batch_axes)
    else:
        if running_var is None:
            raise ValueError("evonorm b0 with training=False needs running_var")
        mean_b = None
        var_b = param_view("running_var", as_f64(running_var), x.shape, _CHANNEL)
    sb = np.sqrt(var_b + eps)
    mean_i, var_i = moments(x, spatial)
    si = np.sqrt(var_i + eps)
    q = vv * x + si
    inst = q > sb
    den = np.where(inst, q, sb)
    u = x / den
    cache = {
        "shape": x.shape,
        "x": x,
        "u": u,
        "den": den,
        "inst": inst,
        "v": vv,
        "sb": sb,
        "si": si,
        "mean_b": mean_b,
        "mean_i": mean_i,
        "batch_axes": batch_axes if training else None,
        "spatial": spatial,
        "weight": weight,
        "has_bias": bias is not None,
    }
    return affine_forward(u, weight, bias, _CHANNEL), cache


def evonorm_b0_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias", "dv"}`` (None where weight/bias was None)."""
    dy = check_dy(dy, cache)
    x, den, inst = cache["x"], cache["den"], cache["inst"]
    du, dweight, dbias = affine_backward(
        dy, cache["u"], cache["weight"], cache["has_bias"], _CHANNEL
    )
    dx = du / den
    dden = -du * x / den**2
    dq = np.where(inst, dden, 0.0)
    other = tuple(i for i in range(dy.ndim) if i != 1)
    dv = (dq * x).sum(axis=other)
    dx = dx + dq * cache["v"]
    spatial = cache["spatial"]
    m_i = reduced_count(dy.shape, spatial)
    dvar_i = dq.sum(axis=spatial, keepdims=True) / (2.0 * cache["si"])
    dx = dx + dvar_i * 2.0 * (x - cache["mean_i"]) / m_i
    if cache["batch_axes"] is not None:
        axes = cache["batch_axes"]
        m_b = reduced_count(dy.shape, axes)
        dvar_b = np.where(inst, 0.0, dden).sum(axis=axes, keepdims=True) / (2.0 * cache["sb"])
        dx = dx + dvar_b * 2.0 * (x - cache["mean_b"]) / m_b
    return {"dx": dx, "dweight": dweight, "dbias": dbias, "dv": dv}


def evonorm_s0_forward(
    x, num_groups: int, v, weight=None, bias=None, *, eps: float = 1e-5
) -> tuple[np.ndarray, dict]:
    """EvoNorm-S0 forward; returns ``(y, cache)``."""
    x = as_f64(x)
    _check(x, "evonorm s0")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups != 0:
        raise ValueError(
            f"evonorm s0: num_channels={c} must be divisible by num_groups={num_groups}"
        )
    weight, bias, v = as_f64(weight), as_f64(bias), as_f64(v)
    vv = param_view("v", v, x.shape, _CHANNEL)
    g = x.reshape(n, num_groups, -1)
    mean_g, var_g = moments(g, (2,))
    s = np.sqrt(var_g + eps)  # (N, G, 1)
    sig = 1.0 / (1.0 + np.exp(-vv * x))
    a = x * sig
    u = (a.reshape(n, num_groups, -1) / s).reshape(x.shape)
    cache = {
        "shape": x.shape,
        "num_groups": num_groups,
        "x": x,
        "a": a,
        "sig": sig,
        "s": s,
        "mean_g": mean_g,
        "u": u,
        "v": vv,
        "weight": weight,
        "has_bias": bias is not None,
    }
    return affine_forward(u, weight, bias, _CHANNEL), cache


def evonorm_s0_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias", "dv"}`` (None where weight/bias was None)."""
    dy = check_dy(dy, cache)
    shape = dy.shape
    n, g = shape[0], cache["num_groups"]
    x, a, sig, s, vv = cache["x"], cache["a"], cache["sig"], cache["s"], cache["v"]
    du, dweight, dbias = affine_backward(
        dy, cache["u"], cache["weight"], cache["has_bias"], _CHANNEL
    )
    du_g = du.reshape(n, g, -1)
    da = (du_g / s).reshape(shape)
    ds = -(du_g * a.reshape(n, g, -1)).sum(axis=2, keepdims=True) / s**2
    dvar = ds / (2.0 * s)
    m = du_g.shape[2]
    xg = x.reshape(n, g, -1)
    dx_var = (dvar * 2.0 * (xg - cache["mean_g"]) / m).reshape(shape)
    dsig = sig * (1.0 - sig)  # d sigmoid(t) / dt at t = v x
    dx = da * (sig + x * dsig * vv) + dx_var
    other = tuple(i for i in range(dy.ndim) if i != 1)
    dv = (da * x * x * dsig).sum(axis=other)
    return {"dx": dx, "dweight": dweight, "dbias": dbias, "dv": dv}
