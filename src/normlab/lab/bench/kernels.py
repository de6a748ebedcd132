"""Kernel benchmark: forward, backward and forward+backward per provider, against bandwidth.

Normalization is memory-bound, so each timing is also expressed as achieved bandwidth
over the *floor* of bytes any implementation must move (forward: read x, write y;
backward: read x and dy, write dx; parameters are negligible) and as a percentage of a
copy's bandwidth measured in the same run on a tensor of the same size (``dst.copy_(src)``
moves 2 × bytes). Providers:

- ``normlab-triton``: normlab's module with ``backend="triton"`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1`` where it is a correctness smoke test, not a speed);
- ``normlab-torch``: the same module with ``backend="torch"``;
- ``torch``: torch eager (the ``torch.nn`` twin, or for FRN and SN the plain
  module-by-module composite of :mod:`normlab.lab.bench.composites`);
- ``torch.compile``: ``torch.compile`` of that eager module.

Timing: on CUDA each call sits between two CUDA events, after a write of a buffer larger
than L2 (so no call finds its inputs cached) and rotating over several input sets; on
CPU ``time.perf_counter`` around each call. Providers are interleaved call by call, so
background load hits all alike and ratios stay meaningful. Backward is timed alone by
differentiating a graph built, untimed, just before (``torch.autograd.grad``, no
``retain_graph``, which compiled backwards with donated buffers refuse; no accumulation
into ``.grad``). Before timing, every provider's output is checked against torch eager's;
a provider that disagrees is skipped with the error. Memory: on CUDA the peak allocated
during forward+backward above what was allocated before; on CPU the bytes autograd saves
for backward.

Library code returning records: ``normlab bench --suite kernels`` prints and stores them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import nn as nnl
from .composites import COMPOSITES
from .layers import percentile, saved_bytes

__all__ = [
    "ALL_PROVIDERS",
    "KERNEL_LAYERS",
    "PHASES",
    "KernelBenchRecord",
    "bench_kernels",
    "default_providers",
]

PHASES = ("fwd", "bwd", "fwd+bwd")
ALL_PROVIDERS = ("normlab-triton", "normlab-torch", "torch", "torch.compile")
#: Bytes moved at the floor, in units of one tensor of the input's size.
_FLOOR_TENSORS = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


@dataclass(frozen=True)
class KernelBenchRecord:
    layer: str
    shape: str
    layout: str
    dtype: str
    device: str
    provider: str
    phase: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    copy_gbps: float
    pct_of_copy: float
    ratio_vs_torch: float
    mem_mib: float
    reps: int


def _frozen_bn_relu(c: int, backend: str) -> nn.Module:
    return nn.Sequential(nnl.FrozenBatchNorm2d(c, backend=backend), nn.ReLU())  # type: ignore[call-arg]


#: layer -> {"normlab": factory(c, backend), "torch": eager factory(c)}.
KERNEL_LAYERS: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "GroupNorm(32)": {
        "normlab": lambda c, backend: nnl.GroupNorm(32, c, backend=backend),
        "torch": lambda c: nn.GroupNorm(32, c),
    },
    "GroupNorm(32)+SiLU": {
        "normlab": lambda c, backend: nnl.GroupNorm(32, c, act="silu", backend=backend),
        "torch": lambda c: nn.Sequential(nn.GroupNorm(32, c), nn.SiLU()),
    },
    "FRN+TLU": {
        "normlab": lambda c, backend: nnl.FilterResponseNorm2d(c, backend=backend),  # type: ignore[call-arg]
        "torch": COMPOSITES["frn"],
    },
    "SwitchableNorm2d": {
        "normlab": lambda c, backend: nnl.SwitchableNorm2d(c, backend=backend),  # type: ignore[call-arg]
        "torch": COMPOSITES["sn"],
    },
    "FrozenBN+ReLU": {
        "normlab": _frozen_bn_relu,
        "torch": lambda c: nn.Sequential(nn.BatchNorm2d(c).eval(), nn.ReLU()),
    },
}


def default_providers(device: str) -> list[str]:
    """All four on CUDA; on CPU the torch paths (compiling on CPU is slow and not the point)."""
    if device.startswith("cuda"):
        return list(ALL_PROVIDERS)
    return ["normlab-torch", "torch"]


def _build(layer: str, provider: str, c: int) -> nn.Module:
    spec = KERNEL_LAYERS[layer]
    if provider == "normlab-triton":
        return spec["normlab"](c, "triton")
    if provider == "normlab-torch":
        return spec["normlab"](c, "torch")
    if provider == "torch":
        return spec["torch"](c)
    if provider == "torch.compile":
        # One compiled module per shape and config, static shapes (no shared forward
        # recompiling as dynamic).
        return torch.compile(spec["torch"](c), dynamic=False)  # type: ignore[return-value]
    raise ValueError(f"unknown provider {provider!r}; use one of {', '.join(ALL_PROVIDERS)}")


class _Timer:
    """Times one call: CUDA events after an L2 flush, or perf_counter on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.flush = None
        if self.cuda:
            # Larger than any current GPU's L2 (H100: 50 MB).
            self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        assert self.flush is not None
        self.flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def _memory_mib(m: nn.Module, x: torch.Tensor, dy: torch.Tensor, device: str) -> float:
    if not device.startswith("cuda"):
        return saved_bytes(m, x) / 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m(x).backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    x.grad = None
    m.zero_grad(set_to_none=True)
    return peak / 2**20


