"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .feed import feed
from .kinds import is_batch_norm, is_frozen_batch_norm

__all__ = ["fuse_conv_bn"]


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fold(
    lin: nn.Module, bn: nn.Module, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Folded (weight, bias) of ``bn(lin(x))`` in ``dtype``."""
    w = lin.weight.detach().to(dtype)
    out = w.shape[0]
    b = lin.bias.detach().to(dtype) if lin.bias is not None else w.new_zeros(out)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else w.new_ones(out)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else w.new_zeros(out)
    mean = bn.running_mean.detach().to(dtype)
    var = bn.running_var.detach().to(dtype)
    scale = gamma * torch.rsqrt(var + float(getattr(bn, "eps", 1e-5)))
    return w * scale.reshape(-1, *([1] * (w.dim() - 1))), (b - mean) * scale + beta


def _fused_module(lin: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    fused = copy.deepcopy(lin)
    ref = lin.weight
    with torch.no_grad():
        fused.weight.copy_(weight.to(ref.dtype))
        if fused.bias is None:
            fused.bias = nn.Parameter(ref.new_zeros(ref.shape[0]), requires_grad=ref.requires_grad)
        fused.bias.copy_(bias.to(ref.dtype))
    return fused


def _probe(lin: nn.Module) -> Tensor:
    """A small float64 input that ``lin`` accepts."""
    if isinstance(lin, nn.Linear):
        return torch.randn(2, lin.in_features, dtype=torch.float64)
    sizes = []
    for i in range(len(lin.kernel_size)):
        extent = lin.dilation[i] * (lin.kernel_size[i] - 1) + 1
        pad = lin.padding[i] if isinstance(lin.padding, tuple) else extent
        sizes.append(extent + pad + lin.stride[i])
    return torch.randn(2, lin.in_channels, *sizes, dtype=torch.float64)


def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def _default_tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)


def _mismatch(got: Tensor, want: Tensor, rtol: float, atol: float) -> float | None:
    """Largest violation of ``|got - want| <= atol·max(1, max|want|) + rtol·|want|``."""
    g, w = got.detach().double(), want.detach().double()
    scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
    err = (g - w).abs() - (atol * scale + rtol * w.abs())
    worst = float(err.max()) if err.numel() else 0.0
    return None if worst <= 0 else float((g - w).abs().max())


def fuse_conv_bn(
    model: nn.Module,
    check_inputs: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> nn.Module:
    """Fold eval-mode BatchNorm / frozen BatchNorm into the Conv or Linear before it.

    .. math:: W' = W\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}},\\qquad
              b' = (b - \\mu)\\,\\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

    **Scope**: adjacent pairs ``(conv, bn)`` inside ``nn.Sequential`` containers
    (at any depth), where conv is exactly ``nn.Conv1d/2d/3d`` or ``nn.Linear``
    (subclasses such as weight-standardized convs transform their weight in
    forward and cannot be folded) and bn is a BatchNorm (:func:`is_batch_norm`)
    or frozen BatchNorm (:func:`is_frozen_batch_norm`). A conv without bias gets
    one. The conv is replaced by a fused copy and the BN by ``nn.Identity`` (so
    Sequential indices keep their meaning). Pairs wired in a custom ``forward``
    (``self.bn(self.conv(x))``) are not seen; torch.fx graphs are not handled.

    The folded weights are computed in float64 and each pair is checked
    numerically (float64, random probe input) before the model is touched.
    With ``check_inputs`` (a batch as accepted by
    :func:`normlab.recalibrate.recalibrate`), the whole model's outputs before
    and after are compared too, and the model is restored on a mismatch.

    Args:
        model: modified in place and returned. Must not be a bare conv or BN.
        check_inputs: optional example input (tensor, tuple, or dict).
        rtol, atol: tolerance of the ``check_inputs`` comparison (default by
            output dtype: 1e-8 fp64, 1e-4 fp32, 1e-2 otherwise; ``atol`` scales
            with the output's magnitude).

    Raises:
        ValueError: a BatchNorm next to a conv is in training mode or keeps no
            running statistics; the channel counts differ; or the conv is used in
            more than one place (folding would break the weight sharing).
        RuntimeError: the fused outputs do not match.
    """
    slots: dict[int, set[tuple[int, str]]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), set()).add((id(parent), name))
    paths = {id(m): p for p, m in reversed(list(model.named_modules(remove_duplicate=False)))}

    plan: list[tuple[nn.Sequential, str, str, nn.Module, nn.Module]] = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = [k for k, m in seq._modules.items() if m is not None]
        for k_lin, k_bn in zip(keys[:-1], keys[1:], strict=True):
            lin, bn = seq._modules[k_lin], seq._modules[k_bn]
            if type(lin) not in _FOLDABLE:
                continue
            frozen = is_frozen_batch_norm(bn)
            if not (frozen or is_batch_norm(bn)):
                continue
            where = paths.get(id(bn), k_bn) or "<model>"
            if not frozen and bn.training:
                raise ValueError(
                    f"fuse_conv_bn: {where} ({type(bn).__name__}) is in training mode, where it "
                    "normalizes with batch statistics that cannot be folded into weights. "
                    "Call model.eval() before fusing."
                )
            if getattr(bn, "running_mean", None) is None or bn.running_var is None:
                raise ValueError(
                    f"fuse_conv_bn: {where} keeps no running statistics "
                    "(track_running_stats=False) and normalizes with batch statistics even in "
                    "eval, which cannot be folded. Recreate it with track_running_stats=True "
                    "and recalibrate it first."
                )
            if lin.weight.shape[0] != bn.running_mean.shape[0]:
                raise ValueError(
                    f"fuse_conv_bn: {paths.get(id(lin), k_lin)} has {lin.weight.shape[0]} "
                    f"outputs but {where} has {bn.running_mean.shape[0]} channels."
                )
            if len(slots.get(id(lin), ())) > 1:
                raise ValueError(
                    f"fuse_conv_bn: {paths.get(id(lin), k_lin)} ({type(lin).__name__}) is "
                    f"registered in {len(slots[id(lin)])} places; folding {where} into it would "
                    "silently untie the shared weights. Give each use its own module (or "
                    "fuse a copy) first."
                )
            plan.append((seq, k_lin, k_bn, lin, bn))

    fused_modules = []
    for _, _, _, lin, bn in plan:
        w64, b64 = _fold(lin, bn)
        probe = _probe(lin)
        ref = copy.deepcopy(bn).double().eval()(copy.deepcopy(lin).double()(probe))
        got = _fused_module(copy.deepcopy(lin).double(), w64, b64)(probe)
        bad = _mismatch(got, ref, 1e-9, 1e-9)
        if bad is not None:
            raise RuntimeError(
                f"fuse_conv_bn: folding {paths.get(id(bn))} ({type(bn).__name__}) into "
                f"{paths.get(id(lin))} does not reproduce its output (max abs error {bad:.3g} "
                "in float64); this BN variant does not compute "
                "(x - running_mean) / sqrt(running_var + eps) * weight + bias."
            )
        fused_modules.append(_fused_module(lin, w64, b64))

    before = None
    if check_inputs is not None:
        with torch.no_grad():
            before = _flatten(feed(model, check_inputs, None))

    undo = []
    for (seq, k_lin, k_bn, lin, bn), fused in zip(plan, fused_modules, strict=True):
        undo.append((seq, k_lin, lin, k_bn, bn))
        setattr(seq, k_lin, fused)
        setattr(seq, k_bn, nn.Identity())

    if before is not None:
        with torch.no_grad():
            after = _flatten(feed(model, check_inputs, None))
        problem = None
        if len(after) != len(before):
            problem = f"{len(before)} output tensors before, {len(after)} after"
        for i, (a, b) in enumerate(zip(after, before, strict=False)):
            tol = _default_tol(b.dtype)
            bad = _mismatch(a, b, tol if rtol is None else rtol, tol if atol is None else atol)
            if bad is not None:
                problem = f"output {i} differs by up to {bad:.3g}"
                break
        if problem is not None:
            for seq, k_lin, lin, k_bn, bn in undo:
                setattr(seq, k_lin, lin)
                setattr(seq, k_bn, bn)
            raise RuntimeError(
                f"fuse_conv_bn: the fused model does not match the original on check_inputs "
                f"({problem}); the model was restored. Common causes: the model is in "
                "training mode (dropout, other batch-statistics layers), or fp16 weights."
            )
    return model
