"""An independent oracle for CrossIterationBatchNorm2d: the authors' algorithm, ported here.

Written by us for the tests from the math and the code structure of ``CBatchNorm2d`` in
Howal/Cross-iterationBatchNorm (``mmdet/models/utils/CBN.py``): Python lists of the
previous iterations' raw moments (μ, E[x²]), their gradients with respect to the
convolution weight (one ``autograd.grad`` of each moment's sum) and that weight; the
compensated moments stacked with this batch's; entries whose compensated
``E[x²] − μ²`` is negative dropped per channel; the running statistics updated with
this batch's mean and unbiased variance; an ``iter_count`` burn-in ("two stage").

Two switches select the authors' conventions (their defaults) or normlab's:
``eps_inside`` (their ``out_p=True``: ``sqrt(var + eps)``; default: ``sqrt(var) + eps``)
and ``burnin_unbiased`` (their plain branch normalizes with the unbiased variance).
"""

from __future__ import annotations

import torch
from torch import Tensor


class AuthorsCBN:
    """The authors' CBN forward for (N, C, H, W) input; ``forward(x, conv_weight)``."""

    def __init__(
        self,
        c: int,
        buffer_num: int,
        burnin: int = 0,
        rho: float = 1.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        eps_inside: bool = False,
        burnin_unbiased: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.max_buffer_num, self.buffer_num = buffer_num, buffer_num
        self.burnin, self.rho, self.eps, self.momentum = burnin, rho, eps, momentum
        self.eps_inside, self.burnin_unbiased = eps_inside, burnin_unbiased
        self.iter_count = 0
        self.pre_mu: list[Tensor] = []
        self.pre_meanx2: list[Tensor] = []
        self.pre_dmudw: list[Tensor] = []
        self.pre_dmeanx2dw: list[Tensor] = []
        self.pre_weight: list[Tensor] = []
        self.running_mean = torch.zeros(c, dtype=dtype)
        self.running_var = torch.ones(c, dtype=dtype)
        self.gamma = torch.ones(c, dtype=dtype)
        self.beta = torch.zeros(c, dtype=dtype)

    def _compensated(self, stats: list[Tensor], grads: list[Tensor], w: Tensor) -> list[Tensor]:
        return [
            s + (self.rho * d * (w.detach() - pw)).sum(dim=(1, 2, 3))
            for s, d, pw in zip(stats, grads, self.pre_weight, strict=True)
        ]

    def forward(self, x: Tensor, conv_weight: Tensor) -> Tensor:
        c = x.shape[1]
        y = x.transpose(0, 1).reshape(c, -1)
        if self.burnin > 0:
            self.iter_count += 1
            self.buffer_num = self.max_buffer_num if self.iter_count > self.burnin else 0
        cur_mu = y.mean(dim=1)
        cur_sigma2 = y.var(dim=1)  # unbiased: the running statistics' (and burn-in's)
        if self.buffer_num > 0 and x.requires_grad:
            cur_meanx2 = (y * y).mean(dim=1)
            ones = torch.ones_like(cur_mu)
            dmudw = torch.autograd.grad(cur_mu, conv_weight, ones, retain_graph=True)[0]
            dmeanx2dw = torch.autograd.grad(cur_meanx2, conv_weight, ones, retain_graph=True)[0]
            w = conv_weight
            mu_all = torch.stack([cur_mu, *self._compensated(self.pre_mu, self.pre_dmudw, w)])
            meanx2_all = torch.stack(
                [cur_meanx2, *self._compensated(self.pre_meanx2, self.pre_dmeanx2dw, w)]
            )
            sigma2_all = meanx2_all - mu_all**2
            keep = (sigma2_all >= 0).to(mu_all.dtype)
            count = keep.sum(dim=0)
            mu = (mu_all * keep).sum(dim=0) / count
            sigma2 = (meanx2_all * keep).sum(dim=0) / count - mu**2
            k = self.buffer_num
            self.pre_mu = [cur_mu.detach(), *self.pre_mu[: k - 1]]
            self.pre_meanx2 = [cur_meanx2.detach(), *self.pre_meanx2[: k - 1]]
            self.pre_dmudw = [dmudw.detach(), *self.pre_dmudw[: k - 1]]
            self.pre_dmeanx2dw = [dmeanx2dw.detach(), *self.pre_dmeanx2dw[: k - 1]]
            self.pre_weight = [conv_weight.detach().clone(), *self.pre_weight[: k - 1]]
        else:
            mu = cur_mu
            n = y.shape[1]
            sigma2 = cur_sigma2 if self.burnin_unbiased else cur_sigma2 * (n - 1) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * cur_mu
            self.running_var = (1 - m) * self.running_var + m * cur_sigma2
        y = y - mu.view(-1, 1)
        if self.eps_inside:
            y = y / (sigma2.view(-1, 1) + self.eps) ** 0.5
        else:
            y = y / (sigma2.view(-1, 1) ** 0.5 + self.eps)
        y = self.gamma.view(-1, 1) * y + self.beta.view(-1, 1)
        return y.view(c, x.shape[0], *x.shape[2:]).transpose(0, 1)
