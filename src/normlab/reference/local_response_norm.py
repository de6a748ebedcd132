"""Local response normalization across channels (Krizhevsky et al., 2012), float64 NumPy.

torch.nn.functional.local_response_norm semantics, for (N, C, *S) input of rank >= 3:

    s_c   = sum_{c' in W(c)} x_{c'}^2,    W(c) = [c - size//2, c + (size-1)//2] ∩ [0, C)
    d_c   = k + alpha / size * s_c        (the divisor is always ``size``: zero padding)
    y_c   = x_c / d_c^beta

Backward (j in W(c)  <=>  c in [j - (size-1)//2, j + size//2]):

    dx_j = dy_j / d_j^beta
           - 2 beta alpha / size * x_j * sum_{c: j in W(c)} dy_c x_c d_c^(-beta-1)
"""

from __future__ import annotations

import numpy as np

from ._common import as_f64, check_dy


def _window_sum(a: np.ndarray, before: int, after: int) -> np.ndarray:
    """``out[:, c] = sum of a[:, c'] for c' in [c - before, c + after]``, clipped to [0, C)."""
    c = a.shape[1]
    out = np.zeros_like(a)
    for offset in range(-before, after + 1):
        # out[:, lo:hi] += a[:, lo + offset : hi + offset], keeping both ranges inside [0, C)
        lo, hi = max(0, -offset), min(c, c - offset)
        if lo < hi:
            out[:, lo:hi] += a[:, lo + offset : hi + offset]
    return out


def local_response_norm_forward(
    x, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> tuple[np.ndarray, dict]:
    """LRN forward; returns ``(y, cache)``. Raises ValueError for rank < 3 (as torch does)."""
    x = as_f64(x)
    if x.ndim < 3:
        raise ValueError(
            f"local response norm expects input of rank >= 3 (N, C, *spatial), got {x.shape}"
        )
    if size < 1:
        raise ValueError(f"local response norm: size must be >= 1, got {size}")
    d = k + alpha / size * _window_sum(x * x, size // 2, (size - 1) // 2)
    y = x * d**-beta
    cache = {"shape": x.shape, "x": x, "d": d, "size": size, "alpha": alpha, "beta": beta}
    return y, cache


def local_response_norm_backward(dy, cache: dict) -> dict:
    """Gradient ``{"dx"}`` of LRN (see the module docstring for the formula)."""
    dy = check_dy(dy, cache)
    x, d, size = cache["x"], cache["d"], cache["size"]
    alpha, beta = cache["alpha"], cache["beta"]
    t = dy * x * d ** (-beta - 1.0)
    # the transpose of the forward window: before/after swap
    back = _window_sum(t, (size - 1) // 2, size // 2)
    dx = dy * d**-beta - (2.0 * beta * alpha / size) * x * back
    return {"dx": dx}
