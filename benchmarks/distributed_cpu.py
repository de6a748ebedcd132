"""Synced vs unsynced batch-statistics layers on K gloo processes (CPU): collectives and time.

Usage:  python benchmarks/distributed_cpu.py [--world 2] [--reps 20] [--batch 4]
        [--shape 64 28 28] [--out benchmarks/results/...csv]

Spawns ``--world`` processes (gloo on 127.0.0.1, one thread each). Each rank holds
a ``(batch, C, H, W)`` fp32 input; every layer runs forward + backward, unsynced
(``process_group=None``) and synced (``process_group="world"``). Per step it counts
the torch.distributed collectives issued in forward and in backward (by wrapping
them) and times the step (median, p20, p80 over ``--reps`` after 3 warm-ups, the
ranks aligned by a barrier before each rep, the slowest rank's time per rep).
Prints a table and writes a CSV whose first line is the command.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYERS = [
    "BatchNorm2d",
    "SwitchableNorm2d",
    "MovingAverageBatchNorm2d",
    "BatchRenorm2d",
    "EvoNormB0_2d",
]
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _worker(rank: int, world: int, port: int, args: Any, results: Any) -> None:
    import normlab.nn as nnl

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    calls: list[str] = []
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:

            def wrapped(*a: Any, _fn: Any = fn, _n: str = name, **k: Any) -> Any:
                calls.append(_n)
                return _fn(*a, **k)

            setattr(dist, name, wrapped)
    rows = []
    c = args.shape[0]
    x0 = 3.0 + 2.0 * torch.randn(
        args.batch, *args.shape, generator=torch.Generator().manual_seed(rank)
    )
    for layer in LAYERS:
        for sync in (False, True):
            kwargs: dict[str, Any] = {"process_group": "world" if sync else None}
            if layer in ("MovingAverageBatchNorm2d", "BatchRenorm2d"):
                kwargs["warmup_iters"] = 0
            m = getattr(nnl, layer)(c, **kwargs)
            times, fwd_counts, bwd_counts = [], [], []
            for rep in range(args.reps + 3):
                x = x0.clone().requires_grad_()
                dist.barrier()
                calls.clear()
                t0 = time.perf_counter()
                y = m(x)
                n_fwd = len(calls)
                y.sum().backward()
                dt = time.perf_counter() - t0
                n_bwd = len(calls) - n_fwd
                if rep >= 3:
                    times.append(dt)
                    fwd_counts.append(n_fwd)
                    bwd_counts.append(n_bwd)
            # the slowest rank sets the step time; the max is one more (uncounted) all_reduce
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms = [1e3 * v for v in t.tolist()]
            rows.append(
                {
                    "layer": layer,
                    "shape_per_rank": "x".join(str(s) for s in (args.batch, *args.shape)),
                    "world": world,
                    "sync": sync,
                    "fwd_collectives_per_step": max(fwd_counts),
                    "bwd_collectives_per_step": max(bwd_counts),
                    "median_ms": statistics.median(ms),
                    "p20_ms": _quantile(ms, 0.2),
                    "p80_ms": _quantile(ms, 0.8),
                }
            )
    dist.destroy_process_group()
    if rank == 0:
        results.put(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="samples per rank")
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 28, 28], metavar=("C", "H", "W"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, args.world, port, args, results))
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    try:
        rows = results.get(timeout=1800)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    unsynced = {r["layer"]: r["median_ms"] for r in rows if not r["sync"]}
    for r in rows:
        r["ratio_vs_unsynced"] = r["median_ms"] / unsynced[r["layer"]]

    print(
        f"{'layer':26} {'sync':5} {'fwd':>3} {'bwd':>3} {'median':>9} {'p20':>8} {'p80':>8} "
        f"{'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['layer']:26} {r['sync']!s:5} {r['fwd_collectives_per_step']:3d} "
            f"{r['bwd_collectives_per_step']:3d} {r['median_ms']:8.2f}ms {r['p20_ms']:8.2f} "
            f"{r['p80_ms']:8.2f} {r['ratio_vs_unsynced']:6.2f}"
        )
    version = torch.__version__.split("+")[0]
    out = Path(
        args.out
        or f"benchmarks/results/distributed_fwdbwd_float32_cpu_gloo{args.world}_torch{version}.csv"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        f.write(f"# command: python {' '.join(sys.argv)}\n")
        f.write(
            f"# torch {torch.__version__}, python {platform.python_version()}, "
            f"{platform.machine()}, {os.cpu_count()} cpus, 1 thread per rank, gloo on "
            f"127.0.0.1, {args.reps} reps, median/p20/p80 of the slowest rank per rep\n"
        )
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", out)


if __name__ == "__main__":
    main()
