"""Weight centralization and weight standardization of a conv weight, float64 NumPy.

For a weight of shape (C_out, C_in/groups, *kernel), per output filter o over
the axes (1, ..., ndim-1):

    centered:      what = w - mean(w)
                   dw   = dwhat - mean(dwhat)
    standardized:  what = (w - mean(w)) / sqrt(var(w) + eps)      (var biased)
                   dw   = rstd * (dwhat - mean(dwhat) - what * mean(dwhat * what))

The backward returns ``{"dweight": dw}``.
"""

from __future__ import annotations

import numpy as np

from ._common import as_f64, normalize_backward, standardize


def _filter_axes(w: np.ndarray) -> tuple[int, ...]:
    if w.ndim < 2:
        raise ValueError(f"expected a weight of shape (C_out, C_in/groups, *kernel), got {w.shape}")
    return tuple(range(1, w.ndim))


def centered_weight_forward(weight) -> tuple[np.ndarray, dict]:
    """``what = w - mean(w)`` per output filter; returns ``(what, cache)``."""
    w = as_f64(weight)
    axes = _filter_axes(w)
    return w - w.mean(axis=axes, keepdims=True), {"shape": w.shape, "axes": axes}


def centered_weight_backward(dwhat, cache: dict) -> dict:
    """``{"dweight": dwhat - mean(dwhat)}`` per output filter."""
    d = np.asarray(dwhat, dtype=np.float64)
    if d.shape != cache["shape"]:
        raise ValueError(f"dwhat has shape {d.shape}, expected {cache['shape']}")
    return {"dweight": d - d.mean(axis=cache["axes"], keepdims=True)}


def standardized_weight_forward(weight, eps: float = 1e-5) -> tuple[np.ndarray, dict]:
    """``what = (w - mean(w)) / sqrt(var(w) + eps)`` per output filter."""
    w = as_f64(weight)
    axes = _filter_axes(w)
    what, _, rstd = standardize(w, axes, eps)
    return what, {"shape": w.shape, "axes": axes, "what": what, "rstd": rstd}


def standardized_weight_backward(dwhat, cache: dict) -> dict:
    """``{"dweight": rstd * (dwhat - mean(dwhat) - what * mean(dwhat * what))}``."""
    d = np.asarray(dwhat, dtype=np.float64)
    if d.shape != cache["shape"]:
        raise ValueError(f"dwhat has shape {d.shape}, expected {cache['shape']}")
    return {"dweight": normalize_backward(d, cache["what"], cache["rstd"], cache["axes"])}
