"""One norm layer's forward + backward at detector sizes: normlab vs torch, same run.

Usage:  python benchmarks/norm_layer_step.py [--reps 2000] [--threads 1]
        [--out benchmarks/results/norm_layer_step_cpu.csv]

Locates the detector step's gap (benchmarks/detector_step.py) layer by layer: for each
shape, normlab's BatchNorm2d / GroupNorm and torch's twins run ``layer(x).sum().backward()``
in training mode, alternating in blocks of 100 so that load hits both alike. Prints and
writes the median µs per call of each and their difference (the fixed cost per layer).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import normlab.nn as nln

SHAPES = ((2, 16, 12, 12), (8, 64, 6, 6))


def _block(layer: nn.Module, x: torch.Tensor, n: int = 100) -> float:
    t = time.perf_counter()
    for _ in range(n):
        layer(x).sum().backward()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/norm_layer_step_cpu.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        c = shape[1]
        pairs = {
            "bn": (nln.BatchNorm2d(c), nn.BatchNorm2d(c)),
            "gn": (nln.GroupNorm(4, c), nn.GroupNorm(4, c)),
        }
        x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) + 1.5).requires_grad_()
        for norm, (ours, theirs) in pairs.items():
            times: dict[str, list[float]] = {"normlab": [], "torch": []}
            for layer in (ours, theirs):
                _block(layer, x, 50)  # warm-up
            for _ in range(max(1, args.reps // 100)):
                times["normlab"].append(_block(ours, x))
                times["torch"].append(_block(theirs, x))
            a, b = statistics.median(times["normlab"]), statistics.median(times["torch"])
            rows.append(
                [norm, "x".join(map(str, shape)), round(a, 1), round(b, 1), round(a - b, 1)]
            )
            print(f"{norm} {shape}: normlab {a:.1f} µs, torch {b:.1f} µs, +{a - b:.1f} µs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        f.write(f"# command: python {' '.join(sys.argv)}\n")
        f.write(
            f"# torch {torch.__version__}, python {platform.python_version()}, "
            f"{platform.platform()}, {args.threads} thread(s), CPU\n"
        )
        w = csv.writer(f)
        w.writerow(["norm", "shape", "normlab_median_us", "torch_median_us", "extra_us"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
