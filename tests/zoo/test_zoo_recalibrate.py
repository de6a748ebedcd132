"""recalibrate on real architectures: right at depth in one call, against torch's and fvcore's.

Small inputs and few batches keep this fast; ``benchmarks/recalibrate_depth.py``
prints the same comparison at larger sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab.feed import feed
from normlab.kinds import is_batch_norm
from normlab.recalibrate import recalibrate
from zoo._zoo import ZOO, images, outputs, require, zoo_params

SIZE, BATCH, NUM = 32, 4, 3  # images, per batch, batches


def trained(name: str, steps: int = 5, lr: float = 0.05) -> nn.Module:
    """A zoo classifier after ``steps`` SGD steps: its moving averages lag the weights."""
    torch.manual_seed(0)
    model = ZOO[name].build().train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        logits = model(images(BATCH, 3, SIZE, seed=100 + s))
        y = torch.randint(0, logits.shape[1], (BATCH,), generator=g)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def running(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def max_logit(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.isfinite(out).all()
    return float(out.abs().max())


def values_per_channel(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    names = {id(m): p for p, m in model.named_modules() if is_batch_norm(m)}

    def count(mod: nn.Module, args: tuple) -> None:
        counts[names[id(mod)]] = counts.get(names[id(mod)], 0) + args[0][:, 0].numel()

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if id(m) in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return counts


def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |a - b| relative to max |b| (or to ``scale``)."""
    scale = b.abs().max() if scale is None else scale
    return float((a - b).abs().max() / scale.clamp_min(1e-12))


def close_to(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    """Every running statistic within ``tol``; a mean relative to the layer's std (means
    near 0 are float32 noise)."""
    for k, v in ours.items():
        if k.endswith("running_mean"):
            std = ref[k.replace("running_mean", "running_var")].sqrt().max()
            assert rel(v, ref[k], torch.maximum(ref[k].abs().max(), std)) < tol, k
        else:
            assert rel(v, ref[k]) < tol, k


@pytest.mark.parametrize("entry", zoo_params(["tv_resnet50", "tv_mobilenet_v3_large"]))
def test_one_call_is_right_at_depth(entry):
    precise_bn = require("fvcore.nn.precise_bn")
    model = trained(entry.name)
    batches = [images(BATCH, 3, SIZE, seed=s) for s in range(NUM)]
    held_out = images(BATCH, 3, SIZE, seed=99)

    ours = recalibrate(copy.deepcopy(model), batches)
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    # One call: finite eval logits of the same order as update_bn's (the old eval-mode
    # single pass gave 1e7 times more on resnet50, NaN on mobilenet_v3).
    ratio = max_logit(ours, held_out) / max_logit(swa, held_out)
    assert 0.1 < ratio < 10, ratio
    ema = running(model)
    assert max(rel(v, ema[k]) for k, v in running(ours).items()) > 0.01  # the EMA lagged

    # exact: finite, same order, and a fixed point (in-place ReLUs after the BNs, SE blocks)
    exact = recalibrate(copy.deepcopy(model), batches, method="exact", return_report=True)
    assert 0.1 < max_logit(exact.model, held_out) / max_logit(swa, held_out) < 10
    assert len(exact.levels) < len(exact.recalibrated) or entry.name != "tv_resnet50"
    first = running(exact.model)
    recalibrate(exact.model, batches, method="exact")
    close_to(running(exact.model), first, 1e-6)

    # Every layer, at every depth: variance="per_batch" is update_bn's estimator
    # (equal batch sizes: count weighting changes nothing), from the same train-mode inputs.
    per_batch = recalibrate(copy.deepcopy(model), batches, variance="per_batch")
    close_to(running(per_batch), running(swa), 1e-4)

    # fvcore's update_bn_stats stores the population variance divided by n (all values
    # per channel over the batches); ours divides by n - 1. Same statistics otherwise;
    # the raw difference 1/(n - 1) is under 1% wherever a layer sees over 100 values.
    fv = copy.deepcopy(model).train()
    precise_bn.update_bn_stats(fv, batches, num_iters=NUM)
    n = values_per_channel(copy.deepcopy(model), batches)
    theirs, mine = running(fv), running(ours)
    unbiased = {
        k: v * n[k.rsplit(".", 1)[0]] / (n[k.rsplit(".", 1)[0]] - 1)
        if k.endswith("running_var")
        else v
        for k, v in theirs.items()
    }
    close_to(mine, unbiased, 1e-4)
    big = [k for k in mine if k.endswith("running_var") and n[k.rsplit(".", 1)[0]] > 100]
    assert len(big) > 10
    close_to({k: mine[k] for k in big}, theirs, 0.01)


@pytest.mark.parametrize("entry", zoo_params(["monai_unet_2d"]))
def test_exact_is_a_fixed_point_on_a_real_model(entry):
    model = entry.build().eval()
    with torch.no_grad():  # statistics far from the data's: every level moves
        for m in model.modules():
            if is_batch_norm(m):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 3.0)
    batches = [entry.batch(s) for s in range(NUM)]
    report = recalibrate(model, batches, method="exact", return_report=True)
    assert len(report.levels) > 1 and report.passes == len(report.levels)
    first = running(model)
    recalibrate(model, batches, method="exact")
    for k, v in running(model).items():
        assert rel(v, first[k]) <= 1e-6, k
    # precise (train-mode statistics) is a different point
    precise = recalibrate(copy.deepcopy(model), batches)
    assert max(rel(v, first[k]) for k, v in running(precise).items()) > 1e-3


@pytest.mark.parametrize("entry", zoo_params())
def test_finite_on_every_zoo_model(entry):
    model = entry.build().eval()
    batches = [entry.batch(s) for s in range(2)]
    before = running(model)
    if entry.name == "tv_fasterrcnn_frozen":
        with pytest.warns(RuntimeWarning, match=r"53 frozen BatchNorm.*frozen by design"):
            report = recalibrate(model, batches, return_report=True)
        assert len(report.frozen) == 53 and report.recalibrated == ()
        assert all(torch.equal(v, before[k]) for k, v in running(model).items())
        return
    report = recalibrate(model, batches, return_report=True)
    assert report.recalibrated and report.frozen == () and report.unseen == ()
    assert any(not torch.equal(v, before[k]) for k, v in running(model).items())
    assert all(torch.isfinite(v).all() for v in running(model).values())
    with torch.no_grad():
        out = outputs(feed(model.eval(), entry.batch(7)))
    assert out and all(torch.isfinite(t).all() for t in out if t.is_floating_point())
