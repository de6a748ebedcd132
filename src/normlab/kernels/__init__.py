"""Fused Triton kernels: the only package of normlab that imports triton.

Importing this package does *not* import triton and detects no device: the kernel
modules (:mod:`.group_norm`, :mod:`.filter_response_norm`, :mod:`.switchable_norm`,
:mod:`.frozen_batch_norm`) are imported by the entry points below on first use.
The functional ops choose these kernels through ``backend=`` (see
:func:`normlab._core.dispatch.resolve_backend`): ``"auto"`` takes them for CUDA
tensors when :func:`available` is true, ``"triton"`` forces them, ``"torch"`` never.

On a machine without a GPU the kernels run on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1`` in the environment *before* triton is imported);
that is how the test suite checks them. It is slow and meant for tests only:
``backend="auto"`` never picks the interpreter.

Every entry point is an ``autograd.Function`` over a forward and a backward kernel;
statistics are accumulated in fp32 (fp64 for fp64 input) and the output has the
input's dtype and memory format.
"""

from __future__ import annotations

from torch import Tensor

from .._core.dispatch import available, interpreting, missing

__all__ = [
    "ACTIVATIONS",
    "available",
    "fused_filter_response_norm",
    "fused_frozen_batch_norm",
    "fused_group_norm",
    "fused_switchable_norm",
    "interpreting",
    "missing",
]

#: The activations a kernel can apply after the affine map, in its own pass.
ACTIVATIONS = (None, "silu", "relu")


def fused_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = None,
) -> Tensor:
    r"""GroupNorm (+ SiLU/ReLU) in fused Triton kernels; see :mod:`.group_norm`.

    ``act(group_norm(input, num_groups, weight, bias, eps))`` with ``act`` one of
    :data:`ACTIVATIONS`. NCHW or channels_last (no copy), fp16/bf16/fp32/fp64.
    No input validation beyond the kernel's own needs: call
    :func:`normlab.functional.group_norm` with ``backend="triton"`` for that.
    """
    from .group_norm import group_norm_triton

    return group_norm_triton(input, num_groups, weight, bias, eps, act)


def fused_frozen_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
    *,
    act: str | None = None,
) -> Tensor:
    r"""Eval-mode / frozen BatchNorm (+ SiLU/ReLU) in one pass; see :mod:`.frozen_batch_norm`.

    ``act((x − μ)·γ/sqrt(σ² + ε) + β)`` with fixed per-channel statistics. Gradients
    flow to every argument that requires them (input, weight, bias, and even the
    running statistics), through per-channel fp32 reductions.
    """
    from .frozen_batch_norm import frozen_batch_norm_triton

    return frozen_batch_norm_triton(input, weight, bias, running_mean, running_var, eps, act)


def fused_filter_response_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | Tensor = 1e-6,
    *,
    tau: Tensor | None = None,
) -> Tensor:
    r"""Filter Response Norm, fused with the TLU when ``tau`` is given; see
    :mod:`.filter_response_norm`.

    ``y = max(γ·x/sqrt(ν² + |ε|) + β, τ)``, ν² the mean of x² over the spatial dims.
    ``eps`` may be a one-element tensor (a learnable ε; it gets its gradient).
    """
    from .filter_response_norm import filter_response_norm_triton

    return filter_response_norm_triton(input, weight, bias, eps, tau)


def fused_switchable_norm(
    input: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    using_bn: bool = True,
) -> Tensor:
    r"""Switchable Norm: one statistics kernel, the tiny (N, C) mixing in torch, one
    apply kernel; see :mod:`.switchable_norm`. Same arguments and semantics as
    :func:`normlab.functional.switchable_norm` (without ``process_group``), including
    the in-place running-statistics update in training.
    """
    from .switchable_norm import switchable_norm_triton

    return switchable_norm_triton(
        input,
        mean_weight,
        var_weight,
        weight,
        bias,
        running_mean=running_mean,
        running_var=running_var,
        training=training,
        momentum=momentum,
        eps=eps,
        using_bn=using_bn,
    )
