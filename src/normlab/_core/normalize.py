"""The second half of every norm: normalize with given statistics, then affine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .export import onnx_exporting, rsqrt
from .stats import acc_dtype


def channel_shape(x: Tensor, channel_dim: int = 1) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``x``."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    return shape


def affine_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x − mean)·γ/sqrt(var + eps) + β`` with per-channel (dim 1) *stored* statistics.

    Written as ``(x − mean)·scale + β`` and not ``x·scale + (β − mean·scale)``:
    the folded form cancels catastrophically on off-center data (mean 1e4, std
    1e-2 loses every digit in fp32), the subtraction of a nearby mean does not.
    Computed in the accumulation dtype; returned in ``x``'s dtype. ``var`` is
    used as given (no clamp): the callers pass it through
    :func:`normlab._core.checks.stored_variance`.

    Where the fold is provably accurate (eager fp32/fp64 CPU, every channel's
    ``|mean|/σ ≤`` :data:`FOLD_MAX_RATIO`: at most 3 bits lost), the one-pass folded
    form runs instead (torch's own eval kernel; ``x·a + b`` where only the input
    needs a gradient). Otherwise, by what autograd needs (the centered formula, the
    fastest torch ops for each):

    * no gradient for γ, β, mean or var: ``x − mean``, then torch's eval
      ``F.batch_norm`` on the centered data with mean 0 (its kernel's folding,
      ``xc·(γ/σ) + (β − 0)``, is exact there): two vectorized passes. Where the
      input needs a gradient, ``xc·scale + β`` instead, whose backward is one
      multiply (F.batch_norm's native backward does more work and saves ``xc``).
    * γ or β need a gradient: ``x − mean``, then F.batch_norm, whose native
      backward computes the input, γ and β gradients in one reduction and one
      elementwise pass.
    * mean or var need a gradient (F.batch_norm gives them none), or a graph is
      recorded (:func:`normlab._core.export.recording`: one graph whatever the
      autograd state of the call): the composite ``xc·scale + β``.

    Under ONNX export it is :func:`torch.nn.functional.batch_norm` with these
    statistics instead, which exports as one ``BatchNormalization`` node (see
    :mod:`normlab._core.export`).
    """
    acc = acc_dtype(x.dtype)
    if onnx_exporting():  # eval-mode F.batch_norm in acc; no Cast where dtypes agree
        y = F.batch_norm(
            _cast(x, acc), _cast(mean, acc), _cast(var, acc), _cast(weight, acc), _cast(bias, acc),
            False, 0.0, eps,
        )  # fmt: skip
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if _fold_is_accurate(x, mean, var, eps):
        return _folded(x, mean, var, weight, bias, eps)
    shape = channel_shape(x)
    # x − mean in acc (type promotion: one pass for half input, no separate cast).
    xc = torch.sub(x, mean.to(acc).reshape(shape))
    w, b = _cast(weight, acc), _cast(bias, acc)
    affine_grad = any(t is not None and t.requires_grad for t in (weight, bias))
    input_grad_only = torch.is_grad_enabled() and x.requires_grad and not affine_grad
    # torch.jit.is_tracing(): what recording() adds to the ONNX export handled above.
    traced = torch.jit.is_tracing()
    if not (mean.requires_grad or var.requires_grad or input_grad_only or traced):
        zero = torch.zeros(x.shape[1], dtype=acc, device=x.device)
        y = F.batch_norm(xc, zero, _cast(var, acc), w, b, False, 0.0, eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    scale = rsqrt(var.to(acc) + eps)
    y = xc * (scale if w is None else scale * w).reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y if y.dtype == x.dtype else y.to(x.dtype)


#: The fold ``x·a + (β − μ·a)`` (``a = γ/σ``) adds a rounding error of about
#: ``2·|μ|/σ`` units in the last place of ``|γ|`` over the centered form. Where every
#: channel has ``|μ|/σ ≤ FOLD_MAX_RATIO`` that is at most 8 ulps (3 bits), and the
#: one-pass fold runs; off-center data (CT: ``|μ|/σ ≈ 1e6``) take the centered form.
FOLD_MAX_RATIO = 4.0


def _fold_is_accurate(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> bool:
    """Whether the one-pass folded form is within :data:`FOLD_MAX_RATIO`'s bound here.

    Only for eager fp32/fp64 CPU input with statistics that need no gradient: the
    test reads one number on the host (free on CPU; a synchronization on a GPU,
    where the centered form runs instead) and is data-dependent (so never while
    compiling, recording a graph or under a ``torch.func`` transform).
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or mean.requires_grad
        or var.requires_grad
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or x.numel() == 0
    ):
        return False
    # |μ|/σ ≤ R  ⟺  var − μ²/R² ≥ −eps: one fused op and one reduction (NaN: False).
    slack = float(torch.addcmul(var, mean, mean, value=-1.0 / FOLD_MAX_RATIO**2).amin())
    return slack >= -eps


def _folded(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """The folded eval form: torch's native eval kernel (one pass; its backward gives
    γ and β their gradients), or, where only the input needs a gradient,
    ``x·a + (β − μ·a)`` (its backward is one multiply and saves nothing input-sized;
    ``addcmul``'s backward is slower)."""
    dt = x.dtype
    w, b = _cast(weight, dt), _cast(bias, dt)
    affine_grad = any(t is not None and t.requires_grad for t in (weight, bias))
    if not (torch.is_grad_enabled() and x.requires_grad) or affine_grad:
        return F.batch_norm(x, _cast(mean, dt), _cast(var, dt), w, b, False, 0.0, eps)
    shape = channel_shape(x)
    with torch.no_grad():
        a = torch.rsqrt(var.to(dt) + eps)
        if w is not None:
            a = a * w
        shift = -mean.to(dt) * a if b is None else b - mean.to(dt) * a
    return x * a.reshape(shape) + shift.reshape(shape)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)
