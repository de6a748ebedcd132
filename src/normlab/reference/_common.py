"""Shared float64 helpers: a norm is a choice of statistics axes plus an affine map.

Notation used across the package: ``x`` has shape (N, C, *S); a norm computes

    mean = E[x],  var = E[(x - mean)^2]  (biased)   over some ``axes``,
    xhat = (x - mean) * rstd,            rstd = 1 / sqrt(var + eps),
    y    = weight * xhat + bias          (weight/bias span ``param_axes``).

No torch here: this package is the independent oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Axes = tuple[int, ...]

#: The channel axis of an (N, C, *S) input: where per-channel statistics and parameters live.
CHANNEL: Axes = (1,)


def as_f64(a: object) -> np.ndarray | None:
    """``np.asarray(a, float64)``, passing ``None`` through."""
    return None if a is None else np.asarray(a, dtype=np.float64)


def reduced_count(shape: Sequence[int], axes: Axes) -> int:
    """Number of elements reduced over ``axes`` (the n in the mean)."""
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def moments(x: np.ndarray, axes: Axes) -> tuple[np.ndarray, np.ndarray]:
    """Mean and *biased* variance over ``axes`` (keepdims), by two passes.

    Two passes (mean first, then E[(x - mean)^2]) avoid the cancellation of
    E[x^2] - E[x]^2 on off-center data.
    """
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var


def standardize(x: np.ndarray, axes: Axes, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xhat = (x - mean) / sqrt(var + eps)`` over ``axes``; returns (xhat, mean, rstd)."""
    mean, var = moments(x, axes)
    rstd = 1.0 / np.sqrt(var + eps)
    return (x - mean) * rstd, mean, rstd


def normalize_backward(dxhat: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, axes: Axes):
    """Gradient through ``xhat = (x - mean(x)) / sqrt(var(x) + eps)`` with batch stats.

    Mean and variance depend on x, which gives the two correction terms:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    with the means taken over the reduced ``axes``.
    """
    mean_dxhat = dxhat.mean(axis=axes, keepdims=True)
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=axes, keepdims=True)
    return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)


def param_view(
    name: str, p: np.ndarray | None, x_shape: Sequence[int], param_axes: Axes
) -> np.ndarray | None:
    """Check that ``p`` has shape ``x_shape[param_axes]`` and reshape it to broadcast against x."""
    if p is None:
        return None
    expected = tuple(x_shape[a] for a in param_axes)
    if p.shape != expected:
        raise ValueError(
            f"{name} must have shape {expected} for input {tuple(x_shape)}, got {p.shape}"
        )
    bshape = [x_shape[i] if i in param_axes else 1 for i in range(len(x_shape))]
    return p.reshape(bshape)


def affine_forward(
    xhat: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, param_axes: Axes
) -> np.ndarray:
    """``y = weight * xhat + bias`` with parameters spanning ``param_axes`` (either may be None)."""
    y = xhat
    w = param_view("weight", weight, xhat.shape, param_axes)
    b = param_view("bias", bias, xhat.shape, param_axes)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def affine_backward(
    dy: np.ndarray,
    xhat: np.ndarray,
    weight: np.ndarray | None,
    has_bias: bool,
    param_axes: Axes,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Backward of :func:`affine_forward`: (dxhat, dweight, dbias).

    dweight = sum(dy * xhat), dbias = sum(dy), summed over every axis not in ``param_axes``.
    """
    other = tuple(i for i in range(dy.ndim) if i not in param_axes)
    pshape = tuple(dy.shape[a] for a in param_axes)
    dweight = None if weight is None else (dy * xhat).sum(axis=other).reshape(pshape)
    dbias = dy.sum(axis=other).reshape(pshape) if has_bias else None
    w = param_view("weight", weight, dy.shape, param_axes)
    dxhat = dy if w is None else dy * w
    return dxhat, dweight, dbias


def check_dy(dy: object, cache: dict) -> np.ndarray:
    """``dy`` as float64, with the shape of the forward output."""
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != cache["shape"]:
        raise ValueError(f"dy has shape {dy.shape}, expected {cache['shape']}")
    return dy


def normalize_with(
    x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float, stat_axes: Axes
) -> tuple[np.ndarray, np.ndarray]:
    """``xhat = (x - mean) / sqrt(var + eps)`` with *given* (constant) statistics.

    ``mean``/``var`` span ``stat_axes`` of x (e.g. running stats of shape (C,)).
    Returns (xhat, rstd) with rstd shaped to broadcast against x.
    """
    m = param_view("running_mean", mean, x.shape, stat_axes)
    v = param_view("running_var", var, x.shape, stat_axes)
    rstd = 1.0 / np.sqrt(v + eps)
    return (x - m) * rstd, rstd


def make_cache(
    x: np.ndarray,
    xhat: np.ndarray,
    rstd: np.ndarray,
    axes: Axes | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    param_axes: Axes,
) -> dict:
    """Everything :func:`norm_backward` needs; ``axes=None`` marks constant statistics."""
    return {
        "shape": x.shape,
        "xhat": xhat,
        "rstd": rstd,
        "axes": axes,
        "weight": weight,
        "has_bias": bias is not None,
        "param_axes": param_axes,
    }


def channel_norm_forward(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axes: Axes | None,
    running_mean: object = None,
    running_var: object = None,
) -> tuple[np.ndarray, dict]:
    """``y = weight[c] * xhat + bias[c]`` and its :func:`norm_backward` cache.

    ``xhat`` standardizes ``x`` with its own statistics over ``axes``, or, with
    ``axes=None``, with ``running_mean`` / ``running_var`` (shape (C,)) as constants.
    """
    if axes is None:
        xhat, rstd = normalize_with(x, as_f64(running_mean), as_f64(running_var), eps, CHANNEL)
    else:
        xhat, _, rstd = standardize(x, axes, eps)
    cache = make_cache(x, xhat, rstd, axes, weight, bias, CHANNEL)
    return affine_forward(xhat, weight, bias, CHANNEL), cache


def norm_backward(dy: object, cache: dict) -> dict:
    """Backward of ``y = weight * standardize(x) + bias`` from a :func:`make_cache` cache.

    Batch statistics (``axes`` given): dx from :func:`normalize_backward`.
    Constant statistics (``axes is None``): ``dx = dxhat * rstd``.
    """
    dy = check_dy(dy, cache)
    xhat, rstd, axes = cache["xhat"], cache["rstd"], cache["axes"]
    dxhat, dweight, dbias = affine_backward(
        dy, xhat, cache["weight"], cache["has_bias"], cache["param_axes"]
    )
    if axes is None:
        dx = dxhat * rstd
    else:
        dx = normalize_backward(dxhat, xhat, rstd, axes)
    return {"dx": dx, "dweight": dweight, "dbias": dbias}
