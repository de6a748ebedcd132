"""Per-model conv+BN fusion coverage over the test zoo: BNs total / folded / skipped by reason.

Run from the repository root (torchvision, timm, smp and MONAI installed):

    python benchmarks/fuse_zoo.py [--verbose] [name ...]

Each model is built without weights, put in eval mode and float64, fused with its
zoo batch as ``check_inputs``; ``--verbose`` prints the full report per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from normlab.fuse import fuse_conv_bn  # noqa: E402
from zoo._zoo import ZOO, import_torchvision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    parser.add_argument("--verbose", action="store_true", help="print each full report")
    args = parser.parse_args()
    torch.manual_seed(0)
    import_torchvision()  # timm imports torchvision; see tests/zoo/_zoo.py
    print(f"{'model':24} {'BNs':>5} {'folded':>7} {'skipped':>8}  seconds  skipped by reason")
    for name in args.names or list(ZOO):
        entry = ZOO[name]
        model = entry.build().eval().double()
        batch = entry.batch(0)
        batch = [t.double() for t in batch] if isinstance(batch, list) else batch.double()
        t0 = time.perf_counter()
        _, report = fuse_conv_bn(model, batch, return_report=True)
        dt = time.perf_counter() - t0
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(report.counts().items())) or "-"
        print(
            f"{name:24} {report.total_bns:5d} {report.folded_bns:7d} "
            f"{len(report.skipped):8d}  {dt:7.1f}  {reasons}"
        )
        if args.verbose:
            print(report, "\n")


if __name__ == "__main__":
    main()
