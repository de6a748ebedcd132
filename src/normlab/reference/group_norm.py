"""Group normalization (Wu & He, ECCV 2018), float64 NumPy.

The C channels are split into G groups of C/G consecutive channels; per (n, g), over
the group's channels and all spatial positions (C/G, *S):

    xhat = (x - mean) / sqrt(var + eps)      (var biased)
    y = weight[c] * xhat + bias[c]           (per-channel affine)

G = 1 is LayerNorm over (C, *S); G = C is InstanceNorm.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    affine_backward,
    affine_forward,
    as_f64,
    check_dy,
    normalize_backward,
    standardize,
)

_CHANNEL = (1,)
_GROUP_AXES = (2,)  # of the (N, G, C/G * prod(S)) view


def group_norm_forward(
    x, num_groups: int, weight=None, bias=None, eps: float = 1e-5
) -> tuple[np.ndarray, dict]:
    """Group norm forward on (N, C, *S) input (rank >= 2); returns ``(y, cache)``."""
    x = as_f64(x)
    if x.ndim < 2:
        raise ValueError(f"group norm expects input of shape (N, C, *spatial), got {x.shape}")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups != 0:
        raise ValueError(
            f"group norm: num_channels={c} must be divisible by num_groups={num_groups}"
        )
    weight, bias = as_f64(weight), as_f64(bias)
    grouped = x.reshape(n, num_groups, -1)
    xhat_g, _, rstd = standardize(grouped, _GROUP_AXES, eps)
    xhat = xhat_g.reshape(x.shape)
    y = affine_forward(xhat, weight, bias, _CHANNEL)
    cache = {
        "shape": x.shape,
        "num_groups": num_groups,
        "xhat": xhat,
        "rstd": rstd,  # (N, G, 1)
        "weight": weight,
        "has_bias": bias is not None,
    }
    return y, cache


def group_norm_backward(dy, cache: dict) -> dict:
    """Gradients ``{"dx", "dweight", "dbias"}`` (None where weight/bias was None).

    ``dxhat = dy * weight[c]``; then per (n, g), over the group's (C/G, *S) elements,
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``.
    ``dweight[c] = sum(dy * xhat)``, ``dbias[c] = sum(dy)`` over (N, *S).
    """
    dy = check_dy(dy, cache)
    xhat = cache["xhat"]
    dxhat, dweight, dbias = affine_backward(dy, xhat, cache["weight"], cache["has_bias"], _CHANNEL)
    n, g = dy.shape[0], cache["num_groups"]
    dx = normalize_backward(
        dxhat.reshape(n, g, -1), xhat.reshape(n, g, -1), cache["rstd"], _GROUP_AXES
    )
    return {"dx": dx.reshape(dy.shape), "dweight": dweight, "dbias": dbias}
