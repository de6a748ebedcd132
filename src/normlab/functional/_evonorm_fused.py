r"""EvoNorm-B0 and EvoNorm-S0 in fused eager passes (torch ops, no Triton): forward and backward.

The autograd.Functions of :mod:`normlab.functional._evonorm_autograd` call these:
each forward returns the output plus the per-(sample, channel) vectors backward
needs, and each backward recomputes the rest from ``x``. Kept apart from the
Functions because this is the numerics (statistics, the derived gradients and
their buffer reuse), while the Functions only decide what to save and when to
fall back to the composite.

**Statistics.** Per (n, c) over the spatial dims (:func:`split_moments`), the
statistics core's rule with its one-pass path
(:func:`normlab._core.stats.one_pass_moments`)::

    m0 = x[n, c, 0, ...]         (the pivot: an element of the group)
    d  = x − m0                  (exact where x is near m0, Sterbenz)
    md = mean(d),  var = max(mean(d²) − md², 0)   (two passes where that would cancel)

The mean stays split as ``m0 + md`` (never rounded back to one number), so
the group/batch variances are exact mixtures of those moments
(:func:`normlab._core.stats.mix_group_moments`, the law of total
variance) around a pivot, and ``x − mean`` in backward is ``(x − m0) − md``:
accurate on off-center data (mean 1e4, std 1e-2) in fp32.

**EvoNorm-B0.** With σ_B (per c) and σ_I (per (n, c)) the batch and instance
stds (``sqrt(var + ε)``)::

    i   = v·x + σ_I,   inst = [i > σ_B],   den = max(i, σ_B)   (ties: batch side)
    y   = γ·x/den + β

Backward, with ``t = dy/den``, ``w = dy·x/den²`` and ``wm = w·inst``
(``∂L/∂den = −γ·w``)::

    ∂L/∂β = Σ dy,   ∂L/∂γ = Σ t·x,   ∂L/∂v = −γ Σ wm·x
    ∂L/∂σ_I = −γ Σ_s wm,               K_I = ∂L/∂σ_I / (σ_I·S)
    ∂L/∂σ_B = −γ Σ_{n,s} (w − wm),      K_B = ∂L/∂σ_B / (σ_B·N·S)   (training only)
    ∂L/∂x = γ·t − γ·v·wm + K_I·(x − μ_I) + K_B·(x − μ_B)
          = γ·t − γ·v·wm + (K_I + K_B)·(x − μ_I) + K_B·(μ_I − μ_B)

(``∂σ/∂x = (x − μ)/(σ·count)`` for a biased variance.) In eval σ_B is the
running one and carries no gradient. These passes work in units of σ_B
(``e = den/σ_B = max(v·x/σ_B + σ_I/σ_B, 1)``): the max is a clamp at the scalar
1 and the instance side is exactly ``e > 1``, recomputed bit for bit in backward.

**EvoNorm-S0.** With ``s = sigmoid(v·x)``, ``f = x·s`` and r = 1/σ_g per
(n, group) over ``M = C/G·S`` values::

    y = γ·r·f + β
    ∂f/∂x = s + v·x·s(1 − s) = silu'(v·x),   ∂f/∂v = x²·s(1 − s)

    A     = Σ_s dy·f  (per (n, c)),   ∂L/∂r_g = Σ_{c∈g} γ_c·A
    k     = −r³·∂L/∂r_g / M          (∂L/∂var_g = −½r³·∂L/∂r_g, ∂var/∂x = 2(x − μ_g)/M)
    ∂L/∂x = γ·r·dy·silu'(v·x) + k·(x − μ_g)
    ∂L/∂γ = Σ_n r·A,   ∂L/∂v = Σ_n γ·r·Σ_s dy·x²·s(1 − s),   ∂L/∂β = Σ dy
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._core.export import rsqrt
from .._core.fused import backward_views, cast, param
from .._core.normalize import channel_shape
from .._core.running import update_running_stats
from .._core.stats import (
    acc_dtype,
    dot_sums,
    mix_group_moments,
    one_pass_moments,
    pivot,
    reduced_count,
)

__all__ = ["b0_backward", "b0_forward", "s0_backward", "s0_forward", "split_moments"]


def split_moments(xa: Tensor, workspace: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(m0, md, var)`` of ``xa`` per (n, c) over the spatial dims (kept): mean
    ``m0 + md`` with ``m0`` the pivot, biased variance (see the module doc).

    ``xa`` in the accumulation dtype. ``x − m0`` is written into ``workspace`` (a
    full-size buffer the caller reuses afterwards, e.g. for the output) instead of
    a fresh allocation; two passes in all (the shift, one reduction).
    """
    m0 = pivot(xa, range(2, xa.dim()))
    d = xa - m0 if workspace is None else torch.sub(xa, m0, out=workspace)
    md, var, _ = one_pass_moments(d, per_sample=True)
    return m0, md, var


# ------------------------------------------------------------------------------ B0


