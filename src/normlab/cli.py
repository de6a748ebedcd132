"""Command line: parse arguments, call the library, print. Nothing else lives here.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lab.train import RunRecord

__all__ = ["main"]


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,8, got {text!r}"
        ) from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` names them."""
    values = _int_list(text)
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"--seeds needs >= 1 seed, got {text!r}")
        return list(range(values[0]))
    return values


def _print_table(records: Sequence[RunRecord]) -> None:
    from .lab.report import markdown_table, summarize

    print("\n".join(markdown_table(summarize(records))))


def _add_report_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="normlab-report", help="report folder (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    from .lab.sweep import DEFAULT_BATCH_SIZES
    from .lab.train import RunConfig

    p = subparsers.add_parser(
        "sweep",
        help="train norms × batch sizes × seeds and report test error",
        description="Train a small ResNet for every norm × batch size × seed, store each "
        "finished run in SQLite (rerun to resume), and write a report.",
    )
    p.add_argument(
        "--norms",
        type=_name_list,
        help="comma-separated norm names "
        "(default and 'all': bn, gn and the small-batch family frn, sn, mabn, brn)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=list(DEFAULT_BATCH_SIZES),
        help="comma-separated batch sizes (default: 2,4,8,16,32)",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="number of seeds, or comma-separated seeds (default: 3)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=RunConfig.epochs,
        help="epochs at every batch size (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=RunConfig.base_lr,
        help="learning rate at batch 32; scaled linearly (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        help="a .npz with x, y or a folder of class sub-folders "
        "(default: the embedded Animal-MNIST)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=RunConfig.image_size,
        help="images are resized to this square size (default: %(default)s)",
    )
    p.add_argument(
        "--max-train",
        type=int,
        default=RunConfig.max_train,
        help="training subset size; 0 = all (default: %(default)s)",
    )
    p.add_argument(
        "--db",
        default="normlab-sweep.db",
        help="SQLite run store; rerun with the same --db to resume (default: %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="parallel worker processes (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--no-pack",
        action="store_true",
        help="train every seed in its own model (default: the seeds of a norm × batch "
        "size cell train side by side in one packed model: same runs, less time)",
    )
    p.add_argument(
        "--per-rank-batch",
        action="store_true",
        help="under torchrun: train each run data-parallel over all ranks, batch sizes per "
        "rank (BN sees the per-rank batch, bn+sync the global one; default norms: "
        "bn,bn+sync,gn). Without it torchrun shards whole runs over the ranks.",
    )
    _add_report_outputs(p)


def _run_sweep(args: argparse.Namespace) -> int:
    from .lab.report import summarize, write_json, write_report
    from .lab.sweep import SweepConfig, default_norms, expand_norms, run_sweep

    config = SweepConfig(
        norms=expand_norms(args.norms) if args.norms else default_norms(args.per_rank_batch),
        batch_sizes=args.batch_sizes,
        seeds=args.seeds,
        epochs=args.epochs,
        base_lr=args.lr,
        data=args.data,
        image_size=args.image_size,
        max_train=args.max_train or None,
        device=args.device,
        per_rank_batch=args.per_rank_batch,
        pack=not args.no_pack,
    )
    # Validate every run's config before any training starts.
    config.runs()
    try:
        result = run_sweep(config, args.db, workers=args.workers, progress=not args.quiet)
    except KeyboardInterrupt:
        print(
            f"interrupted; finished runs are stored in {args.db}. Rerun the same command "
            "to resume.",
            file=sys.stderr,
        )
        return 130
    if not result.records or os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 alone reports (it holds the merged store)
    files = write_report(result.records, args.out)
    if args.json:
        write_json(summarize(result.records), args.json)
    if not args.quiet:
        _print_table(result.records)
        print(
            f"\n{result.new_runs} new run(s), {result.skipped_runs} already stored; "
            f"{result.wall_time:.0f} s. Store: {result.db}. Report: {files.markdown}"
        )
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="re-render the report of a sweep store",
        description="Re-render the table, plot and Markdown report from a run store.",
    )
    p.add_argument("db", help="SQLite run store written by `normlab sweep`")
    _add_report_outputs(p)


def _run_report(args: argparse.Namespace) -> int:
    from .lab.report import summarize, write_json, write_report
    from .lab.store import RunStore

    with RunStore(args.db, create=False) as store:
        records = store.records()
    if not records:
        print(f"{args.db}: the store holds no runs yet; run `normlab sweep`", file=sys.stderr)
        return 1
    files = write_report(records, args.out)
    if args.json:
        write_json(summarize(records), args.json)
    if not args.quiet:
        _print_table(records)
        print(f"\nReport: {files.markdown}")
    return 0


