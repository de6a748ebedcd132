"""Layer normalization (Ba et al., 2016), float64 NumPy.

``layer_norm``: torch semantics. Per leading index, over the last k = len(normalized_shape)
dims:  xhat = (x - mean) / sqrt(var + eps) (var biased),  y = weight * xhat + bias,
with weight/bias of shape ``normalized_shape`` (elementwise affine).

``layer_norm2d``: normalizes dim 1 (C) of an (N, C, *S) tensor per (n, position), with
per-channel weight/bias of shape (C,) (the "LayerNorm2d" of ConvNeXt-style models).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._common import affine_forward, as_f64, make_cache, norm_backward, standardize


def _normalized_tuple(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int | np.integer):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def layer_norm_forward(
    x, normalized_shape, weight=None, bias=None, eps: float = 1e-5
) -> tuple[np.ndarray, dict]:
    """Layer norm forward over the last ``len(normalized_shape)`` dims; returns ``(y, cache)``."""
    x = as_f64(x)
    shape = _normalized_tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"layer norm: input shape {x.shape} must end with normalized_shape {shape}"
        )
    weight, bias = as_f64(weight), as_f64(bias)
    axes = tuple(range(x.ndim - k, x.ndim))
    xhat, _, rstd = standardize(x, axes, eps)
    cache = make_cache(x, xhat, rstd, axes, weight, bias, axes)
    return affine_forward(xhat, weight, bias, axes), cache


def layer_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias"}`` (None where weight/bias was None).

    Over the normalized dims, with ``dxhat = dy * weight``:
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``;
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over the leading dims.
    """
    return norm_backward(dy, cache)


def layer_norm2d_forward(x, weight=None, bias=None, eps: float = 1e-5) -> tuple[np.ndarray, dict]:
    """Channel layer norm of (N, C, *S): stats over C per (n, position); returns ``(y, cache)``."""
    x = as_f64(x)
    if x.ndim < 2:
        raise ValueError(f"layer norm 2d expects input of shape (N, C, *spatial), got {x.shape}")
    weight, bias = as_f64(weight), as_f64(bias)
    xhat, _, rstd = standardize(x, (1,), eps)
    cache = make_cache(x, xhat, rstd, (1,), weight, bias, (1,))
    return affine_forward(xhat, weight, bias, (1,)), cache


def layer_norm2d_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias"}``; the normalize backward runs over C only."""
    return norm_backward(dy, cache)
