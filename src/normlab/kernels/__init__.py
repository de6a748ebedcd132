"""Fused Triton kernels: the only package of normlab that imports triton.

Importing this package does *not* import triton and detects no device: the kernel
modules (:mod:`.group_norm`, :mod:`.filter_response_norm`, :mod:`.switchable_norm`,
:mod:`.frozen_batch_norm`) are imported by the entry points below on first use.
The functional ops choose these kernels through ``backend=`` (see
:func:`normlab._core.dispatch.choose_path`): ``"triton"`` forces them, ``"torch"``
never, and ``"auto"`` takes them for CUDA tensors only where a recorded GPU
measurement (:mod:`normlab._core.measured`) or ``NORMLAB_TRITON=1`` enables them.

On a machine without a GPU the kernels run on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1`` in the environment *before* triton is imported);
that is how the test suite checks them. It is slow and meant for tests only:
``backend="auto"`` never picks the interpreter.

Every entry point prepares its arguments in torch and applies an ``autograd.Function``
over forward and backward kernels; statistics are accumulated in fp32 (fp64 for fp64
input) and the output has the input's dtype and memory format. The entry points check
only what the kernels themselves need (dtype, activation, rank, the Switchable Norm
logits and batch size): the functional ops, which validate everything, call them with
``backend="triton"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.activation import ACTIVATIONS, check_act
from .._core.checks import check_batch_count, check_min_dims
from .._core.dispatch import available, interpreting, missing
from .._core.running import update_running_stats
from .._core.stats import acc_dtype

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

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtype(layer: str, x: Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{layer}: the Triton kernels take float16, bfloat16, float32 or float64 input, "
            f"got {x.dtype}; convert it or use backend='torch'."
        )


def _act_code(layer: str, act: str | None) -> int:
    """The kernels' constexpr for ``act``: its index in :data:`ACTIVATIONS` (0 none, 1 SiLU,
    2 ReLU)."""
    check_act(layer, act)
    return ACTIVATIONS.index(act)


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
    ``num_groups`` must divide C (:func:`normlab.functional.group_norm` checks it).
    """
    layer = "group_norm (triton)"
    _check_dtype(layer, input)
    code = _act_code(layer, act)
    from ._common import dense
    from .group_norm import GroupNormTriton

    w, b = dense(weight), dense(bias)
    return GroupNormTriton.apply(input, w, b, num_groups, float(eps), code)


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
    layer = "frozen_batch_norm (triton)"
    _check_dtype(layer, input)
    code = _act_code(layer, act)
    from .frozen_batch_norm import FrozenBatchNormTriton, affine_vectors

    vectors = affine_vectors(weight, bias, running_mean, running_var, eps, input.dtype)
    return FrozenBatchNormTriton.apply(input, *vectors, code)


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
    layer = "filter_response_norm (triton)"
    _check_dtype(layer, input)
    check_min_dims(layer, input, 3)
    from ._common import dense
    from .filter_response_norm import FilterResponseNormTriton

    acc = acc_dtype(input.dtype)
    if isinstance(eps, Tensor):
        e = eps.abs().reshape(1).to(acc)
    else:
        e = torch.full((1,), abs(float(eps)), dtype=acc, device=input.device)
    return FilterResponseNormTriton.apply(input, dense(weight), dense(bias), dense(tau), e)


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
    the in-place running-statistics update in training (torch's momentum convention,
    unbiased variance).
    """
    layer = "switchable_norm (triton)"
    _check_dtype(layer, input)
    if input.dim() < 2 or input.numel() == 0:
        raise ValueError(
            f"{layer}: expected a non-empty (N, C) or (N, C, *spatial) input, got shape "
            f"{tuple(input.shape)}."
        )
    names = ("in", "ln", "bn") if input.dim() >= 3 else ("ln", "bn")
    names = names if using_bn else names[:-1]
    for label, logits in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if tuple(logits.shape) != (len(names),):
            raise ValueError(
                f"{layer}: {label} has shape {tuple(logits.shape)}, expected ({len(names)},): "
                f"one logit per normalizer ({', '.join(n.upper() for n in names)}) for a "
                f"{input.dim()}-D input with using_bn={using_bn}."
            )
    bn = ("batch" if training else "running") if using_bn else "none"
    count = input.numel() // input.shape[1]
    if bn == "batch":
        check_batch_count(layer, input, count)
    from ._common import dense
    from .switchable_norm import SwitchableNormTriton

    running = (None, None) if bn == "batch" else (running_mean, running_var)
    y, batch_mean, batch_var = SwitchableNormTriton.apply(
        input, mean_weight, var_weight, dense(weight), dense(bias), *running, names, bn, float(eps)
    )
    if bn == "batch" and (running_mean is not None or running_var is not None):
        unbiased = batch_var * (count / (count - 1))
        update_running_stats(running_mean, running_var, batch_mean, unbiased, momentum)
    return y
