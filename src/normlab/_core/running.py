"""Running statistics: the guarded in-place update, buffer snapshots, and the skip flags.

A batch whose statistics hold inf or NaN (an AMP overflow, a bad sample) would write
them into the running statistics for good. Every write of running state goes through
this module instead: :func:`update_running_stats` (torch's exponential update, per
channel: a channel whose new mean or variance is not finite keeps its values, the
others update, so the packed seeds of one layer stay independent) and
:func:`guarded_copy_` (a layer's own state: MABN's windows, CBN's window, on a 0-dim
flag) write the new values only where the batch was finite, with ``torch.where``, so
nothing syncs with the host and ``torch.compile`` keeps one graph. A finite batch
gives the same bits as the plain in-place update.

The flag reaches the layer that owns the buffers through :func:`watch`: a module
runs its functional inside ``with watch() as flags``, and every guarded write
appends its flag there (eager mode only), so the functionals keep torch's
signatures. :class:`normlab.nn._base.NormBase` counts and reports the skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = [
    "NonFiniteStatisticsWarning",
    "all_finite",
    "guarded_copy_",
    "note",
    "snapshot",
    "update_running_stats",
    "watch",
]


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A layer kept its running statistics through a batch with inf/NaN statistics."""


#: The innermost watcher's flag list, or None outside :func:`watch`.
_WATCHER: ContextVar[list[Tensor] | None] = ContextVar("running_stats_watcher", default=None)


def snapshot(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Copies of buffers that are about to be updated in place, for values needed later.

    Under ``torch.compile``, AOTAutograd's min-cut partitioner may *recompute* a
    cheap read of a buffer in the backward pass instead of saving it; if forward
    has meanwhile updated that buffer in place, the backward sees the new
    contents and the gradient is silently wrong (pytorch/pytorch PR #197039).
    ``torch.stack`` is not on the partitioner's recompute allowlist, so the
    snapshot is saved. In eager mode it is one small copy per call.
    """
    both = torch.stack([t.detach() for t in tensors])
    return tuple(both.unbind(0))


@contextmanager
def watch() -> Iterator[list[Tensor]]:
    """Collect the finite flags (0-dim bool tensors) of the guarded writes inside.

    A flag (0-dim, or one per channel) is False where that write was skipped because
    the batch's values were not finite. Nested watchers see only their own writes;
    each thread (and each ``contextvars`` context) has its own, so
    ``nn.DataParallel``'s replicas do not mix.
    """
    flags: list[Tensor] = []
    token = _WATCHER.set(flags)
    try:
        yield flags
    finally:
        _WATCHER.reset(token)


def note(finite: Tensor) -> None:
    """Hand ``finite`` to the active :func:`watch`, if any (not while compiling)."""
    if torch.compiler.is_compiling():
        return
    flags = _WATCHER.get()
    if flags is not None:
        flags.append(finite)


def all_finite(*tensors: Tensor) -> Tensor:
    """A 0-dim bool tensor: every value of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    out = flags[0]
    for f in flags[1:]:
        out = out & f
    return out


def guarded_copy_(dst: Tensor, new: Tensor, finite: Tensor) -> None:
    """``dst ← new`` where ``finite`` (0-dim bool), else ``dst`` keeps its values."""
    with torch.no_grad():
        dst.copy_(torch.where(finite, new.to(dst.dtype), dst))


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_mean: Tensor,
    batch_var_unbiased: Tensor,
    momentum: float,
    *,
    per_channel: bool = True,
) -> Tensor | None:
    """torch's update, in place: ``running = (1 − m)·running + m·batch``, where finite.

    A channel whose written values (the mean and the unbiased variance, in the
    buffers' dtype) hold inf or NaN keeps its previous values in both buffers; the
    other channels update. With ``per_channel=False`` (a layer whose other state is
    kept per layer: CBN's window) any bad channel keeps every channel's values. Returns
    the bool flag (per channel, or 0-dim; True: updated), also handed to an active
    :func:`watch`; None when there is no buffer to update.
    """
    if running_mean is None and running_var is None:
        return None
    with torch.no_grad():
        pairs = [
            (buf, new.reshape(-1).to(buf.dtype))
            for buf, new in ((running_mean, batch_mean), (running_var, batch_var_unbiased))
            if buf is not None
        ]
        news = [new for _, new in pairs]
        if per_channel and all(n.shape == news[0].shape for n in news):
            finite = torch.isfinite(news[0])
            for n in news[1:]:
                finite = finite & torch.isfinite(n)
        else:
            finite = all_finite(*news)
        for buf, new in pairs:
            # The same ops as torch's in-place update, so a finite batch gives its bits.
            blended = buf.mul(1.0 - momentum).add(new, alpha=momentum)
            buf.copy_(torch.where(finite, blended, buf))
    note(finite)
    return finite
