"""Switchable normalization (Luo et al., 2018), float64 NumPy, from the math.

x has shape (N, C, *S). Three normalizers, each a choice of axes, with biased moments:

    IN: mu_in[n, c], var_in[n, c]   over S
    LN: mu_ln[n],    var_ln[n]      over (C, *S)
    BN: mu_bn[c],    var_bn[c]      over (N, *S)   (eval: running_mean, running_var)

For (N, C) input only LN (over C) and BN (over N) are mixed. With w = softmax(mean_weight),
v = softmax(var_weight):

    mu  = sum_k w_k mu_k,   var = sum_k v_k var_k      (broadcast to (N, C, 1...))
    xhat = (x - mu) / sqrt(var + eps),   y = weight[c] * xhat + bias[c]

Every statistic is computed directly over its own axes (two passes), not derived from
the IN moments: this is the independent oracle for the torch implementation.
"""

from __future__ import annotations

import numpy as np

from ._common import affine_backward, affine_forward, as_f64, check_dy, reduced_count

_CHANNEL = (1,)


def _components(ndim: int, using_bn: bool) -> tuple[str, ...]:
    names = ("in", "ln", "bn") if ndim >= 3 else ("ln", "bn")
    return names if using_bn else names[:-1]


def _axes(name: str, ndim: int) -> tuple[int, ...]:
    spatial = tuple(range(2, ndim))
    return {"in": spatial, "ln": (1, *spatial), "bn": (0, *spatial)}[name]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _softmax_backward(dw: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d logits from d softmax: ``w_j (dw_j - sum_k w_k dw_k)``."""
    return w * (dw - np.sum(w * dw))


def switchable_norm_forward(
    x,
    mean_weight,
    var_weight,
    weight=None,
    bias=None,
    *,
    running_mean=None,
    running_var=None,
    training: bool = True,
    eps: float = 1e-5,
    using_bn: bool = True,
) -> tuple[np.ndarray, dict]:
    """Switchable norm forward; returns ``(y, cache)``.

    ``mean_weight`` / ``var_weight`` are logits ordered (IN, LN, BN) for rank >= 3 and
    (LN, BN) for rank 2, without BN when ``using_bn=False``. ``training=False`` takes
    the BN moments from ``running_mean`` / ``running_var`` (shape (C,)) as constants.
    """
    x = as_f64(x)
    if x.ndim < 2:
        raise ValueError(f"switchable norm expects input (N, C, *spatial), got {x.shape}")
    weight, bias = as_f64(weight), as_f64(bias)
    names = _components(x.ndim, using_bn)
    lm, lv = as_f64(mean_weight), as_f64(var_weight)
    for label, logits in (("mean_weight", lm), ("var_weight", lv)):
        if logits.shape != (len(names),):
            raise ValueError(
                f"{label} must have shape ({len(names)},) for {names}, got {logits.shape}"
            )
    stat_shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    means, variances, axes = {}, {}, {}
    for name in names:
        if name == "bn" and not training:
            if running_mean is None or running_var is None:
                raise ValueError("switchable norm with training=False needs running statistics")
            means[name] = as_f64(running_mean).reshape(stat_shape)
            variances[name] = as_f64(running_var).reshape(stat_shape)
            axes[name] = None  # constants
            continue
        ax = _axes(name, x.ndim)
        if name == "bn" and reduced_count(x.shape, ax) <= 1:
            raise ValueError(
                f"switchable norm's BN branch needs more than 1 value per channel in "
                f"training, got input of shape {x.shape}; use using_bn=False or a bigger batch"
            )
        mu = x.mean(axis=ax, keepdims=True)
        means[name] = mu
        variances[name] = ((x - mu) ** 2).mean(axis=ax, keepdims=True)
        axes[name] = ax
    w, v = _softmax(lm), _softmax(lv)
    mu = sum(w[k] * means[name] for k, name in enumerate(names))
    var = sum(v[k] * variances[name] for k, name in enumerate(names))
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * rstd
    y = affine_forward(xhat, weight, bias, _CHANNEL)
    cache = {
        "shape": x.shape,
        "x": x,
        "xhat": xhat,
        "rstd": rstd,
        "names": names,
        "axes": axes,
        "means": means,
        "variances": variances,
        "w": w,
        "v": v,
        "weight": weight,
        "has_bias": bias is not None,
    }
    return y, cache


def switchable_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias", "dmean_weight", "dvar_weight"}``.

    With ``g = dy * weight`` and per-(n, c) sums over S:

        dmu  = -rstd * sum_S g,          dvar = -rstd^2 / 2 * sum_S g * xhat
        dx   = g * rstd
             + sum_k w_k * (sum of dmu over k's axes) / n_k
             + sum_k v_k * (sum of dvar over k's axes) * 2 (x - mu_k) / n_k

    for every normalizer k computed from the batch (n_k: its group size; running BN
    statistics are constants). The logits get ``d mean_weight = softmax'(sum(dmu * mu_k))``
    and ``d var_weight = softmax'(sum(dvar * var_k))``.
    """
    dy = check_dy(dy, cache)
    x, xhat, rstd = cache["x"], cache["xhat"], cache["rstd"]
    g, dweight, dbias = affine_backward(dy, xhat, cache["weight"], cache["has_bias"], _CHANNEL)
    spatial = tuple(range(2, x.ndim))
    dmu = -rstd * g.sum(axis=spatial, keepdims=True)
    dvar = -0.5 * rstd**2 * (g * xhat).sum(axis=spatial, keepdims=True)
    dx = g * rstd
    names, w, v = cache["names"], cache["w"], cache["v"]
    dw, dv = np.zeros(len(names)), np.zeros(len(names))
    for k, name in enumerate(names):
        mu_k, var_k, ax = cache["means"][name], cache["variances"][name], cache["axes"][name]
        dw[k] = np.sum(dmu * mu_k)
        dv[k] = np.sum(dvar * var_k)
        if ax is None:
            continue
        count = reduced_count(x.shape, ax)
        dx = dx + w[k] * dmu.sum(axis=ax, keepdims=True) / count
        dx = dx + v[k] * dvar.sum(axis=ax, keepdims=True) * 2.0 * (x - mu_k) / count
    return {
        "dx": dx,
        "dweight": dweight,
        "dbias": dbias,
        "dmean_weight": _softmax_backward(dw, w),
        "dvar_weight": _softmax_backward(dv, v),
    }
