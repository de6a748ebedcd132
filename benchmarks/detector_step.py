"""One training step of the lab's detector: normlab's norms vs torch's own, in the same run.

Usage:  python benchmarks/detector_step.py [--norms bn,gn] [--batch-sizes 2,8] [--reps 30]
        [--size 48] [--threads 1] [--out benchmarks/results/detector_step_cpu.csv]

For each norm and batch size the lab's detector (:mod:`normlab.lab.models.detector`) is
built with the registry's layer, and a twin with the same weights in which every norm
layer is torch's (``torch.nn.BatchNorm2d``, ``torch.nn.GroupNorm``). A step is forward,
the detection loss (:class:`normlab.lab.tasks.detection.Detection`) on built-in scenes,
backward; the two models' steps alternate so that load on a shared machine hits both
alike. Prints and writes the median, p20 and p80 (ms) and the ratio normlab / torch of
the medians, with the command and the versions.
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

from normlab.lab.data.det_scenes import detection_scenes
from normlab.lab.models.detector import build_detector
from normlab.lab.tasks.detection import Detection


def torch_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every normlab BatchNorm2d / GroupNorm replaced by torch's,
    holding the same parameters and buffers."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        kind = type(m).__name__
        if type(m).__module__.startswith("torch.") or kind not in ("BatchNorm2d", "GroupNorm"):
            continue
        if kind == "BatchNorm2d":
            new: nn.Module = nn.BatchNorm2d(m.num_features, m.eps, m.momentum)
        else:
            new = nn.GroupNorm(m.num_groups, m.num_channels, m.eps)
        new.load_state_dict(m.state_dict())
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, new)
    left = [type(m).__module__ for m in twin.modules() if "normlab" in type(m).__module__]
    if any(".nn." in mod for mod in left):
        raise RuntimeError(f"normlab layers left in the torch twin: {sorted(set(left))}")
    return twin


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norms", default="bn,gn")
    p.add_argument("--batch-sizes", default="2,8")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/detector_step_cpu.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = detection_scenes(64, 8, args.size)
    task = Detection(split.num_classes, int(split.y_train.shape[1]))
    rows = []
    for norm in args.norms.split(","):
        for b in map(int, args.batch_sizes.split(",")):
            torch.manual_seed(0)
            ours = build_detector(norm, num_classes=split.num_classes)
            models = {"normlab": ours, "torch": torch_twin(ours)}
            x, y = split.x_train[:b], split.y_train[:b]
            times: dict[str, list[float]] = {k: [] for k in models}
            for rep in range(args.reps + 3):
                for k, m in models.items():
                    t = time.perf_counter()
                    loss = task.loss(m(x)[None], y[None]).sum()
                    m.zero_grad(set_to_none=True)
                    loss.backward()
                    if rep >= 3:  # warm-up steps are not timed
                        times[k].append((time.perf_counter() - t) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "norm": norm,
                "batch": b,
                "size": args.size,
                **{f"{k}_median_ms": round(med[k], 3) for k in models},
                **{f"{k}_p20_ms": round(_percentile(times[k], 0.2), 3) for k in models},
                **{f"{k}_p80_ms": round(_percentile(times[k], 0.8), 3) for k in models},
                "ratio": round(med["normlab"] / med["torch"], 3),
            }
            rows.append(row)
            print(
                f"{norm:4} batch {b:2}: normlab {med['normlab']:7.2f} ms, torch "
                f"{med['torch']:7.2f} ms, ratio {row['ratio']:.3f}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        f.write(f"# command: python {' '.join(sys.argv)}\n")
        f.write(
            f"# torch {torch.__version__}, python {platform.python_version()}, "
            f"{platform.platform(terse=True)}, {args.threads} thread(s), CPU\n"
        )
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
