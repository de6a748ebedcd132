"""The recorded GPU measurements that let ``backend="auto"`` take a Triton kernel.

``auto`` runs torch's own path on every device unless an entry of :data:`MEASURED`
covers the call: the op, the input's dtype, its layout and its shape regime, with a
kernel that was measured correct and at least :data:`MIN_RATIO` times as fast as
torch eager (forward + backward) on a GPU. An entry names the device, the date and
the result file in ``benchmarks/results/`` that holds the measurement
(``benchmarks/gpu_check.py`` writes it and prints the regime of every shape).

The table is empty: no kernel has been measured on a GPU yet. Users opt in with
``backend="triton"`` or ``NORMLAB_TRITON=1`` (see :mod:`normlab._core.dispatch`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "LAYOUTS",
    "MEASURED",
    "MIN_RATIO",
    "REGIMES",
    "Measurement",
    "layout_of",
    "lookup",
    "regime_of",
]

#: The speed-up over torch eager (forward + backward) an entry needs to enable ``auto``.
MIN_RATIO = 1.1

#: The layouts an entry can name; "strided" (any other) never takes ``auto``.
LAYOUTS = ("nchw", "channels_last")


class Measurement(NamedTuple):
    """One recorded GPU measurement of a kernel against torch eager."""

    op: str  # an Op value of normlab._core.dispatch ("group_norm", ...)
    dtype: str  # "float32", "bfloat16", "float16", "float64"
    layout: str  # one of LAYOUTS
    regime: str  # one of REGIMES (see regime_of)
    ratio: float  # torch eager time / kernel time, forward + backward
    device: str  # e.g. "NVIDIA H100 80GB HBM3"
    date: str  # ISO date of the run
    source: str  # the result file in the repository, e.g. benchmarks/results/...json


#: Batch classes x spatial classes: "n<=4/s<=64" ... "n>16/s>4096".
_BATCH = ((4, "n<=4"), (16, "n<=16"))
_SPATIAL = ((64, "s<=64"), (4096, "s<=4096"))
REGIMES = tuple(
    f"{b}/{s}" for b in ("n<=4", "n<=16", "n>16") for s in ("s<=64", "s<=4096", "s>4096")
)

MEASURED: tuple[Measurement, ...] = ()
"""Every (op, dtype, layout, regime) that ``auto`` sends to the kernels. Empty until a
GPU run records one (with its result file)."""


def _bucket(value: int, bounds: tuple[tuple[int, str], ...], above: str) -> str:
    for bound, name in bounds:
        if value <= bound:
            return name
    return above


def regime_of(shape: tuple[int, ...] | torch.Size) -> str:
    """The shape regime of an (N, C, *spatial) input: batch size N and spatial size S
    (the product of the spatial dims) in three classes each."""
    s = 1
    for d in shape[2:]:
        s *= int(d)
    return f"{_bucket(int(shape[0]), _BATCH, 'n>16')}/{_bucket(s, _SPATIAL, 's>4096')}"


def layout_of(x: torch.Tensor) -> str:
    """ "nchw" (contiguous), "channels_last" (channels_last / channels_last_3d) or
    "strided" (anything else) for the input of a norm."""
    if x.is_contiguous():
        return "nchw"
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return "channels_last"
    return "strided"


def lookup(op: str, x: torch.Tensor) -> Measurement | None:
    """The entry of :data:`MEASURED` that enables ``op`` for ``x``, or None: same op,
    dtype, layout and regime, and a ratio of at least MIN_RATIO."""
    if not MEASURED:
        return None
    dtype = str(x.dtype).removeprefix("torch.")
    layout, regime = layout_of(x), regime_of(tuple(x.shape))
    for m in MEASURED:
        if (m.op, m.dtype, m.layout, m.regime) == (op, dtype, layout, regime):
            if m.ratio >= MIN_RATIO:
                return m
    return None
