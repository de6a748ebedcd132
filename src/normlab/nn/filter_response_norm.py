"""FilterResponseNorm1d/2d/3d (with an optional built-in TLU) and TLU."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as NF
from .._core.checks import (
    check_channels,
    check_eps,
    check_floating,
    check_rank,
)
from ._base import DIM_LAYOUTS, ByDims, add_affine, check_num_features, reset_affine
from ._kernel_options import options_repr, take_backend

__all__ = [
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "TLU",
]


class _FilterResponseNorm(ByDims, nn.Module):
    r"""Filter Response Normalization with a Thresholded Linear Unit
    (Singh & Krishnan, CVPR 2020, arXiv 1911.09737).

    .. math::
        \nu^2_{n,c} = \frac{1}{|S|}\sum_{s \in S} x_{n,c,s}^2,\qquad
        y = \max\!\Big(\gamma_c \frac{x}{\sqrt{\nu^2_{n,c} + |\epsilon|}} + \beta_c,\ \tau_c\Big)

    ``ν²`` is the mean square over the spatial dims of each (sample, channel): no
    mean subtraction and no batch dependence, so train and eval are identical and
    batch 1 is exact. The TLU (a ReLU with learned threshold ``τ``, initialised
    to 0) replaces the mean subtraction; the paper always pairs the two, so
    ``tlu=True`` is the default (``tlu=False`` gives plain FRN, e.g. to follow it
    with another activation). ``ν²`` is accumulated in fp32 for half inputs.

    Spatial size 1 (H·W = 1) is legal: then ``ν² = x²`` and the layer computes
    ``γ·x/sqrt(x² + ε) + β``, a smooth sign of ``x`` — rarely what you want at
    the end of a network; the paper recommends a learnable ε there.

    ε: with ``learnable_eps=False`` it is the constant ``eps``, kept as a *buffer*
    named ``eps`` (so it follows ``.to()`` and is saved). With
    ``learnable_eps=True`` the effective ε is ``eps_floor + |ε_l|`` where the
    *parameter* ``eps`` is ε_l, initialised to ``eps_init`` (the paper: 1e-4), and
    ``eps_floor`` is the constructor's ``eps`` (the paper: 1e-6).

    Args:
        num_features: C.
        eps: the constant ε, or the floor ε_floor when ``learnable_eps``; > 0.
        learnable_eps: learn ε (parameter ``eps``).
        eps_init: initial value of the learnable ε_l.
        affine: learn per-channel γ (``weight``, init 1) and β (``bias``, init 0).
        tlu: apply the TLU with per-channel ``tau`` (init 0) inside the layer.

    Shape: 1d (N, C, L); 2d (N, C, H, W); 3d (N, C, D, H, W); any memory format.
    Output of the input's shape and dtype.

    Example::

        >>> frn = normlab.nn.FilterResponseNorm2d(16)
        >>> y = frn(torch.randn(2, 16, 8, 8))   # FRN + TLU
    """

    _dim_layouts = {**DIM_LAYOUTS, 1: ((3,), "(N, C, L)")}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        learnable_eps: bool = False,
        eps_init: float = 1e-4,
        affine: bool = True,
        tlu: bool = True,
        device: Any = None,
        dtype: Any = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        take_backend(self, name, backend)
        factory = {"device": device, "dtype": dtype}
        self.num_features = check_num_features(name, num_features)
        check_eps(name, eps)
        self.learnable_eps = learnable_eps
        self.eps_floor = float(eps) if learnable_eps else 0.0
        self.eps_init = float(eps_init)
        self.affine = affine
        self.tlu = tlu
        if learnable_eps:
            self.eps = nn.Parameter(torch.empty((), **factory))
        else:
            self.register_buffer("eps", torch.empty((), **factory))
        self._eps_value = float(eps)
        add_affine(self, self.num_features, affine, factory)
        if tlu:
            self.tau = nn.Parameter(torch.empty(self.num_features, **factory))
        else:
            self.register_parameter("tau", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.eps.fill_(self.eps_init if self.learnable_eps else self._eps_value)
        reset_affine(self)
        if self.tau is not None:
            nn.init.zeros_(self.tau)

    def effective_eps(self) -> Tensor:
        """The ε added to ν²: ``eps_floor + |eps|`` when learnable, else the ``eps`` buffer."""
        if self.learnable_eps:
            return self.eps_floor + self.eps.abs()
        return self.eps

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        eps = self.effective_eps()
        if self.tau is not None:
            return NF.frn_tlu(input, self.weight, self.bias, self.tau, eps, backend=self.backend)
        return NF.filter_response_norm(input, self.weight, self.bias, eps, backend=self.backend)

    def extra_repr(self) -> str:
        if self.learnable_eps:
            eps = f"eps_floor={self.eps_floor}, learnable_eps=True"
        else:
            eps = f"eps={self._eps_value}"
        s = f"{self.num_features}, {eps}, affine={self.affine}, tlu={self.tlu}"
        return s + options_repr(self)


class FilterResponseNorm1d(_FilterResponseNorm, dims=1):
    pass


class FilterResponseNorm2d(_FilterResponseNorm, dims=2):
    pass


class FilterResponseNorm3d(_FilterResponseNorm, dims=3):
    pass


class TLU(nn.Module):
    r"""Thresholded Linear Unit (Singh & Krishnan, 2020): :math:`y = \max(x, \tau_c)`.

    A ReLU whose threshold ``tau`` is learned per channel (dim 1), initialised
    to 0 (so a fresh TLU is a ReLU). Use it after :class:`FilterResponseNorm2d`
    built with ``tlu=False``, or wherever a learned-threshold ReLU is wanted.
    The gradient goes to ``x`` where ``x > τ`` and to ``τ`` elsewhere.

    Args:
        num_features: C.

    Shape: (N, C, \*) with any number of trailing dims.

    Example::

        >>> act = normlab.nn.TLU(16)
        >>> y = act(torch.randn(2, 16, 8, 8))
    """

    def __init__(self, num_features: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.num_features = check_num_features("TLU", num_features)
        self.tau = nn.Parameter(torch.zeros(self.num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.tau)

    def forward(self, input: Tensor) -> Tensor:
        check_floating("TLU", input)
        check_rank("TLU", input, (2, 3, 4, 5), "(N, C, *)")
        check_channels("TLU", input, self.num_features)
        return NF.tlu(input, self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
