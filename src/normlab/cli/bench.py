"""``normlab bench``: time normlab's layers (or kernels) against torch, print, write CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..lab.sweep.paths import check_output_file
from .args import int_list, name_list, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time normlab's layers against torch.nn (forward+backward, saved memory)",
        description="Forward+backward median/p20/p80 time and bytes saved for backward, "
        "normlab vs torch.nn, interleaved in one run; optionally written as CSV.",
    )
    p.add_argument(
        "--shape",
        type=int_list,
        action="append",
        help="input shape N,C,H,W (repeatable; default: 8,64,56,56 and 2,256,32,32)",
    )
    p.add_argument(
        "--suite",
        default="layers",
        choices=["layers", "kernels"],
        help="layers: forward+backward of every layer vs torch.nn (default); kernels: "
        "fwd / bwd / fwd+bwd per provider (normlab-triton, normlab-torch, torch eager, "
        "torch.compile) with GB/s and %% of a copy's bandwidth",
    )
    p.add_argument("--layers", type=name_list, help="comma-separated layer names")
    p.add_argument(
        "--providers",
        type=name_list,
        help="kernels suite: comma-separated providers (default: all four on CUDA, "
        "normlab-torch,torch on CPU)",
    )
    p.add_argument(
        "--layouts",
        type=name_list,
        default=["nchw", "nhwc"],
        help="kernels suite: nchw and/or nhwc (channels_last) (default: both)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="dtype of inputs and layers (default: %(default)s)",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)"
    )
    p.add_argument(
        "--reps",
        type=positive_int,
        default=20,
        help="timed repetitions of each measurement, after a few warm-up ones; more reps "
        "steady the median on a busy machine (default: %(default)s)",
    )
    p.add_argument("--csv", type=Path, help="write the records to this CSV")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..lab.bench.layers import bench_layers
    from ..lab.sweep.devices import check_device

    if args.csv:
        check_output_file(args.csv, "--csv")
    check_device(args.device)
    if args.suite == "kernels":
        return _run_kernels(args)
    shapes = [tuple(s) for s in (args.shape or [[8, 64, 56, 56], [2, 256, 32, 32]])]
    records = bench_layers(
        shapes,
        layers=args.layers,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        reps=args.reps,
    )
    header = (
        f"{'layer':22} {'shape':14} {'provider':8} {'median ms':>10} {'p20':>8} {'p80':>8} "
        f"{'ratio':>6} {'saved MiB':>9}"
    )
    return _report(
        args,
        records,
        header,
        lambda r: (
            f"{r.layer:22} {r.shape:14} {r.provider:8} {r.median_ms:10.3f} {r.p20_ms:8.3f} "
            f"{r.p80_ms:8.3f} {r.ratio_vs_torch:6.2f} {r.saved_bytes / 2**20:9.2f}"
        ),
    )


def _run_kernels(args: argparse.Namespace) -> int:
    import torch

    from ..lab.bench.kernels import bench_kernels

    for layout in args.layouts:
        if layout not in ("nchw", "nhwc"):
            print(f"normlab bench: unknown layout {layout!r}; use nchw, nhwc", file=sys.stderr)
            return 2
    default = (
        [[8, 256, 64, 64], [2, 512, 128, 128]]
        if args.device.startswith("cuda")
        else [
            [8, 64, 56, 56],
            [2, 256, 32, 32],
        ]
    )
    shapes = [tuple(s) for s in (args.shape or default)]
    records = bench_kernels(
        shapes,
        layers=args.layers,
        providers=args.providers,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        layouts=args.layouts,
        reps=args.reps,
        progress=lambda msg: print(msg, file=sys.stderr) if "skipping" in msg else None,
    )
    header = (
        f"{'layer':20} {'shape':15} {'layout':6} {'provider':14} {'phase':7} {'median ms':>10} "
        f"{'p20':>8} {'p80':>8} {'GB/s':>7} {'%copy':>6} {'ratio':>6} {'MiB':>8}"
    )
    return _report(
        args,
        records,
        header,
        lambda r: (
            f"{r.layer:20} {r.shape:15} {r.layout:6} {r.provider:14} {r.phase:7} "
            f"{r.median_ms:10.3f} {r.p20_ms:8.3f} {r.p80_ms:8.3f} {r.gbps:7.1f} "
            f"{r.pct_of_copy:6.1f} {r.ratio_vs_torch:6.2f} {r.mem_mib:8.2f}"
        ),
    )


def _report(
    args: argparse.Namespace, records: Sequence[Any], header: str, row: Callable[[Any], str]
) -> int:
    """Print the table (``header``, then ``row(r)`` per record), warn when repetitions
    disagree (then the medians and ratios are not to be trusted), write ``--csv``."""
    from ..lab.bench.layers import spread_warning, write_csv

    print(header)
    for r in records:
        print(row(r))
    warning = spread_warning(records)
    if warning:
        print(f"normlab bench: warning: {warning}", file=sys.stderr)
    if args.csv:
        write_csv(records, args.csv, "normlab " + " ".join(args.argv))
        print(f"wrote {args.csv}")
    return 0
