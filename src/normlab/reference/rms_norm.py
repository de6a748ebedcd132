"""Root-mean-square normalization, float64 NumPy.

``rms_norm``: per leading index, over the last k = len(normalized_shape) dims:
``r = 1 / sqrt(mean(x²) + eps)``, ``xhat = x · r``, ``y = weight · xhat``; no mean is
subtracted and there is no bias. ``eps=None`` is float64's machine epsilon, what torch
uses for float64 input (for float32 and half input torch uses float32's: pass it).

``rms_norm2d``: the same over dim 1 (C) of an (N, C, *S) tensor per (n, position), with a
per-channel weight of shape (C,).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._common import as_f64


def rms_norm_forward(
    x, normalized_shape: int | Sequence[int], weight=None, eps: float | None = None
) -> tuple[np.ndarray, dict]:
    """RMS norm forward over the last ``len(normalized_shape)`` dims; returns ``(y, cache)``."""
    x = as_f64(x)
    shape = (int(normalized_shape),) if np.ndim(normalized_shape) == 0 else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(f"rms norm: input shape {x.shape} must end with normalized_shape {shape}")
    return _forward(x, tuple(range(x.ndim - k, x.ndim)), as_f64(weight), eps)


def rms_norm2d_forward(x, weight=None, eps: float | None = None) -> tuple[np.ndarray, dict]:
    """Channel RMS norm of (N, C, *S): over C per (n, position); returns ``(y, cache)``."""
    x = as_f64(x)
    if x.ndim < 2:
        raise ValueError(f"rms norm 2d expects input of shape (N, C, *spatial), got {x.shape}")
    weight = as_f64(weight)
    w = None if weight is None else weight.reshape(-1, *([1] * (x.ndim - 2)))
    return _forward(x, (1,), w, eps)


def _forward(x: np.ndarray, axes: tuple[int, ...], weight, eps: float | None):
    e = float(np.finfo(np.float64).eps) if eps is None else float(eps)
    r = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + e)
    xhat = x * r
    y = xhat if weight is None else xhat * weight
    return y, {"xhat": xhat, "r": r, "axes": axes, "weight": weight}


def rms_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight"}`` (``dweight`` None without weight).

    With ``g = dy · weight``: ``dx = r · (g − xhat · mean(g · xhat))`` over the normalized
    dims (the mean square's derivative; no mean-subtraction term), and
    ``dweight = Σ dy · xhat`` over the other dims.
    """
    dy = as_f64(dy)
    xhat, r, axes, weight = cache["xhat"], cache["r"], cache["axes"], cache["weight"]
    g = dy if weight is None else dy * weight
    dx = r * (g - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    if weight is None:
        return {"dx": dx, "dweight": None}
    # weight varies along the normalized dims (C for rms_norm2d): sum over the others.
    leading = tuple(a for a in range(dy.ndim) if a not in axes)
    return {"dx": dx, "dweight": (dy * xhat).sum(axis=leading)}


def rms_norm2d_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight"}`` of :func:`rms_norm2d_forward` (normalize over C)."""
    return rms_norm_backward(dy, cache)