def b0_forward(
    x: Tensor,  # (N, C, *S)
    v: Tensor,  # (C,)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    running_var: Tensor | None,  # (C,) read in eval, updated in training
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, ...]:
    """``(y, sig_i, sig_b, m0, md, dmu)``: the output and what backward needs.

    One full-size allocation: the statistics' workspace becomes the output.
    Training updates ``running_var`` in place (unbiased batch variance, torch's
    momentum convention), as the composite does.
    """
    acc = acc_dtype(x.dtype)
    shape = channel_shape(x)
    spatial = tuple(range(2, x.dim()))
    xa = cast(x, acc)
    buf = torch.empty_like(xa)
    m0, md, var_i = split_moments(xa, workspace=buf)
    sig_i = torch.sqrt(var_i + eps)  # (N, C, 1, ...)
    dmu = None
    if training:
        # Instance means relative to sample 0's m0 (exact differences of nearby
        # values), mixed exactly into the batch moments.
        rel = (m0 - m0[:1]).add_(md)
        mean_b, var_b = mix_group_moments(rel, var_i, (0,))
        dmu = rel - mean_b  # μ_I − μ_B
        if running_var is not None:
            n = reduced_count(x, (0, *spatial))
            update_running_stats(None, running_var, mean_b, var_b * (n / (n - 1)), momentum)
    else:
        assert running_var is not None  # checked by the caller
        var_b = cast(running_var, acc).reshape(shape)
    sig_b = torch.sqrt(var_b.clamp_min(0) + eps)  # (1, C, 1, ...)
    rb = sig_b.reciprocal()
    y = _b0_den(xa, v, sig_i, rb, out=buf)
    y = torch.div(xa, y, out=y)
    y.mul_(rb if weight is None else rb * param(weight, acc, shape))
    if bias is not None:
        y.add_(param(bias, acc, shape))
    return cast(y, x.dtype), sig_i, sig_b, m0, md, dmu


def _b0_den(xa: Tensor, v: Tensor, sig_i: Tensor, rb: Tensor, out: Tensor | None = None) -> Tensor:
    """``e = den/σ_B = max(v·x/σ_B + σ_I/σ_B, 1)`` (in ``out``, or a fresh buffer).

    In units of σ_B the max is a clamp at the scalar 1 (one fast pass), and in
    backward the instance side is exactly ``e > 1`` (ties: batch side), a scalar
    threshold: no mask tensor, no per-channel comparison. The composite's
    where(i > σ_B, i, σ_B) gives the same value (only a NaN differs: it propagates).
    """
    vb = param(v, xa.dtype, channel_shape(xa)).mul(rb)
    e = xa * vb if out is None else torch.mul(xa, vb, out=out)
    return e.add_(sig_i * rb).clamp_min_(1.0)


def b0_backward(
    dy: Tensor,  # (N, C, *S)
    x: Tensor,  # (N, C, *S)
    v: Tensor,  # (C,)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    sig_i: Tensor,  # (N, C, 1, ...) instance std
    sig_b: Tensor,  # (1, C, 1, ...) batch or running std
    m0: Tensor,  # (N, C, 1, ...) instance mean = m0 + md
    md: Tensor,  # (N, C, 1, ...)
    dmu: Tensor | None,  # (N, C, 1, ...) μ_I − μ_B (training) or None (eval)
    needs: Sequence[bool],  # needs_input_grad of (x, v, weight, bias)
) -> tuple[Tensor | None, ...]:
    # The module doc's formulas with den = σ_B·e (e = _b0_den): t = rb·(dy/e) and
    # w = rb²·(dy·x/e²), rb = 1/σ_B; the per-channel factors are applied to the
    # (N, C) sums and to the coefficients, not to full tensors. Two full-size
    # buffers: e (which becomes ∂L/∂x) and w.
    acc = sig_i.dtype
    shape, dims, all_dims, xa, dya = backward_views(x, dy, acc)
    rb = sig_b.reciprocal()
    g_rb = rb if weight is None else rb * param(weight, acc, shape)  # γ·rb
    neg_g = -g_rb * rb  # −γ·rb²: ∂L/∂den = neg_g·w
    e = _b0_den(xa, v, sig_i, rb)
    w = torch.mul(dya, xa).div_(e).div_(e)  # dy·x/e²
    sum_w, sum_we = dot_sums(w, e, per_sample=False)  # Σ w and Σ w·e = Σ dy·x/e
    dweight = dbias = dv = dx = None
    if weight is not None and needs[2]:
        dweight = (rb * sum_we).reshape(-1).to(weight.dtype)
    if bias is not None and needs[3]:
        dbias = dya.sum(dim=all_dims).to(bias.dtype)
    wm = torch.ops.aten.threshold_backward.grad_input(w, e, 1.0, grad_input=w)  # w·inst
    swm, swmx = dot_sums(wm, xa, per_sample=True)  # Σ_s wm, Σ_s wm·x per (n, c)
    if needs[1]:
        dv = (neg_g * swmx.sum(dim=0, keepdim=True)).reshape(-1).to(v.dtype)
    if needs[0]:
        k = neg_g * swm / (sig_i * reduced_count(x, dims))  # K_I = ∂L/∂σ_I / (σ_I·S)
        shift = -k * md
        if dmu is not None:  # training: σ_B is a batch statistic
            k_b = (
                neg_g
                * (sum_w - swm.sum(dim=0, keepdim=True))
                / (sig_b * reduced_count(x, all_dims))
            )
            k = k + k_b
            shift = -k * md + k_b * dmu
        # γ·t − γ·v·wm + K·((x − m0) − md) + K_B·(μ_I − μ_B), t = dy/e (in e's buffer)
        dx = torch.div(dya, e, out=e).mul_(g_rb).addcmul_(wm, neg_g * param(v, acc, shape))
        dx.addcmul_(torch.sub(xa, m0, out=w), k).add_(shift)
        dx = cast(dx, x.dtype)
    return dx, dv, dweight, dbias


