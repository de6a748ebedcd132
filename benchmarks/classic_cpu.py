"""Time and saved-activation memory of normlab's layers vs torch, measured in the same run.

Usage:  python benchmarks/classic_cpu.py [--family classic|small-batch|eval] [--reps 20]
        [--out benchmarks/results/...csv]
classic: each layer vs its torch.nn twin, forward+backward. small-batch: SN, FRN+TLU,
MABN, BRN, EvoNorm B0/S0 vs a plain autograd composite of the same math and vs
torch.nn.BatchNorm2d on the same tensor. eval: BatchNorm2d in eval mode and
FrozenBatchNorm2d with calibrated (off-center) statistics, forward alone (no_grad)
and forward+backward, vs torch.nn.BatchNorm2d in eval mode (for the frozen layer with
γ, β frozen: the same computation).
Prints a table (median ms, p20/p80, ratio normlab/torch measured in the same run)
and writes the CSV with the command and provenance.

``--clock thread`` (eval family): the CPU time of the calling thread, with torch on
one thread, instead of wall-clock time: on a shared machine the time this process
waits for a core does not count, so before/after runs compare the work done; it
is not the wall-clock speed of a multi-threaded run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import normlab.nn as nnl
from normlab.lab.bench.layers import (
    SMALL_BATCH_LAYERS,
    BenchRecord,
    bench_layers,
    percentile,
    saved_bytes,
    write_csv,
)

SHAPES = [(8, 64, 56, 56), (2, 256, 32, 32)]
MEAN, STD = 3.0, 2.0  # of the benchmark input; the eval layers' statistics match it


def _calibrated(m: nn.Module, c: int, frozen_affine: bool) -> nn.Module:
    """Running statistics of the input (mean 3, var 4), a non-trivial γ and β."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.running_mean.copy_(MEAN + 0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(STD**2 * (1 + 0.1 * torch.rand(c, generator=g)))
        m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
    if frozen_affine:
        for p in m.parameters():
            p.requires_grad_(False)
    return m.eval()


def _eval_pairs() -> dict[str, dict[str, Callable[[int], nn.Module]]]:
    return {
        "BatchNorm2d eval": {
            "normlab": lambda c: _calibrated(nnl.BatchNorm2d(c), c, False),
            "torch": lambda c: _calibrated(nn.BatchNorm2d(c), c, False),
        },
        "FrozenBatchNorm2d": {
            "normlab": lambda c: _calibrated(nnl.FrozenBatchNorm2d(c), c, True),
            "torch": lambda c: _calibrated(nn.BatchNorm2d(c), c, True),
        },
    }


def bench_eval(
    shapes: list[tuple[int, ...]],
    reps: int,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> list[BenchRecord]:
    """Forward (no_grad) and forward+backward of the eval layers, providers interleaved."""
    records: list[BenchRecord] = []
    for shape in shapes:
        c = shape[1]
        g = torch.Generator().manual_seed(0)
        x = (MEAN + STD * torch.randn(shape, generator=g)).requires_grad_(True)
        dy = torch.randn(shape, generator=g)
        for name, pair in _eval_pairs().items():
            mods = {prov: f(c) for prov, f in pair.items()}
            for mode in ("fwd", "fwd+bwd"):
                times: dict[str, list[float]] = {k: [] for k in mods}
                for i in range(warmup + reps):
                    for prov, m in mods.items():
                        t0 = clock()
                        if mode == "fwd":
                            with torch.no_grad():
                                m(x)
                        else:
                            m(x).backward(dy)
                            x.grad = None
                        if i >= warmup:
                            times[prov].append((clock() - t0) * 1e3)
                base = statistics.median(times["torch"])
                for prov, m in mods.items():
                    med = statistics.median(times[prov])
                    records.append(
                        BenchRecord(
                            layer=f"{name} {mode}",
                            shape="x".join(map(str, shape)),
                            dtype="float32",
                            device="cpu",
                            provider=prov,
                            median_ms=med,
                            p20_ms=percentile(times[prov], 0.2),
                            p80_ms=percentile(times[prov], 0.8),
                            ratio_vs_torch=med / base,
                            saved_bytes=saved_bytes(m, x) if mode != "fwd" else 0,
                            reps=reps,
                        )
                    )
                    print(f"{name} {mode} {records[-1].shape} {prov}: {med:.3f} ms")
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--family", default="classic", choices=["classic", "small-batch", "eval"])
    ap.add_argument("--clock", default="wall", choices=["wall", "thread"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.clock == "thread" and args.family != "eval":
        ap.error("--clock thread is for --family eval (the other families time wall-clock)")
    if args.family == "eval":
        if dtype != torch.float32:
            ap.error("--family eval measures float32 only")
        if args.clock == "thread":
            torch.set_num_threads(1)  # thread_time counts the calling thread only
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        records = bench_eval(SHAPES, args.reps, clock=clock)
    else:
        layers = list(SMALL_BATCH_LAYERS) if args.family == "small-batch" else None
        records = bench_layers(SHAPES, layers=layers, dtype=dtype, reps=args.reps, progress=print)
    print(
        f"\n{'layer':28} {'shape':14} {'provider':11} {'median':>9} {'p20':>8} {'p80':>8} "
        f"{'ratio':>6} {'saved MB':>9}"
    )
    for r in records:
        print(
            f"{r.layer:28} {r.shape:14} {r.provider:11} {r.median_ms:8.2f}ms {r.p20_ms:8.2f} "
            f"{r.p80_ms:8.2f} {r.ratio_vs_torch:6.2f} {r.saved_bytes / 2**20:9.1f}"
        )
    out = args.out or (
        f"benchmarks/results/{args.family}_fwdbwd_{args.dtype}_cpu_torch{torch.__version__.split('+')[0]}.csv"
    )
    cmd = "python " + " ".join(sys.argv)
    print("wrote", write_csv(records, out, cmd))


if __name__ == "__main__":
    main()
