"""Running statistics at depth after a few training steps: EMA vs recalibrate vs the references.

Run from the repository root (torchvision and fvcore installed):

    python benchmarks/recalibrate_depth.py [--steps 30] [--size 64] [--batch 8]
        [--recal-batches 4] [--lr 0.05] [--no-exact] [name ...]

Each torchvision model (default: resnet50 and mobilenet_v3_large, built without
weights) is trained for ``--steps`` SGD steps (momentum 0.9) on random off-center
images with random labels, so its moving-average statistics lag behind the
weights. Then, from that same state, on the same ``--recal-batches`` batches:

- ``ema``: the moving averages as training left them;
- ``precise``: ``recalibrate(model, batches)`` (the default, train-mode passes);
- ``exact``: ``recalibrate(model, batches, method="exact")`` (eval-mode fixed point);
- ``update_bn``: ``torch.optim.swa_utils.update_bn`` (whole model in train mode,
  equal-weight average of per-batch statistics);
- ``fvcore``: ``fvcore.nn.precise_bn.update_bn_stats`` (BN layers in train mode).

It prints max |eval logit| on a held-out batch for each, the largest relative
difference between precise's and fvcore's running variances (raw, and after
fvcore's divide-by-n is turned into divide-by-(n − 1)), and exact's number of
passes and how far a second exact call moves any statistic.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from normlab.kinds import is_batch_norm  # noqa: E402
from normlab.recalibrate import recalibrate  # noqa: E402
from zoo._zoo import images, import_torchvision  # noqa: E402


def train(model: nn.Module, steps: int, lr: float, batch: int, size: int) -> nn.Module:
    """``steps`` SGD steps on random off-center images with random labels (1000 classes)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        x = images(batch, 3, size, seed=1000 + s)
        y = torch.randint(0, 1000, (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def max_logit(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model.eval()(x).abs().max())


def running(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def values_per_channel(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, int]:
    """Values per channel each BN sees over all batches (n of the n/(n − 1) factor)."""
    counts: dict[str, int] = {}
    names = {id(m): p for p, m in model.named_modules() if is_batch_norm(m)}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, a: counts.__setitem__(
                names[id(mod)], counts.get(names[id(mod)], 0) + a[0].numel() // a[0].shape[1]
            )
        )
        for m in model.modules()
        if id(m) in names
    ]
    with torch.no_grad():
        for b in batches:
            model.eval()(b)
    for h in hooks:
        h.remove()
    return counts


def compare_fvcore(ours: nn.Module, fv: nn.Module, n: dict[str, int]) -> tuple[float, float]:
    """Largest relative running_var difference: raw, and with fvcore's var × n/(n − 1)."""
    raw = corrected = 0.0
    a, b = running(ours), running(fv)
    for k in a:
        if not k.endswith("running_var"):
            continue
        count = n[k.rsplit(".", 1)[0]]
        scale = float(b[k].abs().max())
        raw = max(raw, float((a[k] - b[k]).abs().max()) / scale)
        fixed = b[k] * (count / (count - 1))
        corrected = max(corrected, float((a[k] - fixed).abs().max()) / scale)
    return raw, corrected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["resnet50", "mobilenet_v3_large"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--recal-batches", type=int, default=4)
    parser.add_argument("--no-exact", action="store_true")
    args = parser.parse_args()
    tv = import_torchvision()
    precise_bn = importlib.import_module("fvcore.nn.precise_bn")
    for name in args.names:
        torch.manual_seed(0)
        t0 = time.time()
        model = train(
            getattr(tv.models, name)(weights=None), args.steps, args.lr, args.batch, args.size
        )
        batches = [images(args.batch, 3, args.size, seed=s) for s in range(args.recal_batches)]
        held_out = images(args.batch, 3, args.size, seed=999)
        row = {"ema": max_logit(model, held_out)}

        precise = recalibrate(copy.deepcopy(model), batches)
        row["precise"] = max_logit(precise, held_out)
        if not args.no_exact:
            exact = recalibrate(copy.deepcopy(model), batches, method="exact", return_report=True)
            row["exact"] = max_logit(exact.model, held_out)
            first = running(exact.model)
            recalibrate(exact.model, batches, method="exact")
            moved = max(
                float((v - first[k]).abs().max() / first[k].abs().max())
                for k, v in running(exact.model).items()
            )
        swa = copy.deepcopy(model)
        torch.optim.swa_utils.update_bn(batches, swa)
        row["update_bn"] = max_logit(swa, held_out)
        fv = copy.deepcopy(model).train()
        precise_bn.update_bn_stats(fv, batches, num_iters=len(batches))
        row["fvcore"] = max_logit(fv, held_out)
        raw, corrected = compare_fvcore(precise, fv, values_per_channel(model, batches))

        print(
            f"\n{name}: {args.steps} SGD steps (lr {args.lr}), {args.recal_batches} batches "
            f"of {args.batch}x3x{args.size}x{args.size}  [{time.time() - t0:.0f}s]"
        )
        print("  max |eval logit|: " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
        print(
            f"  precise vs fvcore running_var: max rel diff {raw:.2e} raw, "
            f"{corrected:.2e} with fvcore's variance x n/(n-1)"
        )
        if not args.no_exact:
            print(
                f"  exact: {exact.passes} passes for {len(exact.recalibrated)} layers; "
                f"a second call moves a statistic by at most {moved:.1e} (relative)"
            )


if __name__ == "__main__":
    main()
