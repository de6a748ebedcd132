"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), float64 NumPy.

Written in the paper's own terms, the raw moments ``μ = E[x]`` and ``ν = E[x²]``
(float64 makes ``ν − μ²`` safe on the test data): a previous iteration ``τ`` holds
``μ_τ, ν_τ``, their gradients with respect to the convolution's weight and that
weight ``θ_τ``; carried to the current weight ``θ``::

    μ̃_τ = μ_τ + ρ·⟨∂μ_τ/∂θ, θ − θ_τ⟩,   ν̃_τ = ν_τ + ρ·⟨∂ν_τ/∂θ, θ − θ_τ⟩

(per output channel, summed over its weights). Entries with ``ν̃_τ < μ̃_τ²`` are
left out; over this batch and the ``K − 1`` others, ``μ̄ = mean μ̃``, ``σ̄² = mean
ν̃ − μ̄²``, ``y = γ(x − μ̄)/sqrt(σ̄² + ε) + β``. The window is constant in backward.

``conv_moment_grads`` gives an iteration's entry from the convolution's input:
its output and the gradients of each channel's mean and mean square.
"""

from __future__ import annotations

import numpy as np

from ._common import as_f64


def conv2d_forward(x, weight, stride: int = 1, padding: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Convolution (no bias, no groups) of (N, Ci, H, W) by (Co, Ci, kh, kw); returns
    ``(y, patches)`` with ``patches[n, i, a, b, h, w]`` the input under weight tap (i, a, b)."""
    x, weight = as_f64(x), as_f64(weight)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = weight.shape[2:]
    ho = (xp.shape[2] - kh) // stride + 1
    wo = (xp.shape[3] - kw) // stride + 1
    patches = np.empty((x.shape[0], x.shape[1], kh, kw, ho, wo))
    for a in range(kh):
        for b in range(kw):
            patches[:, :, a, b] = xp[
                :, :, a : a + stride * ho : stride, b : b + stride * wo : stride
            ]
    y = np.einsum("niabhw,oiab->nohw", patches, weight)
    return y, patches


def conv_moment_grads(x, weight, stride: int = 1, padding: int = 0) -> dict:
    """One iteration's entry: the convolution's output ``y``, per channel ``mean``
    (E[y]), ``mean_sq`` (E[y²]) and their gradients with respect to ``weight``."""
    y, patches = conv2d_forward(x, weight, stride, padding)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    grad_mean = np.einsum("niabhw->iab", patches)[None] / m * np.ones((y.shape[1], 1, 1, 1))
    grad_mean_sq = 2.0 * np.einsum("nohw,niabhw->oiab", y, patches) / m
    return {
        "y": y,
        "mean": y.mean(axis=(0, 2, 3)),
        "mean_sq": (y * y).mean(axis=(0, 2, 3)),
        "grad_mean": grad_mean,
        "grad_mean_sq": grad_mean_sq,
    }


def cross_iteration_batch_norm_forward(
    x, past: list[dict], conv_weight, weight=None, bias=None, eps: float = 1e-5, rho: float = 1.0
) -> tuple[np.ndarray, dict]:
    """Training forward of (N, C, H, W) with ``past`` entries (dicts with ``mean``,
    ``mean_sq``, ``grad_mean``, ``grad_mean_sq``, ``conv_weight``); returns ``(y, cache)``."""
    x, theta = as_f64(x), as_f64(conv_weight)
    c = x.shape[1]
    mus, nus = [x.mean(axis=(0, 2, 3))], [(x * x).mean(axis=(0, 2, 3))]
    for e in past:
        dw = theta - as_f64(e["conv_weight"])
        mu = as_f64(e["mean"]) + rho * (as_f64(e["grad_mean"]) * dw).sum(axis=(1, 2, 3))
        nu = as_f64(e["mean_sq"]) + rho * (as_f64(e["grad_mean_sq"]) * dw).sum(axis=(1, 2, 3))
        keep = nu - mu * mu >= 0
        mus.append(np.where(keep, mu, np.nan))
        nus.append(np.where(keep, nu, np.nan))
    mu_all, nu_all = np.array(mus), np.array(nus)
    k = (~np.isnan(mu_all)).sum(axis=0).astype(np.float64)
    mean = np.nansum(mu_all, axis=0) / k
    var = np.nansum(nu_all, axis=0) / k - mean * mean
    rstd = 1.0 / np.sqrt(var + eps)
    shape = (1, c, 1, 1)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    y = xhat.copy()
    w, b = as_f64(weight), as_f64(bias)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    cache = {"xhat": xhat, "rstd": rstd, "k": k, "weight": w, "bias": b, "mean": mean, "var": var}
    return y, cache


def cross_iteration_batch_norm_backward(dy, cache: dict) -> dict:
    """Gradients of the training forward: ``dx``, ``dweight``, ``dbias``.

    Only this batch's ``μ`` and ``ν`` depend on ``x`` (each with weight 1/K), so per
    channel, with ``g = γ·dy`` and M values: ``dx = r·g − r/(KM)·Σg − r·x̂/(KM)·Σ g·x̂``.
    """
    dy = as_f64(dy)
    xhat, rstd, k, w = cache["xhat"], cache["rstd"], cache["k"], cache["weight"]
    shape = (1, xhat.shape[1], 1, 1)
    axes = (0, 2, 3)
    g = dy if w is None else dy * w.reshape(shape)
    m = xhat.size / xhat.shape[1]
    km = (k * m).reshape(shape)
    r = rstd.reshape(shape)
    sum_g = g.sum(axis=axes, keepdims=True)
    sum_gx = (g * xhat).sum(axis=axes, keepdims=True)
    dx = r * g - r * sum_g / km - r * xhat * sum_gx / km
    return {
        "dx": dx,
        "dweight": None if w is None else (dy * xhat).sum(axis=axes),
        "dbias": None if cache["bias"] is None else dy.sum(axis=axes),
    }
