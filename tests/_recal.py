"""Helpers of the recalibration tests: batches, each layer's inputs, NumPy references."""

from __future__ import annotations

import copy

import numpy as np
import torch

from _models import inputs
from normlab.recalibrate import recalibration_kind

SIZES = (3, 2, 5, 2)  # uneven on purpose


def make_batches(sizes=SIZES, seed=10, size=8):
    return [inputs(n, size=size, seed=seed + i) for i, n in enumerate(sizes)]


def layer_calls(model, data, train_layers):
    """Each recalibrated layer's inputs on ``data`` (one forward), per call, keyed by path.

    ``train_layers``: the recalibrated layers run in training mode (batch
    statistics, as precise BN runs them), else everything runs in eval mode. A
    copy of the model runs, so the model itself is not touched.
    """
    model = copy.deepcopy(model).eval()
    layers = {id(m): p for p, m in model.named_modules() if recalibration_kind(m)}
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for m in model.modules():
        if id(m) in layers:
            m.train(train_layers)
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, a: seen.setdefault(layers[id(mod)], []).append(a[0].detach())
                )
            )
    with torch.no_grad():
        model(data)
    for h in handles:
        h.remove()
    return seen


def layer_inputs(model, data, train_layers):
    """Like :func:`layer_calls`, the calls concatenated."""
    return {p: torch.cat(v) for p, v in layer_calls(model, data, train_layers).items()}


def np_channels(x):
    """(C, values) float64 NumPy view of a (N, C, ...) tensor."""
    x = x.detach().double().numpy()
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def train_mode_reference(model, batches, variance="population"):
    """Hand-computed precise BN in NumPy float64: per layer (mean, var) over all batches.

    A layer called twice per forward normalizes each call with that call's
    statistics: for ``per_batch`` every call is a batch.
    """
    per_batch = [layer_calls(model, b, train_layers=True) for b in batches]
    out = {}
    for path in per_batch[0]:
        flats = [np_channels(x) for pb in per_batch for x in pb[path]]
        pooled = np.concatenate(flats, axis=1)
        if variance == "population":
            var = pooled.var(axis=1, ddof=1)
        else:
            counts = np.array([f.shape[1] for f in flats], dtype=np.float64)
            var = (
                sum(n * f.var(axis=1, ddof=1) for n, f in zip(counts, flats, strict=True))
                / counts.sum()
            )
        out[path] = (pooled.mean(axis=1), var)
    return out


def running(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
