"""Precise running statistics: exact population averages over many batches.

A BatchNorm's running statistics are an exponential moving average of noisy
per-batch estimates taken while the weights were still moving. After training
(or after converting, fusing, changing the data), :func:`recalibrate` replaces
them with the exact statistics of the data you feed: every value seen counts
once, whatever the batch sizes. Per batch and channel it computes the count,
the mean and the sum of squared deviations (two-pass, float64), then merges
batches with Chan et al.'s parallel update (the law of total variance):

.. math:: n = n_a + n_b,\\quad \\delta = \\bar x_b - \\bar x_a,\\quad
          \\bar x = \\bar x_a + \\delta\\,n_b/n,\\quad
          M_2 = M_{2,a} + M_{2,b} + \\delta^2\\,n_a n_b / n

so ``running_var = M_2 / (n - 1)`` is the unbiased variance of all values — not
the mean of per-batch variances, which misses the spread of the batch means and
weights a batch of 2 like a batch of 256.

How the layers' inputs are produced
    One pass over ``batches`` under ``torch.no_grad()``. Every layer being
    recalibrated is put in eval mode for the pass, so each layer's input is what
    it will see at evaluation time *given the statistics the upstream layers had
    before the call* (upstream layers do not use batch statistics and nothing is
    updated during the pass); the new statistics are written only at the end.
    Where upstream statistics change a lot, calling :func:`recalibrate` again
    brings each layer closer to the fixed point. All other modules keep the mode
    you set (a Dropout in training mode stays active); every training flag is
    restored afterwards, parameters are never touched.

The protocol: which layers are recalibrated
    A module takes part when its class declares ``_recalibrate_kind`` (below) and
    it holds a ``running_mean`` and/or ``running_var`` buffer that is not None.
    torch's ``_BatchNorm`` subclasses count as ``"batch_mean_var"`` and torch's
    ``_InstanceNorm`` subclasses as ``"instance_mean_var"`` without declaring it.
    The statistics are taken from the layer's first positional input, channels
    on dim 1, and written into whichever of ``running_mean`` / ``running_var``
    exist (shape (C,)); ``num_batches_tracked`` (if present) is set to the number
    of batches, except in classes that set ``_step_counter = True`` because a
    schedule runs on it (BatchRenorm, MovingAverageBatchNorm): those keep it.
    Kinds:

    ``"batch_mean_var"``
        statistics over all dims but 1 (N and spatial): ``running_mean`` the
        mean, ``running_var`` the variance (BN, BRN, SN's BN branch, EvoNorm B0).
    ``"batch_second_moment"``
        over the same dims, ``running_var`` gets the uncentered second moment
        E[x²] (a norm that divides by it without subtracting the mean, e.g.
        MABN's χ) and ``running_mean`` (if any) the mean.
    ``"instance_mean_var"``
        per (sample, channel) over the spatial dims, as InstanceNorm tracks them:
        ``running_mean`` the average over all instances of the instance means,
        ``running_var`` the average of the instance variances. Unbatched input
        (one rank less than the layer's batched rank) counts as one sample.

    A class may also set ``_recalibrate_unbiased = False`` to store the biased
    (population, divide-by-n) variance instead of torch's unbiased one.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from .feed import feed

__all__ = ["recalibrate", "recalibration_kind", "KINDS"]

KINDS = ("batch_mean_var", "batch_second_moment", "instance_mean_var")


def recalibration_kind(module: nn.Module) -> str | None:
    """The statistic ``module`` keeps (one of :data:`KINDS`), or None if it keeps none."""
    kind = getattr(type(module), "_recalibrate_kind", None)
    if kind is None:
        if isinstance(module, _TorchBatchNorm):
            kind = "batch_mean_var"
        elif isinstance(module, _TorchInstanceNorm):
            kind = "instance_mean_var"
        else:
            return None
    if kind not in KINDS:
        raise ValueError(
            f"{type(module).__name__}._recalibrate_kind is {kind!r}, which normlab.recalibrate "
            f"does not know; use one of {', '.join(KINDS)} (see the normlab.recalibrate docs)."
        )
    if not any(
        isinstance(getattr(module, b, None), Tensor) for b in ("running_mean", "running_var")
    ):
        return None
    return kind


class _Population:
    """Exact running moments of one layer's inputs, merged batch by batch in float64."""

    def __init__(self, module: nn.Module, kind: str, path: str) -> None:
        self.kind = kind
        self.unbiased = bool(getattr(type(module), "_recalibrate_unbiased", True))
        self.path = path
        self.name = type(module).__name__
        self.batched_rank = _batched_rank(module)
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # batch kinds: Σ (x − mean)²; instance: Σ instance var

    def update(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError(
                f"recalibrate: {self.path} ({self.name}) got a {type(x).__name__} input; "
                "its statistics need a floating tensor with channels on dim 1."
            )
        x = x.detach().to(torch.float64)
        if self.kind == "instance_mean_var":
            self._update_instances(x)
            return
        if x.dim() < 2:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) got input of shape {tuple(x.shape)}; "
                "expected (N, C, ...) with channels on dim 1."
            )
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        nb = flat.shape[1]
        if nb == 0:
            return
        mb = flat.mean(dim=1)
        m2b = (flat - mb[:, None]).square().sum(dim=1)
        self._merge(nb, mb, m2b)

    def _update_instances(self, x: Tensor) -> None:
        if self.batched_rank is not None and x.dim() == self.batched_rank - 1:
            x = x.unsqueeze(0)
        if x.dim() < 3:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) got input of shape {tuple(x.shape)}; "
                "instance statistics need (N, C, *spatial)."
            )
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        if flat.shape[2] < 2:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) sees {flat.shape[2]} spatial value(s) "
                "per instance; an instance variance needs at least 2."
            )
        var, mean = torch.var_mean(flat, dim=2, correction=self._correction())
        nb = flat.shape[0]
        # Instances count equally: running averages of the instance mean and variance.
        mb, vb = mean.mean(dim=0), var.mean(dim=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, vb
        else:
            n = self.n + nb
            self.mean = self.mean + (mb - self.mean) * (nb / n)
            self.m2 = self.m2 + (vb - self.m2) * (nb / n)
            self.n = n

    def _merge(self, nb: int, mb: Tensor, m2b: Tensor) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if mb.shape != self.mean.shape:
            raise ValueError(
                f"recalibrate: {self.path} ({self.name}) saw {mb.shape[0]} channels after "
                f"{self.mean.shape[0]}; channels must be on dim 1 and fixed."
            )
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta.square() * (self.n * nb / n)
        self.n = n

    def _correction(self) -> int:
        return 1 if self.unbiased else 0

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean, value for running_var) in float64."""
        assert self.mean is not None and self.m2 is not None
        if self.kind == "instance_mean_var":
            return self.mean, self.m2
        if self.kind == "batch_second_moment":
            return self.mean, self.m2 / self.n + self.mean.square()
        if self.unbiased:
            if self.n < 2:
                raise ValueError(
                    f"recalibrate: {self.path} ({self.name}) saw only {self.n} value per "
                    "channel in all batches; an unbiased variance needs at least 2. Feed more "
                    "data."
                )
            return self.mean, self.m2 / (self.n - 1)
        return self.mean, self.m2 / self.n


def _batched_rank(module: nn.Module) -> int | None:
    spatial = getattr(type(module), "_spatial", None)
    if isinstance(spatial, int):
        return spatial + 2
    get = getattr(module, "_get_no_batch_dim", None)
    if callable(get):
        return int(get()) + 1
    return None


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Set every layer's running statistics to the exact statistics of the data fed.

    See the module docstring for the math, which layers take part (the
    ``_recalibrate_kind`` protocol) and how their inputs are produced.

    Args:
        model: modified in place (running buffers only) and returned.
        batches: an iterable of batches: a tensor (``model(x)``), a tuple/list
            (``model(*batch)``) or a dict (``model(**batch)``), on the model's
            device. A DataLoader works; extra items such as labels must be
            dropped with ``forward_fn``.
        num_batches: use the first ``num_batches`` batches (default: all).
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch,
            e.g. ``lambda m, b: m(b["image"].cuda())``.

    Returns:
        ``model``. ``num_batches_tracked`` equals the number of batches used.

    Raises:
        ValueError: ``batches`` is empty, or yields fewer than ``num_batches``
            (nothing is written in either case), or ``num_batches < 1``.

    Warns:
        RuntimeWarning: some layers were never called; they keep their old
            statistics.

    Example::

        >>> recalibrate(model, (x for x, _ in loader), num_batches=200)
    """
    if num_batches is not None and int(num_batches) < 1:
        raise ValueError(f"recalibrate: num_batches must be >= 1 or None, got {num_batches}.")
    layers: dict[int, tuple[nn.Module, _Population]] = {}
    for path, m in model.named_modules():
        kind = recalibration_kind(m)
        if kind is not None:
            layers[id(m)] = (m, _Population(m, kind, path or "<model>"))
    if not layers:
        warnings.warn(
            "recalibrate: the model has no layer with running statistics; nothing to do.",
            RuntimeWarning,
            stacklevel=2,
        )
        return model

    flags = [(m, m.training) for m in model.modules()]
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args:
            raise TypeError(
                f"recalibrate: {layers[id(module)][1].path} was called without a positional "
                "input; its statistics are taken from the first positional argument."
            )
        layers[id(module)][1].update(args[0])

    stream = iter(batches) if num_batches is None else itertools.islice(batches, num_batches)
    count = 0
    try:
        for m, _ in layers.values():
            m.train(False)
            handles.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            for batch in stream:
                feed(model, batch, forward_fn)
                count += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag

    if count == 0:
        raise ValueError(
            "recalibrate: `batches` yielded no batch, so there is no data to compute "
            "statistics from (an exhausted iterator or generator?). Pass a fresh iterable."
        )
    if num_batches is not None and count < num_batches:
        raise ValueError(
            f"recalibrate: asked for num_batches={num_batches} but `batches` yielded only "
            f"{count}; no statistics were changed. Pass num_batches<={count} or more data."
        )

    writes: list[tuple[Tensor, Tensor]] = []  # validated first: all or nothing
    counters: list[Tensor] = []
    unseen = []
    for m, pop in layers.values():
        if pop.mean is None:
            unseen.append(pop.path)
            continue
        for name, value in zip(("running_mean", "running_var"), pop.result(), strict=True):
            buf = getattr(m, name, None)
            if isinstance(buf, Tensor):
                if buf.shape != value.shape:
                    raise ValueError(
                        f"recalibrate: {pop.path}.{name} has shape {tuple(buf.shape)} but "
                        f"its input has {value.shape[0]} channels on dim 1."
                    )
                writes.append((buf, value))
        nbt = getattr(m, "num_batches_tracked", None)
        # Layers whose schedule runs on num_batches_tracked (BRN's r/d relaxation,
        # MABN's warm-up and windows) keep their step count.
        if isinstance(nbt, Tensor) and not getattr(type(m), "_step_counter", False):
            counters.append(nbt)
    with torch.no_grad():
        for buf, value in writes:
            buf.copy_(value.to(buf.dtype))
        for nbt in counters:
            nbt.fill_(count)
    if unseen:
        warnings.warn(
            f"recalibrate: {', '.join(unseen)} never ran on the batches given and kept "
            "their old statistics.",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
