"""The lab's commands, ``normlab sweep``, ``normlab report`` and ``normlab bench``:
parse arguments, call the lab, print. :mod:`normlab.cli` wires them into ``normlab``.

Each command is a pair ``add_<name>(subparsers)`` / ``run_<name>(args) -> int``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_args import GivenOption, int_at_least, int_list, name_list, positive_int
from .cli_length import add_length_arguments
from .cli_model import add_model_arguments
from .cli_task import add_lr_argument, add_task_arguments, print_results, task_options
from .paths import check_output_file, check_report_outputs, check_store_path

if TYPE_CHECKING:
    from .runner import SweepInterrupted

__all__ = [
    "RUNNERS",
    "add_bench",
    "add_report",
    "add_sweep",
    "run_bench",
    "run_report",
    "run_sweep",
]


def _seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` names them."""
    values = int_list(text)
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"--seeds needs >= 1 seed, got {text!r}")
        return list(range(values[0]))
    return values


def _add_report_outputs(p: argparse.ArgumentParser, *, progress: bool) -> None:
    p.add_argument("--out", default="normlab-report", help="report folder (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON to this path")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, no table" if progress else "print nothing (no table)",
    )


def add_sweep(subparsers: argparse._SubParsersAction) -> None:
    from . import defaults

    p = subparsers.add_parser(
        "sweep",
        help="train norms × batch sizes × seeds and report test error",
        description="Train a small ResNet (or your --model) for every norm × batch size × "
        "seed, store each finished run in SQLite (rerun to resume), and write a report.",
    )
    add_model_arguments(p)
    add_task_arguments(p)
    p.add_argument(
        "--norms",
        type=name_list,
        help="comma-separated norm names "
        "(default and 'all': bn, gn and the small-batch family frn, sn, mabn, brn)",
    )
    p.add_argument(
        "--batch-sizes",
        type=int_list,
        action=GivenOption,
        default=list(defaults.DEFAULT_BATCH_SIZES),
        help="comma-separated batch sizes (default: 2,4,8,16,32; segmentation: 2,4,8,32)",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="number of seeds, or comma-separated seeds (default: 3)",
    )
    add_length_arguments(p, defaults.DEFAULT_EPOCHS)
    add_lr_argument(p)
    p.add_argument(
        "--data",
        help="a .npz with x, y or a folder of class sub-folders; segmentation: a folder of "
        "images/ and masks/ (default: embedded Animal-MNIST; built-in silhouette scenes)",
    )
    p.add_argument(
        "--image-size",
        type=int_at_least(4),
        action=GivenOption,
        default=defaults.DEFAULT_IMAGE_SIZE,
        help="images are resized to this square size (default: %(default)s; segmentation: 32)",
    )
    p.add_argument(
        "--max-train",
        type=int_at_least(0, " (0 = all)"),
        action=GivenOption,
        default=defaults.DEFAULT_MAX_TRAIN,
        help="training subset size; 0 = all (default: %(default)s; segmentation: 1200 scenes)",
    )
    p.add_argument(
        "--db",
        default="normlab-sweep.db",
        help="SQLite run store; rerun with the same --db to resume (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="parallel worker processes (default: %(default)s)",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)"
    )
    p.add_argument(
        "--allow-mixed-protocols",
        action="store_true",
        help="store runs into a --db that holds runs of another protocol (other epochs, "
        "lr, data...); the report then shows each protocol in rows of its own. Without "
        "it such a sweep is refused",
    )
    p.add_argument(
        "--no-pack",
        action="store_true",
        help="train every seed in its own model (default: the seeds of a norm × batch "
        "size cell train side by side in one packed model: same runs, less time)",
    )
    p.add_argument(
        "--per-rank-batch",
        action="store_true",
        help="under torchrun: the ranks train each run together (DDP), batch sizes per rank: "
        "BN sees the per-rank batch, bn+sync the global one (default norms bn,bn+sync,gn)",
    )
    _add_report_outputs(p, progress=True)


