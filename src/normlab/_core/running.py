"""Running statistics: torch's in-place exponential update, and buffer snapshots."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["snapshot", "update_running_stats"]


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


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_mean: Tensor,
    batch_var_unbiased: Tensor,
    momentum: float,
) -> None:
    """torch's update, in place: ``running = (1 − m)·running + m·batch``."""
    with torch.no_grad():
        if running_mean is not None:
            new = batch_mean.reshape(-1).to(running_mean.dtype)
            running_mean.mul_(1.0 - momentum).add_(new, alpha=momentum)
        if running_var is not None:
            new = batch_var_unbiased.reshape(-1).to(running_var.dtype)
            running_var.mul_(1.0 - momentum).add_(new, alpha=momentum)
