"""Forward+backward time and saved-activation memory of normlab's layers vs torch.

Usage:  python benchmarks/classic_cpu.py [--family classic|small-batch] [--reps 20]
        [--out benchmarks/results/...csv]
classic: each layer vs its torch.nn twin. small-batch: SN, FRN+TLU, MABN, BRN,
EvoNorm B0/S0 vs a plain autograd composite of the same math and vs
torch.nn.BatchNorm2d on the same tensor.
Prints a table (median ms, p20/p80, ratio normlab/torch measured in the same run)
and writes the CSV with the command and provenance.
"""

from __future__ import annotations

import argparse
import sys

import torch

from normlab.lab.bench import SMALL_BATCH_LAYERS, bench_layers, write_csv

SHAPES = [(8, 64, 56, 56), (2, 256, 32, 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--family", default="classic", choices=["classic", "small-batch"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    layers = list(SMALL_BATCH_LAYERS) if args.family == "small-batch" else None
    records = bench_layers(SHAPES, layers=layers, dtype=dtype, reps=args.reps, progress=print)
    print(
        f"\n{'layer':22} {'shape':14} {'provider':8} {'median':>9} {'p20':>8} {'p80':>8} "
        f"{'ratio':>6} {'saved MB':>9}"
    )
    for r in records:
        print(
            f"{r.layer:22} {r.shape:14} {r.provider:8} {r.median_ms:8.2f}ms {r.p20_ms:8.2f} "
            f"{r.p80_ms:8.2f} {r.ratio_vs_torch:6.2f} {r.saved_bytes / 2**20:9.1f}"
        )
    out = args.out or (
        f"benchmarks/results/{args.family}_fwdbwd_{args.dtype}_cpu_torch{torch.__version__.split('+')[0]}.csv"
    )
    cmd = "python " + " ".join(sys.argv)
    print("wrote", write_csv(records, out, cmd))


if __name__ == "__main__":
    main()