def _add_check(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser(
        "check",
        help="list every layer and verify it against its float64 reference",
        description="Build every catalogue layer in float64 with random parameters, run "
        "forward and backward on fresh off-center data and compare with normlab.reference.",
    )


def _run_check(args: argparse.Namespace) -> int:
    from .selfcheck import run_checks

    results = run_checks()
    print(f"{'layer':52} {'family':10} {'max |dy|':>10} {'max |dgrad|':>12}  result")
    for r in results:
        verdict = "ok" if r.ok else "FAIL"
        print(
            f"{r.name:52} {r.family:10} {r.max_abs_err_y:10.2e} {r.max_abs_err_grads:12.2e}"
            f"  {verdict}"
        )
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _add_doctor(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="find BatchNorm pitfalls in a model",
        description="Load a model from 'path/to/file.py:factory' (or 'package.module:factory'; "
        "the factory takes no arguments and returns (model, example_inputs)), run it once "
        "with hooks and report findings with severity, module, explanation and fix.",
    )
    p.add_argument("target", help="path/to/file.py:factory or package.module:factory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--expect-eval",
        action="store_true",
        help="say that you are evaluating: flags layers still in training mode",
    )


def _run_doctor(args: argparse.Namespace) -> int:
    from .doctor import DoctorTargetError, diagnose, load_factory

    try:
        model, inputs = load_factory(args.target)
    except DoctorTargetError as e:
        print(f"normlab doctor: cannot load {args.target} ({e.part}): {e}", file=sys.stderr)
        return 2
    report = diagnose(model, inputs, expect_eval=True if args.expect_eval else None)
    print(report.to_json() if args.json else report.to_table())
    return 0 if report.ok else 1


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time normlab's layers against torch.nn (forward+backward, saved memory)",
        description="Forward+backward median/p20/p80 time and bytes saved for backward, "
        "normlab vs torch.nn, interleaved in one run; optionally written as CSV.",
    )
    p.add_argument(
        "--shape",
        type=_int_list,
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
    p.add_argument("--layers", type=_name_list, help="comma-separated layer names")
    p.add_argument(
        "--providers",
        type=_name_list,
        help="kernels suite: comma-separated providers (default: all four on CUDA, "
        "normlab-torch,torch on CPU)",
    )
    p.add_argument(
        "--layouts",
        type=_name_list,
        default=["nchw", "nhwc"],
        help="kernels suite: nchw and/or nhwc (channels_last) (default: both)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"]
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--csv", type=Path, help="write the records to this CSV")


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .lab.bench import bench_layers, write_csv

    if args.suite == "kernels":
        return _run_bench_kernels(args)
    shapes = [tuple(s) for s in (args.shape or [[8, 64, 56, 56], [2, 256, 32, 32]])]
    records = bench_layers(
        shapes,
        layers=args.layers,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        reps=args.reps,
    )
    print(
        f"{'layer':22} {'shape':14} {'provider':8} {'median ms':>10} {'p20':>8} {'p80':>8} "
        f"{'ratio':>6} {'saved MiB':>9}"
    )
    for r in records:
        print(
            f"{r.layer:22} {r.shape:14} {r.provider:8} {r.median_ms:10.3f} {r.p20_ms:8.3f} "
            f"{r.p80_ms:8.3f} {r.ratio_vs_torch:6.2f} {r.saved_bytes / 2**20:9.2f}"
        )
    if args.csv:
        write_csv(records, args.csv, "normlab " + " ".join(args.argv))
        print(f"wrote {args.csv}")
    return 0


def _run_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from .lab.bench import write_csv
    from .lab.bench_kernels import bench_kernels

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
    print(
        f"{'layer':20} {'shape':15} {'layout':6} {'provider':14} {'phase':7} {'median ms':>10} "
        f"{'p20':>8} {'p80':>8} {'GB/s':>7} {'%copy':>6} {'ratio':>6} {'MiB':>8}"
    )
    for r in records:
        print(
            f"{r.layer:20} {r.shape:15} {r.layout:6} {r.provider:14} {r.phase:7} "
            f"{r.median_ms:10.3f} {r.p20_ms:8.3f} {r.p80_ms:8.3f} {r.gbps:7.1f} "
            f"{r.pct_of_copy:6.1f} {r.ratio_vs_torch:6.2f} {r.mem_mib:8.2f}"
        )
    if args.csv:
        write_csv(records, args.csv, "normlab " + " ".join(args.argv))
        print(f"wrote {args.csv}")
    return 0


_COMMANDS = {
    "sweep": _run_sweep,
    "report": _run_report,
    "check": _run_check,
    "doctor": _run_doctor,
    "bench": _run_bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description="normlab command line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_sweep(subparsers)
    _add_report(subparsers)
    _add_check(subparsers)
    _add_doctor(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``normlab``; returns the exit status."""
    from .lab.data import DataError
    from .lab.store import StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _COMMANDS[args.command](args)
    except (DataError, StoreError, ValueError, KeyError) as e:
        print(f"normlab {args.command}: error: {e}", file=sys.stderr)
        return 2