# ------------------------------------------------------------------------------ S0


def s0_forward(
    x: Tensor,  # (N, C, *S)
    num_groups: int,
    v: Tensor,  # (C,)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    eps: float,
) -> tuple[Tensor, ...]:
    """``(y, r, pivot, mean_rel)``, the last three (N, C, 1, ...): 1/σ_g and μ_g = pivot + mean_rel.

    One full-size allocation: the statistics' workspace becomes the output.
    """
    n, c = x.shape[:2]
    cpg = c // num_groups
    acc = acc_dtype(x.dtype)
    shape = channel_shape(x)
    ones = [1] * (x.dim() - 2)
    xa = cast(x, acc)
    buf = torch.empty_like(xa)
    m0, md, var = split_moments(xa, workspace=buf)
    m0 = m0.reshape(n, num_groups, cpg)
    # Channel means relative to the group's first channel's m0 (exact differences
    # of nearby values), mixed exactly into the group moments.
    pivot = m0[:, :, :1]
    rel = (m0 - pivot).add_(md.reshape(n, num_groups, cpg))
    mean_rel, group_var = mix_group_moments(rel, var.reshape(n, num_groups, cpg), (2,))

    def per_channel(t: Tensor) -> Tensor:  # (N, G, 1) -> (N, C, 1, ...)
        return t.expand(n, num_groups, cpg).reshape(n, c, *ones)

    r = per_channel(rsqrt(group_var + eps))
    f = torch.mul(xa, param(v, acc, shape), out=buf).sigmoid_().mul_(xa)
    f.mul_(r if weight is None else r * param(weight, acc, shape))
    if bias is not None:
        f.add_(param(bias, acc, shape))
    return cast(f, x.dtype), r, per_channel(pivot), per_channel(mean_rel)


def s0_backward(
    dy: Tensor,  # (N, C, *S)
    x: Tensor,  # (N, C, *S)
    v: Tensor,  # (C,)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    r: Tensor,  # (N, C, 1, ...) group 1/std
    pivot: Tensor,  # (N, C, 1, ...) group mean = pivot + mean_rel
    mean_rel: Tensor,  # (N, C, 1, ...)
    num_groups: int,
    needs: Sequence[bool],  # needs_input_grad of (x, v, weight, bias)
) -> tuple[Tensor | None, ...]:
    # Two full-size buffers: s (which becomes ∂L/∂x) and p.
    acc = r.dtype
    shape, dims, all_dims, xa, dya = backward_views(x, dy, acc)
    n, c = x.shape[:2]
    vb = param(v, acc, shape)
    gamma = param(weight, acc, shape)
    gr = r if gamma is None else gamma * r
    s = (xa * vb).sigmoid_()
    p = torch.ops.aten.sigmoid_backward(dya, s)  # dy·s(1 − s)
    w = s.mul_(dya)  # dy·s
    _, a = dot_sums(w, xa, per_sample=True)  # A = Σ_s dy·f, (N, C, 1, ...)
    xp = p.mul_(xa)  # dy·x·s(1 − s)
    dv = dweight = dbias = dx = None
    if needs[1]:
        _, b = dot_sums(xp, xa, per_sample=True)  # Σ_s dy·x²·s(1 − s)
        dv = (gr * b).sum(dim=0).reshape(-1).to(v.dtype)
    if weight is not None and needs[2]:
        dweight = (r * a).sum(dim=0).reshape(-1).to(weight.dtype)
    if bias is not None and needs[3]:
        dbias = dya.sum(dim=all_dims).to(bias.dtype)
    if needs[0]:
        ga = a if gamma is None else gamma * a
        cpg = c // num_groups
        dr = ga.reshape(n, num_groups, cpg).sum(dim=2, keepdim=True).expand(n, num_groups, cpg)
        k = dr.reshape(a.shape) * r.pow(3) * (-1.0 / (cpg * reduced_count(x, dims)))
        # γ·r·dy·silu'(v·x) + k·((x − pivot) − mean_rel)
        dx = w.addcmul_(xp, vb).mul_(gr)
        dx.addcmul_(torch.sub(xa, pivot, out=p), k).sub_(k * mean_rel)
        dx = cast(dx, x.dtype)
    return dx, dv, dweight, dbias
