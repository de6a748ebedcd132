"""A self-check of every catalogue layer against its float64 reference (``normlab check``).

:func:`run_checks` builds every :class:`LayerCase` of :data:`CATALOGUE` (see
:mod:`normlab.catalogue.cases`) in float64 with randomized parameters, runs forward
and backward on fresh off-center data, and returns one :class:`CheckResult` per
case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .cases import CATALOGUE, LayerCase

__all__ = ["CheckResult", "check_case", "prepare", "randomize", "run_checks"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    family: str
    max_abs_err_y: float
    max_abs_err_grads: float
    seconds: float
    ok: bool


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics, so that none is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            if name.endswith("bias"):
                p.sub_(1.0)
        for name, b in module.named_buffers():
            if not torch.is_floating_point(b):
                continue
            if name.endswith("running_mean"):
                b.copy_(3.0 + torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 4 * torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name in ("weight", "bias"):  # FrozenBN keeps its affine in buffers
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
    return module


def prepare(case: LayerCase, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The case's module in float64 with random state, and an off-center input."""
    module = randomize(case.build().to(torch.float64), seed)
    module.train(case.training)
    g = torch.Generator().manual_seed(seed + 1)
    x = 3.0 + 2.0 * torch.randn(case.shape, generator=g, dtype=torch.float64)
    return module, x


def check_case(case: LayerCase, seed: int = 0, tol: float = 1e-9) -> CheckResult:
    """Forward and backward of one case against the float64 reference."""
    t0 = time.perf_counter()
    module, x = prepare(case, seed)
    y_ref, backward = case.reference(x.numpy().copy(), module)
    x.requires_grad_(True)
    y = module(x)
    g = torch.Generator().manual_seed(seed + 2)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    grads = backward(dy.numpy())
    err_y = float(np.max(np.abs(y.detach().numpy() - y_ref)))
    err_g = 0.0
    for key, ref in grads.items():
        if ref is None:
            continue
        target = x if key == "dx" else getattr(module, key[1:], None)
        if not (isinstance(target, torch.Tensor) and target.requires_grad):
            continue  # a buffer (e.g. FRN's fixed eps) or a parameter the layer lacks
        got = target.grad
        if got is None:
            err_g = float("inf")
            continue
        err_g = max(err_g, float(np.max(np.abs(got.numpy() - ref))))
    scale = max(1.0, float(np.max(np.abs(y_ref))))
    ok = err_y <= tol * scale and err_g <= tol * max(1.0, scale)
    return CheckResult(case.name, case.family, err_y, err_g, time.perf_counter() - t0, ok)


def run_checks(
    cases: list[LayerCase] | None = None, seed: int = 0, tol: float = 1e-9
) -> list[CheckResult]:
    """Check every catalogue case (or the given ones); returns one record per case."""
    return [check_case(case, seed, tol) for case in (CATALOGUE if cases is None else cases)]
