"""Float64 reference adapters of the layer catalogue: a layer's output and backward.

Each adapter reads a built layer's own parameters, buffers and settings and runs the
NumPy reference (:mod:`normlab.reference`) on them, returning ``(y, backward)`` where
``backward(dy)`` gives the reference gradients. :mod:`normlab.catalogue.cases` pairs each
case with its adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .. import reference as R

__all__ = [
    "Backward",
    "Reference",
    "as_f64",
    "bn_ref",
    "brn_ref",
    "cbn_ref",
    "evonorm_b0_ref",
    "evonorm_s0_ref",
    "frn_ref",
    "frozen_ref",
    "gn_ref",
    "in_ref",
    "ln2d_ref",
    "ln_ref",
    "lrn_ref",
    "mabn_ref",
    "rms2d_ref",
    "rms_ref",
    "sn_ref",
    "tlu_ref",
]

Backward = Callable[[np.ndarray], dict]
Reference = Callable[[np.ndarray, nn.Module], tuple[np.ndarray, Backward]]


def as_f64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def _affine(m: nn.Module) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A layer's weight and bias (γ, β), as the references' positional arguments take them."""
    return as_f64(m.weight), as_f64(m.bias)


def _running(m: nn.Module) -> dict[str, np.ndarray | None]:
    """A layer's running statistics, as the references' keywords take them."""
    return {"running_mean": as_f64(m.running_mean), "running_var": as_f64(m.running_var)}


def bn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.batch_norm_forward(
        x,
        *_affine(m),
        **_running(m),
        training=m.training or m.running_mean is None,
        eps=m.eps,
    )
    return y, lambda dy: R.batch_norm_backward(dy, cache)


def cbn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    """Cross-Iteration BN without a window (burn-in, or no convolution before it); eval is BN's."""
    if not m.training:
        return bn_ref(x, m)
    y, cache = R.cross_iteration_batch_norm_forward(x, [], None, *_affine(m), eps=m.eps)
    return y, lambda dy: R.cross_iteration_batch_norm_backward(dy, cache)


def frozen_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.frozen_batch_norm_forward(
        x, *_affine(m), as_f64(m.running_mean), as_f64(m.running_var), m.eps
    )
    return y, lambda dy: R.frozen_batch_norm_backward(dy, cache)


def gn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.group_norm_forward(x, m.num_groups, *_affine(m), m.eps)
    return y, lambda dy: R.group_norm_backward(dy, cache)


def ln_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.layer_norm_forward(x, m.normalized_shape, *_affine(m), m.eps)
    return y, lambda dy: R.layer_norm_backward(dy, cache)


def ln2d_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.layer_norm2d_forward(x, *_affine(m), m.eps)
    return y, lambda dy: R.layer_norm2d_backward(dy, cache)


def in_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    use_input = m.training or not m.track_running_stats
    y, cache = R.instance_norm_forward(
        x,
        *_affine(m),
        **_running(m),
        use_input_stats=use_input,
        eps=m.eps,
    )
    return y, lambda dy: R.instance_norm_backward(dy, cache)


def lrn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.local_response_norm_forward(x, m.size, m.alpha, m.beta, m.k)
    return y, lambda dy: R.local_response_norm_backward(dy, cache)


def rms_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.rms_norm_forward(x, m.normalized_shape, as_f64(m.weight), m.eps)
    return y, lambda dy: R.rms_norm_backward(dy, cache)


def rms2d_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.rms_norm2d_forward(x, as_f64(m.weight), m.eps)
    return y, lambda dy: R.rms_norm2d_backward(dy, cache)


def sn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.switchable_norm_forward(
        x,
        as_f64(m.mean_weight),
        as_f64(m.var_weight),
        *_affine(m),
        **_running(m),
        training=m.training or m.running_mean is None,
        eps=m.eps,
        using_bn=m.using_bn,
    )
    return y, lambda dy: R.switchable_norm_backward(dy, cache)


def frn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    tau = as_f64(m.tau) if m.tlu else None
    eps = float(m.effective_eps())
    y, cache = R.filter_response_norm_forward(x, *_affine(m), eps=eps, tau=tau)
    return y, lambda dy: R.filter_response_norm_backward(dy, cache)


def tlu_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.tlu_forward(x, as_f64(m.tau))
    return y, lambda dy: R.tlu_backward(dy, cache)


def brn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    r_max, d_max = (float(t) for t in m.renorm_limits())
    y, cache = R.batch_renorm_forward(
        x,
        *_affine(m),
        **_running(m),
        training=m.training,
        eps=m.eps,
        r_max=r_max,
        d_max=d_max,
    )
    return y, lambda dy: R.batch_renorm_backward(dy, cache)


def evonorm_b0_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.evonorm_b0_forward(
        x,
        as_f64(m.v),
        *_affine(m),
        running_var=as_f64(m.running_var),
        training=m.training or m.running_var is None,
        eps=m.eps,
    )
    return y, lambda dy: R.evonorm_b0_backward(dy, cache)


def evonorm_s0_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.evonorm_s0_forward(x, m.groups, as_f64(m.v), *_affine(m), eps=m.eps)
    return y, lambda dy: R.evonorm_s0_backward(dy, cache)


def mabn_ref(x: np.ndarray, m: nn.Module) -> tuple[np.ndarray, Backward]:
    y, cache = R.moving_average_batch_norm_forward(
        x,
        *_affine(m),
        running_var=as_f64(m.running_var),
        chi_window=as_f64(m.chi_window),
        psi_window=as_f64(m.psi_window),
        psi_filled=int(m.psi_filled),
        num_batches_tracked=int(m.num_batches_tracked),
        training=m.training,
        momentum=m.momentum,
        eps=m.eps,
        warmup_iters=m.warmup_iters,
        r_clip=m.r_clip,
    )
    return y, lambda dy: R.moving_average_batch_norm_backward(dy, cache)
