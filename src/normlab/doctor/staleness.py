"""The statistics the doctor measures on the example forward, and how stale running ones are."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._core.stats import PooledMoments

__all__ = ["ExampleMoments", "layer_eps", "stale_distance"]

#: the example's batch statistics must rest on this many values before staleness is judged
STALE_MIN_VALUES = 32


class ExampleMoments(PooledMoments):
    """Exact per-channel mean and biased variance of every input a layer saw, in float64.

    With ``split=True`` it also keeps the moments of the even and the odd samples
    of each batch (``halves``): how far two halves of the example disagree shows
    how much its statistics would move from batch to batch.
    """

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        self.halves = (ExampleMoments(), ExampleMoments()) if split else None

    def update(self, x: Tensor) -> None:
        if not x.is_floating_point() or x.dim() < 2 or x.numel() == 0:
            return
        if self.halves is not None and x.shape[0] >= 2:
            self.halves[0].update(x[0::2])
            self.halves[1].update(x[1::2])
        flat = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        if self.mean is not None and (flat.shape[0],) != tuple(self.mean.shape):
            return
        self.add(flat)

    @property
    def var(self) -> Tensor | None:
        return None if self.m2 is None or self.n == 0 else self.m2 / self.n


def layer_eps(m: nn.Module) -> float:
    eps = getattr(m, "eps", 1e-5)
    if isinstance(eps, Tensor) and eps.numel() == 1:
        return float(eps)
    return float(eps) if isinstance(eps, (int, float)) else 1e-5


def _distance(mean: Tensor, var: Tensor, ref_mean: Tensor, ref_var: Tensor, eps: float) -> float:
    """Median over channels of the RMS (over x̂) gap between normalizing with (mean, var)
    and with (ref_mean, ref_var), in units of the normalized output."""
    s, s_ref = torch.sqrt(var.double() + eps), torch.sqrt(ref_var.double() + eps)
    # y_ref/γ − y/γ = x̂·(s/s_ref − 1) + (mean − ref_mean)/s_ref, with x̂ of mean 0, var 1.
    gap = (s / s_ref - 1).square() + ((mean.double() - ref_mean.double()) / s_ref).square()
    return float(gap.sqrt().median())


def stale_distance(m: nn.Module, rec: dict[str, Any]) -> float | None:
    """How far eval (running statistics) is from the example's batch statistics, if beyond noise.

    The batch statistics are those of every input the layer saw in the forward;
    the running statistics those before the forward. The median over channels
    keeps a few near-constant channels from deciding for the whole layer. The
    distance counts only if it exceeds the distance between the even and the
    odd samples of the example (about twice the batch statistics' own
    uncertainty): a small or diverse example batch is not evidence of staleness.
    None: not enough data to judge.
    """
    moments: ExampleMoments | None = rec.get("moments")
    mean, var = rec.get("running", (None, None))
    if moments is None or moments.mean is None or moments.var is None:
        return None
    if moments.n < STALE_MIN_VALUES or mean is None or var is None:
        return None
    if mean.shape != moments.mean.shape:
        return None
    eps = layer_eps(m)
    value = _distance(moments.mean, moments.var, mean, var, eps)
    if not math.isfinite(value):
        return None
    if moments.halves is not None:
        a, b = moments.halves
        if a.mean is not None and b.mean is not None and a.var is not None and b.var is not None:
            noise = _distance(a.mean, a.var, b.mean, b.var, eps)
            if math.isfinite(noise) and value <= noise:
                return None
    return value
