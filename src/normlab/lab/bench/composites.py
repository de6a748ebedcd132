"""Straightforward module-by-module versions of the small-batch norms: benchmark baselines.

Each is the plain autograd composite a user would write from the paper's formula
(no shifted statistics, no fused steps). They exist only so ``normlab bench`` can
show what normlab's implementations gain over them; they are not layers to use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["COMPOSITES"]


class _Affine(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def affine(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class CompositeSwitchableNorm2d(_Affine):
    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__(c)
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        m_in, v_in = x.mean((2, 3), keepdim=True), x.var((2, 3), keepdim=True, unbiased=False)
        m_ln, v_ln = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), keepdim=True, unbiased=False)
        m_bn, v_bn = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), keepdim=True, unbiased=False)
        wm, wv = self.mean_weight.softmax(0), self.var_weight.softmax(0)
        mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
        var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
        return self.affine((x - mean) / torch.sqrt(var + self.eps))


class CompositeFRN2d(_Affine):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__(c)
        self.tau = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        nu2 = x.pow(2).mean((2, 3), keepdim=True)
        return torch.max(self.affine(x * torch.rsqrt(nu2 + self.eps)), self.tau.view(1, -1, 1, 1))


class CompositeBatchRenorm2d(_Affine):
    def __init__(self, c: int, eps: float = 1e-5, r_max: float = 3.0, d_max: float = 5.0):
        super().__init__(c)
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps, self.r_max, self.d_max = eps, r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        std = torch.sqrt(x.var((0, 2, 3), keepdim=True, unbiased=False) + self.eps)
        rstd = torch.sqrt(self.running_var.view(1, -1, 1, 1) + self.eps)
        r = (std.detach() / rstd).clamp(1 / self.r_max, self.r_max)
        d = ((mean.detach() - self.running_mean.view(1, -1, 1, 1)) / rstd).clamp(
            -self.d_max, self.d_max
        )
        return self.affine((x - mean) / std * r + d)


class CompositeEvoNormB0(_Affine):
    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__(c)
        self.v = nn.Parameter(torch.ones(c))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        vb = x.var((0, 2, 3), keepdim=True, unbiased=False)
        vi = x.var((2, 3), keepdim=True, unbiased=False)
        den = torch.max(
            torch.sqrt(vb + self.eps), self.v.view(1, -1, 1, 1) * x + torch.sqrt(vi + self.eps)
        )
        return self.affine(x / den)


class CompositeEvoNormS0(_Affine):
    def __init__(self, c: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(c)
        self.v = nn.Parameter(torch.ones(c))
        self.groups, self.eps = groups, eps

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = x.reshape(n, self.groups, -1)
        std = torch.sqrt(g.var(-1, keepdim=True, unbiased=False) + self.eps)
        std = std.expand(n, self.groups, c // self.groups).reshape(n, c, 1, 1)
        return self.affine(x * torch.sigmoid(self.v.view(1, -1, 1, 1) * x) / std)


class CompositeMeanFreeBN(_Affine):
    """MABN's forward on the current batch: x / sqrt(E[x²] + eps) (no moving averages)."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__(c)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(x * torch.rsqrt(x.pow(2).mean((0, 2, 3), keepdim=True) + self.eps))


COMPOSITES = {
    "sn": CompositeSwitchableNorm2d,
    "frn": CompositeFRN2d,
    "brn": CompositeBatchRenorm2d,
    "evonorm_b0": CompositeEvoNormB0,
    "evonorm_s0": CompositeEvoNormS0,
    "mabn": CompositeMeanFreeBN,
}