def bench_kernels(
    shapes: Sequence[tuple[int, ...]],
    *,
    layers: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    layouts: Sequence[str] = ("nchw", "nhwc"),
    reps: int = 20,
    warmup: int = 5,
    input_sets: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[KernelBenchRecord]:
    """Every layer × shape × layout × provider × phase; see the module docstring.

    A provider that cannot run here (no triton, a layer without a kernel) is skipped and
    reported through ``progress``; the ``torch`` provider is always measured since every
    ratio refers to it.
    """
    providers = list(providers or default_providers(device))
    for prov in providers:
        if prov not in ALL_PROVIDERS:
            raise ValueError(f"unknown provider {prov!r}; use one of {', '.join(ALL_PROVIDERS)}")
    if "torch" not in providers:
        providers.append("torch")
    timer = _Timer(device)
    records: list[KernelBenchRecord] = []
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        copy_gbps = _copy_gbps(shape, dtype, device, timer, reps, warmup)
        for layout in layouts:
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            g = torch.Generator().manual_seed(0)
            xs = [
                (1.0 + torch.randn(shape, generator=g))
                .to(device=device, dtype=dtype)
                .to(memory_format=fmt)
                .requires_grad_(True)
                for _ in range(input_sets)
            ]
            dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            dy = dy.to(memory_format=fmt)
            for layer in layers or list(KERNEL_LAYERS):
                if layer not in KERNEL_LAYERS:
                    raise KeyError(f"unknown layer {layer!r}; known: {', '.join(KERNEL_LAYERS)}")
                mods: dict[str, nn.Module] = {}
                for prov in providers:
                    try:
                        mods[prov] = _build(layer, prov, shape[1]).to(device=device, dtype=dtype)
                        mods[prov](xs[0])  # also compiles / checks the backend is usable
                    except (
                        RuntimeError,
                        ValueError,
                        ImportError,
                    ) as e:
                        mods.pop(prov, None)
                        if prov == "torch":
                            raise
                        if progress is not None:
                            progress(f"{layer} {layout}: skipping {prov}: {e}")
                _check_outputs(mods, xs[0], layer, layout, progress)
                times = _time_phases(mods, xs, dy, timer, reps, warmup)
                mem = {p: _memory_mib(m, xs[0], dy, device) for p, m in mods.items()}
                for phase in PHASES:
                    base = statistics.median(times["torch"][phase])
                    for prov in mods:
                        ts = times[prov][phase]
                        med = statistics.median(ts)
                        gbps = _FLOOR_TENSORS[phase] * nbytes / (med * 1e-3) / 1e9
                        rec = KernelBenchRecord(
                            layer=layer,
                            shape="x".join(map(str, shape)),
                            layout=layout,
                            dtype=str(dtype).replace("torch.", ""),
                            device=device,
                            provider=prov,
                            phase=phase,
                            median_ms=med,
                            p20_ms=percentile(ts, 0.2),
                            p80_ms=percentile(ts, 0.8),
                            gbps=gbps,
                            copy_gbps=copy_gbps,
                            pct_of_copy=100.0 * gbps / copy_gbps,
                            ratio_vs_torch=med / base,
                            mem_mib=mem[prov],
                            reps=reps,
                        )
                        records.append(rec)
                        if progress is not None:
                            progress(
                                f"{layer} {rec.shape} {layout} {prov} {phase}: {med:.3f} ms, "
                                f"{gbps:.0f} GB/s ({rec.pct_of_copy:.0f}% of copy)"
                            )
    return records


def _copy_gbps(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, timer: _Timer, reps: int, warmup: int
) -> float:
    src = torch.randn(shape, device=device).to(dtype)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    ts = [timer(lambda: dst.copy_(src)) for _ in range(reps)]
    return 2 * src.numel() * src.element_size() / (statistics.median(ts) * 1e-3) / 1e9


def _check_outputs(
    mods: dict[str, nn.Module],
    x: torch.Tensor,
    layer: str,
    layout: str,
    progress: Callable[[str], None] | None,
) -> None:
    """Drop every provider whose output differs from torch eager's on ``x`` (the
    tolerance of ``torch.testing.assert_close`` for the dtype, loosened 10x)."""
    with torch.no_grad():
        want = mods["torch"](x).float()
        for prov in [p for p in mods if p != "torch"]:
            got = mods[prov](x).float()
            tol = 1e-4 if x.dtype == torch.float32 else 2e-2
            err = (got - want).abs().max().item() if got.numel() else 0.0
            if got.shape != want.shape or not err <= tol * (1.0 + want.abs().max().item()):
                mods.pop(prov)
                if progress is not None:
                    progress(f"{layer} {layout}: skipping {prov}: output off by {err:.3g}")


def _time_phases(
    mods: dict[str, nn.Module],
    xs: list[torch.Tensor],
    dy: torch.Tensor,
    timer: _Timer,
    reps: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {p: {ph: [] for ph in PHASES} for p in mods}
    wrt = {p: [*(q for q in m.parameters() if q.requires_grad)] for p, m in mods.items()}
    k = len(xs)
    for i in range(warmup + reps):
        x = xs[i % k]
        for p, m in mods.items():
            # fwd, then bwd of a fresh graph (built here, untimed), then fwd+bwd.
            t_fwd = timer(lambda m=m, x=x: m(x))
            y = m(x)
            t_bwd = timer(lambda y=y, x=x, p=p: torch.autograd.grad(y, [x, *wrt[p]], dy))
            t_both = timer(lambda m=m, x=x, p=p: torch.autograd.grad(m(x), [x, *wrt[p]], dy))
            if i >= warmup:
                for phase, t in zip(PHASES, (t_fwd, t_bwd, t_both), strict=True):
                    out[p][phase].append(t)
    return out
