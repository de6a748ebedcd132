"""Group normalization (Wu & He, ECCV 2018)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .._core.activation import activation, check_act
from .._core.checks import check_groups, check_norm_input, check_params
from .._core.dispatch import Op, Path, choose_path
from .._core.stats import acc_dtype, centered

__all__ = ["group_norm", "group_pivot"]


def group_pivot(x: Tensor, num_groups: int) -> Tensor:
    """One sample per (n, group), broadcast to (N, C, 1, ...): the group's first element.

    Works on any memory format (indexing, no reshape of ``x``).
    """
    n, c = x.shape[:2]
    cpg = c // num_groups
    first = x.detach()[(slice(None), slice(None, None, cpg)) + (0,) * (x.dim() - 2)]
    return first.repeat_interleave(cpg, dim=1).reshape(n, c, *([1] * (x.dim() - 2)))


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Group normalization: statistics over (C/G, \*spatial) per (sample, group).

    .. math:: y_{n,c} = \frac{x_{n,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}}
              \gamma_c + \beta_c

    ``num_groups=1`` is LayerNorm over (C, \*spatial); ``num_groups=C`` is
    InstanceNorm. Independent of the batch size. Signature of
    :func:`torch.nn.functional.group_norm`, plus ``act`` and ``backend``.

    Args:
        input: (N, C, \*spatial) with 0 to 3 spatial dims, any memory format.
        num_groups: G, must divide C.
        weight, bias: per-channel (C,) or None.
        eps: >= 0, added to the variance (0 divides by zero on a constant group,
            as in torch).
        act: None, ``"silu"`` or ``"relu"``, applied after the affine map (in the
            same kernel on the Triton backend; in fp32 before the cast to the input
            dtype on either backend).
        backend: ``"auto"`` (the Triton kernels of :mod:`normlab.kernels` for CUDA
            input when triton imports, torch otherwise), ``"torch"`` or ``"triton"``.
    """
    layer = "group_norm"
    check_norm_input(layer, input, eps, 2, "an (N, C, *spatial) input", zero_ok=True)
    check_act(layer, act)
    path = choose_path(Op.GROUP_NORM, input, backend, None)
    c = input.shape[1]
    check_groups(layer, c, num_groups)
    check_params(layer, (c,), weight=weight, bias=bias)
    if input.numel() == 0:  # an empty output, connected to weight and bias, as in torch
        return activation(F.group_norm(input, num_groups, weight, bias, eps), act)
    if path is Path.TRITON:
        from ..kernels import fused_group_norm

        return fused_group_norm(input, num_groups, weight, bias, eps, act=act)
    acc = acc_dtype(input.dtype)
    xc = centered(input, group_pivot(input, num_groups))
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return activation(F.group_norm(xc, num_groups, w, b, eps), act).to(input.dtype)
