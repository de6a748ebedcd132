"""Shared test helpers: off-center random data, tolerances, numpy bridges, finite differences.

Imported as ``from _testing import ...`` (pytest puts tests/ on sys.path, see pyproject).
"""

from __future__ import annotations

import numpy as np
import torch

# docs/numerics.md rule 6.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=2e-2),
}


def offcenter(*shape: int, dtype=torch.float64, seed: int = 0, loc=3.0, scale=2.0) -> torch.Tensor:
    """Fresh random off-center data: ``loc + scale * randn``."""
    g = torch.Generator().manual_seed(seed)
    return (loc + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def np64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def assert_close(actual, expected, dtype=torch.float64, **kw) -> None:
    """Compare a tensor/array with an expected tensor/array; NaN never passes."""
    a = torch.as_tensor(np.asarray(np64(actual) if isinstance(actual, torch.Tensor) else actual))
    e = torch.as_tensor(
        np.asarray(np64(expected) if isinstance(expected, torch.Tensor) else expected)
    )
    assert not torch.isnan(a).any(), "NaN in result"
    tol = dict(TOL[dtype])
    tol.update(kw)
    torch.testing.assert_close(a.to(torch.float64), e.to(torch.float64), **tol)


def numeric_grad(loss, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of ``loss()`` with respect to every element of ``a`` (in place)."""
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = loss()
        flat[i] = old - h
        minus = loss()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def calibrate_bn(model: torch.nn.Module, batches) -> torch.nn.Module:
    """Precise BN by hand: exact averages of the batch statistics of ``batches``, then eval.

    Only the BatchNorm layers are in training mode, so detectors run as in inference (no
    targets needed). Independent of normlab.recalibrate, so doctor tests do not rest on it.
    """
    from normlab.feed import feed
    from normlab.kinds import is_batch_norm

    bns = [m for m in model.modules() if is_batch_norm(m) and m.track_running_stats]
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in batches:
            feed(model, batch)
    for m, momentum in saved:
        m.momentum = momentum
    return model.eval()