def run_sweep(args: argparse.Namespace) -> int:
    check_report_outputs(args.out, args.json)
    check_store_path(args.db, write=True)
    from .report import summarize, write_json, write_report
    from .sweep import RankFailedError, SweepConfig, SweepInterrupted, default_norms, expand_norms
    from .sweep import run_sweep as sweep

    config = SweepConfig(
        **task_options(args),  # evaluated first: puts the task's defaults into args
        norms=expand_norms(args.norms) if args.norms else default_norms(args.per_rank_batch),
        batch_sizes=args.batch_sizes,
        seeds=args.seeds,
        epochs=args.epochs,
        steps=args.steps,
        base_lr=args.lr,
        data=args.data,
        image_size=args.image_size,
        max_train=args.max_train or None,
        device=args.device,
        per_rank_batch=args.per_rank_batch,
        pack=not args.no_pack,
        model=args.model,
    )
    # Validate every run's config before any training starts.
    config.runs()
    try:
        result = sweep(
            config,
            args.db,
            workers=args.workers,
            progress=not args.quiet,
            allow_mixed_protocols=args.allow_mixed_protocols,
        )
    except KeyboardInterrupt as e:  # normlab.cli.main prints the message
        e.args = (
            _interrupted_message(e, args.db)
            if isinstance(e, SweepInterrupted)
            else f"interrupted; finished runs are stored in {args.db}. Rerun the same "
            "command to resume.",
        )
        raise
    except RankFailedError as e:  # under torchrun: a rank failed, every rank stopped
        print(f"normlab sweep: error: {e}", file=sys.stderr)
        return 1
    if not result.records or os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 alone, which holds the store, reports
    files = write_report(result.records, args.out)
    if args.json:
        write_json(summarize(result.records), args.json)
    if not args.quiet:
        print_results(result.records)
        print(
            f"\n{result.new_runs} new run(s), {result.skipped_runs} already stored; "
            f"{result.wall_time:.0f} s. Store: {result.db}. Report: {files.markdown}"
        )
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="re-render the report of a sweep store",
        description="Re-render the table, plot and Markdown report from a run store.",
    )
    p.add_argument("db", help="SQLite run store written by `normlab sweep`")
    _add_report_outputs(p, progress=False)


def run_report(args: argparse.Namespace) -> int:
    check_report_outputs(args.out, args.json)
    check_store_path(args.db, write=False, option="store")
    from .report import summarize, write_json, write_report
    from .store import RunStore

    with RunStore(args.db, readonly=True) as store:
        records = store.records()
    if not records:
        print(f"{args.db}: the store holds no runs yet; run `normlab sweep`", file=sys.stderr)
        return 1
    files = write_report(records, args.out)
    if args.json:
        write_json(summarize(records), args.json)
    if not args.quiet:
        print_results(records)
        print(f"\nReport: {files.markdown}")
    return 0


def add_bench(subparsers: argparse._SubParsersAction) -> None:
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


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_layers, write_csv
    from .devices import check_device

    if args.csv:
        check_output_file(args.csv, "--csv")
    check_device(args.device)
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
    _warn_spread(records)
    if args.csv:
        write_csv(records, args.csv, "normlab " + " ".join(args.argv))
        print(f"wrote {args.csv}")
    return 0


def _run_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from .bench import write_csv
    from .bench_kernels import bench_kernels

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
    _warn_spread(records)
    if args.csv:
        write_csv(records, args.csv, "normlab " + " ".join(args.argv))
        print(f"wrote {args.csv}")
    return 0


def _interrupted_message(e: SweepInterrupted, db: str) -> str:
    """What Ctrl-C kept and what it dropped, and how to go on."""
    cells: dict[tuple[str, int], list[int]] = {}
    for r in e.dropped:
        cells.setdefault((r.norm, r.batch_size), []).append(r.seed)
    dropped = "; ".join(
        f"{norm} at batch {b}, seed(s) {', '.join(map(str, seeds))}"
        for (norm, b), seeds in cells.items()
    )
    return (
        f"interrupted: {e.stored} run(s) finished during this sweep and are stored in {db}; "
        + (f"{len(e.dropped)} run(s) in flight were dropped ({dropped}); " if e.dropped else "")
        + f"{e.not_started} had not started. Rerun the same command to resume."
    )


def _warn_spread(records: Sequence[Any]) -> None:
    """Say so when repetitions disagree: then the medians (and ratios) are not to be trusted."""
    from .bench import spread_warning

    warning = spread_warning(records)
    if warning:
        print(f"normlab bench: warning: {warning}", file=sys.stderr)


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "sweep": run_sweep,
    "report": run_report,
    "bench": run_bench,
}
