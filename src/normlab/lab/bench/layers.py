"""Speed and memory of normlab's layers against torch.nn, measured in the same run.

Library code returning records; ``benchmarks/`` scripts and the CLI print and
store them. On CPU each repetition times normlab and torch back to back
(interleaved), so background load hits both alike and the ratio stays
meaningful. Memory is the number of bytes autograd saves for backward
(exact, via ``saved_tensors_hooks``): the activation memory a layer adds to
training. Forward+backward time is wall-clock, median and p20/p80.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import __version__
from ... import nn as nnl
from ...registry import create_norm
from .composites import COMPOSITES

__all__ = [
    "BenchRecord",
    "LAYER_PAIRS",
    "SMALL_BATCH_LAYERS",
    "bench_layers",
    "write_csv",
    "provenance",
    "spread_warning",
]


@dataclass(frozen=True)
class BenchRecord:
    layer: str
    shape: str
    dtype: str
    device: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    ratio_vs_torch: float
    saved_bytes: int
    reps: int


Factory = Callable[[int], nn.Module]

# name -> {provider: factory(C)}. "torch" is the baseline every ratio refers to: the
# torch.nn twin where torch has the layer, else torch.nn.BatchNorm2d on the same
# tensor; "composite" is the plain autograd version of the same math.
LAYER_PAIRS: dict[str, dict[str, Factory]] = {
    "BatchNorm2d": {"normlab": nnl.BatchNorm2d, "torch": nn.BatchNorm2d},
    "GroupNorm(32)": {
        "normlab": lambda c: nnl.GroupNorm(32, c),
        "torch": lambda c: nn.GroupNorm(32, c),
    },
    "InstanceNorm2d": {
        "normlab": lambda c: nnl.InstanceNorm2d(c, affine=True),
        "torch": lambda c: nn.InstanceNorm2d(c, affine=True),
    },
    "LocalResponseNorm(5)": {
        "normlab": lambda c: nnl.LocalResponseNorm(5),
        "torch": lambda c: nn.LocalResponseNorm(5),
    },
    "BatchNorm2d eval": {
        "normlab": lambda c: nnl.BatchNorm2d(c).eval(),
        "torch": lambda c: nn.BatchNorm2d(c).eval(),
    },
}

SMALL_BATCH_LAYERS: dict[str, dict[str, Factory]] = {
    name: {
        "normlab": lambda c, n=name: create_norm(n, c),
        "composite": COMPOSITES[name],
        "torch": nn.BatchNorm2d,
    }
    for name in ("sn", "frn", "mabn", "brn", "evonorm_b0", "evonorm_s0")
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fwd_bwd(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = m(x)
    if y.requires_grad:
        y.backward(dy)
        x.grad = None
        m.zero_grad(set_to_none=True)


def saved_bytes(m: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``m(x)``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    return total


#: p80 / p20 above this: the timings of one measurement disagree too much to compare.
SPREAD_LIMIT = 1.3


def spread_warning(records: Sequence[Any], limit: float = SPREAD_LIMIT) -> str | None:
    """A warning when a record's p80/p20 exceeds ``limit`` (else ``None``).

    Interleaving keeps the normlab/torch ratio fair under steady load, but bursts of
    load widen the spread of single timings; past ``limit`` the medians move from run to
    run by more than the differences they are meant to show.
    """
    wide = [r for r in records if r.p20_ms > 0 and r.p80_ms / r.p20_ms > limit]
    if not wide:
        return None
    worst = max(wide, key=lambda r: r.p80_ms / r.p20_ms)
    return (
        f"timings spread widely (p80/p20 above {limit} in {len(wide)} of {len(records)} "
        f"measurements, up to {worst.p80_ms / worst.p20_ms:.2f} for {worst.layer} "
        f"{worst.shape} {worst.provider}); the machine may be busy; rerun with more --reps"
    )


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def bench_layers(
    shapes: list[tuple[int, ...]],
    layers: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    reps: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRecord]:
    """Forward+backward of each layer on each shape, every provider timed back to back.

    ``layers`` defaults to the classic layers; names of :data:`SMALL_BATCH_LAYERS`
    (``"sn"``, ``"frn"``, ...) add normlab vs its composite vs torch BatchNorm2d.
    """
    records: list[BenchRecord] = []
    for shape in shapes:
        c = shape[1]
        pairs = {**LAYER_PAIRS, **SMALL_BATCH_LAYERS}
        pairs["LayerNorm[C,H,W]"] = {
            "normlab": lambda _c, s=shape: nnl.LayerNorm(list(s[1:])),
            "torch": lambda _c, s=shape: nn.LayerNorm(list(s[1:])),
        }
        for name in layers or [*LAYER_PAIRS, "LayerNorm[C,H,W]"]:
            if name not in pairs:
                raise KeyError(f"unknown layer {name!r}; known: {', '.join(pairs)}")
            mods = {prov: f(c).to(device=device, dtype=dtype) for prov, f in pairs[name].items()}
            g = torch.Generator().manual_seed(0)
            inputs = [
                (3.0 + 2.0 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
                for _ in range(2)
            ]
            dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            xs = [x.requires_grad_(True) for x in inputs]

            times: dict[str, list[float]] = {k: [] for k in mods}
            for i in range(warmup + reps):
                for prov, m in mods.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    _fwd_bwd(m, xs[i % len(xs)], dy)
                    _sync(device)
                    if i >= warmup:
                        times[prov].append((time.perf_counter() - t0) * 1e3)
            torch_median = statistics.median(times["torch"])
            for prov, m in mods.items():
                med = statistics.median(times[prov])
                rec = BenchRecord(
                    layer=name,
                    shape="x".join(map(str, shape)),
                    dtype=str(dtype).replace("torch.", ""),
                    device=device,
                    provider=prov,
                    median_ms=med,
                    p20_ms=percentile(times[prov], 0.2),
                    p80_ms=percentile(times[prov], 0.8),
                    ratio_vs_torch=med / torch_median,
                    saved_bytes=saved_bytes(m, xs[0]),
                    reps=reps,
                )
                records.append(rec)
                if progress is not None:
                    progress(f"{name} {rec.shape} {prov}: {med:.2f} ms ({rec.ratio_vs_torch:.2f}x)")
    return records


def provenance(device: str = "cpu") -> dict[str, str]:
    """Versions, machine, GPU and git revision for the results file."""
    from importlib import metadata

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        rev = ""
    try:
        triton = metadata.version("triton")  # the version only: triton is not imported
    except metadata.PackageNotFoundError:
        triton = "not installed"
    out = {
        "normlab": __version__,
        "torch": torch.__version__,
        "triton": triton,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "git": rev or "unknown",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
        out["cuda"] = str(torch.version.cuda)
    return out


def write_csv(records: Sequence[Any], path: str | Path, command: str) -> Path:
    """Write records (dataclasses of one type) as CSV, headed by the command and provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError("no records to write")
    cols = [f.name for f in fields(records[0])]
    device = str(getattr(records[0], "device", "cpu"))
    lines = [f"# command: {command}"]
    lines += [f"# {k}: {v}" for k, v in provenance(device).items()]
    lines.append(",".join(cols))
    for r in records:
        d = asdict(r)
        lines.append(
            ",".join(f"{d[c]:.4f}" if isinstance(d[c], float) else str(d[c]) for c in cols)
        )
    path.write_text("\n".join(lines) + "\n")
    return path
