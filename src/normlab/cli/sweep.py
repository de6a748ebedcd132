"""``normlab sweep``: parse the grid and the protocol, run the sweep, print the tables."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..lab import defaults
from ..lab.sweep.paths import check_report_outputs, check_store_path
from .args import GivenOption, int_at_least, int_list, name_list, positive_int
from .length import add_length_arguments
from .model import add_model_arguments
from .report import add_report_outputs
from .task import add_lr_argument, add_task_arguments, print_results, task_options

if TYPE_CHECKING:
    from ..lab.sweep.runner import SweepInterrupted

__all__ = ["add_parser", "run"]


def _seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` names them."""
    values = int_list(text)
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"--seeds needs >= 1 seed, got {text!r}")
        return list(range(values[0]))
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
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
        "(default and 'all': bn, gn and the small-batch family frn, sn, mabn, brn, cbn)",
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
        "images/ and masks/; detection: a COCO annotations .json (default: embedded "
        "Animal-MNIST; built-in silhouette scenes; built-in detection scenes)",
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
    add_report_outputs(p, progress=True)


def run(args: argparse.Namespace) -> int:
    check_report_outputs(args.out, args.json)
    check_store_path(args.db, write=True)
    from ..lab.analysis.report import summarize, write_json, write_report
    from ..lab.sweep.orchestrate import (
        RankFailedError,
        SweepConfig,
        SweepInterrupted,
        default_norms,
        expand_norms,
        run_sweep,
    )

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
        result = run_sweep(
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
