"""Shared machinery of the fused CPU autograd.Functions.

Several norms (Switchable Norm, Batch Renorm, Filter Response Norm, EvoNorm) run
in eager CPU mode as one hand-written autograd.Function that saves only the
input plus small statistics and derives its gradient by hand. This module holds
what they share: when such a Function may run at all (:func:`fused_allowed`),
whether autograd records the call, the small casts and broadcasts of parameters
and statistics, the in-place ``dx`` update, and the double-backward fallback
that differentiates the plain graph instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from .normalize import channel_shape

__all__ = [
    "BackwardViews",
    "against",
    "apply_dx",
    "autograd_needed",
    "backward_views",
    "cast",
    "composite_grads",
    "eager_plain",
    "fused_allowed",
    "param",
]


def fused_allowed(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a fused Function may run on input ``x`` (with ``tensors``) instead of plain ops.

    Only for non-empty CPU tensors in eager mode: the Functions are written for
    CPU, and on other devices their data-dependent choices would be host syncs
    (CUDA keeps the plain path, or :mod:`normlab.kernels`). Not under
    ``torch.compile`` / ``torch.export`` (the compiler fuses the plain ops
    itself, and the exporters need them), ``torch.func`` transforms or
    forward-mode AD (the Functions define no vmap or jvp rule), TorchScript
    tracing or scripting, nor for tensor subclasses with ``__torch_function__``
    (DTensor and the like dispatch the plain ops, and would be bypassed by the
    Functions' in-place buffers). Those take the plain autograd path, which
    computes the same values.
    """
    return x.device.type == "cpu" and x.numel() > 0 and eager_plain(x, *tensors)


def eager_plain(*tensors: Tensor | None) -> bool:
    """Whether a hand-written Function (fused CPU or Triton) may replace the plain ops
    for ``tensors``: not under ``torch.compile``, ``torch.func`` transforms, forward-mode
    AD, TorchScript tracing or scripting, and no tensor subclass with
    ``__torch_function__`` among them (the reasons are in :func:`fused_allowed`)."""
    present = [t for t in tensors if t is not None]
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.overrides.has_torch_function(present)
    )


def autograd_needed(*tensors: Tensor | float | None) -> bool:
    """Whether autograd records this call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors
    )


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without a dispatcher call when it already is ``dtype``."""
    return t if t.dtype == dtype else t.to(dtype)


def param(t: Tensor | None, dtype: torch.dtype, shape: Sequence[int]) -> Tensor | None:
    """A (C,) parameter as a broadcastable (1, C, 1, ...) tensor of ``shape`` in ``dtype``."""
    return None if t is None else cast(t, dtype).reshape(shape)


class BackwardViews(NamedTuple):
    """What a per-channel fused backward starts from (see :func:`backward_views`)."""

    shape: list[int]  # broadcasts a (C,) vector against x: (1, C, 1, ...)
    dims: tuple[int, ...]  # the spatial dims of x
    all_dims: tuple[int, ...]  # (0, *dims): a per-channel reduction
    x: Tensor  # x in the accumulation dtype
    dy: Tensor  # dy in the accumulation dtype


def backward_views(x: Tensor, dy: Tensor, acc: torch.dtype) -> BackwardViews:
    """The broadcast shape, the reduction dims and ``x``, ``dy`` in ``acc`` for (N, C, *S) ``x``."""
    dims = tuple(range(2, x.dim()))
    return BackwardViews(channel_shape(x), dims, (0, *dims), cast(x, acc), cast(dy, acc))


def against(t: Tensor, x: Tensor) -> Tensor:
    """An (N or 1, C or 1) matrix as a view that broadcasts against (N, C, *S) ``x``."""
    return t.view(*t.shape, *([1] * (x.dim() - 2)))


def apply_dx(u: Tensor, dy: Tensor, a: Tensor, p: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
    """``dx = u·p + q + a·dy`` written into ``u`` (consumed), returned in ``dtype``.

    ``a``, ``p``, ``q`` broadcast against ``u``. Three in-place passes, each
    with a single broadcast operand, which keeps every one on torch's
    vectorized CPU loop (``addcmul`` with two broadcast operands is not).
    """
    return u.mul_(p).add_(q).addcmul_(dy, a).to(dtype)


def composite_grads(
    needs: Sequence[bool], dy: Tensor, fn: Callable[..., Tensor], *inputs: Any
) -> tuple[Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` for a backward that records a graph.

    Called from a fused Function's backward under ``create_graph=True`` (double
    backward, ``gradgradcheck``): ``fn`` rebuilds the forward in plain ops from
    the saved inputs, which carry their autograd history, so the returned
    gradients are differentiable functions of the inputs and of ``dy``, exactly
    as without the Function. ``needs[i]`` says whether ``inputs[i]`` wants a
    gradient; the result has one entry per input (None where not wanted).
    """
    needs = tuple(needs[: len(inputs)])
    with torch.enable_grad():
        out = fn(*inputs)
    wrt = [i for i, t in enumerate(inputs) if needs[i] and isinstance(t, Tensor)]
    grads = torch.autograd.grad(
        out, [inputs[i] for i in wrt], dy, create_graph=True, allow_unused=True
    )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, gi in zip(wrt, grads, strict=True):
        result[i] = gi
    return tuple(result)
