"""Running statistics that a skipped optimizer step leaves untouched.

A norm layer updates its running statistics inside ``forward``, before anyone knows
whether the step will count. ``torch.amp.GradScaler`` skips the optimizer step when
the gradients hold inf/NaN, but the forward that produced them has already moved
every running mean and variance (and may have written NaN into them). The guard
takes a copy of every running buffer before the forward and puts it back when the
scaler skipped::

    saved = snapshot_running_stats(model)
    scale = scaler.get_scale()
    ...  # forward, scaler.scale(loss).backward(), scaler.step(opt), scaler.update()
    if step_skipped(scaler, scale):
        saved.restore()

It works for torch's own norm layers as for normlab's (and any module holding
``running_*`` buffers), and copies only the buffers, O(channels) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kinds import holds_running_stats

__all__ = ["RunningStatsSnapshot", "snapshot_running_stats", "step_skipped"]


@dataclass(frozen=True)
class RunningStatsSnapshot:
    """Copies of a model's running buffers, taken by :func:`snapshot_running_stats`."""

    #: ``(dotted buffer name, the live buffer, its copy)`` for every saved buffer.
    entries: tuple[tuple[str, Tensor, Tensor], ...]

    @property
    def names(self) -> list[str]:
        """The dotted names of the saved buffers (as in the model's ``state_dict``)."""
        return [name for name, _, _ in self.entries]

    def changed(self) -> list[str]:
        """The saved buffers whose live values differ from the copy now (NaN differs)."""
        return [
            name
            for name, live, copy in self.entries
            if not torch.equal(live, copy) or bool(live.isnan().any())
        ]

    def restore(self) -> None:
        """Write the copies back into the live buffers, in place (the model keeps its
        tensors, so optimizers, hooks and compiled graphs that hold them stay valid)."""
        with torch.no_grad():
            for _, live, copy in self.entries:
                live.copy_(copy)


def snapshot_running_stats(model: nn.Module) -> RunningStatsSnapshot:
    """A copy of every running buffer of every stateful norm layer in ``model``.

    Covered: the buffers of every layer whose training forward updates buffers
    (torch's BatchNorm/InstanceNorm/SyncBatchNorm with running statistics, normlab's
    BatchNorm, BatchRenorm, MovingAverageBatchNorm, SwitchableNorm, EvoNorm B0, ...:
    ``running_mean``, ``running_var``, ``num_batches_tracked`` and each layer's own
    state) and the buffers of any other module that holds a ``running_*`` buffer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"snapshot_running_stats: expected an nn.Module, got {type(model).__name__}; "
            "pass the model whose norm layers should be guarded."
        )
    entries = []
    for path, module in model.named_modules():
        if not holds_running_stats(module):
            continue
        for name, buf in module._buffers.items():
            if buf is not None:
                full = f"{path}.{name}" if path else name
                entries.append((full, buf, buf.detach().clone()))
    return RunningStatsSnapshot(tuple(entries))


def step_skipped(scaler: torch.amp.GradScaler, scale_before: float | Tensor) -> bool:
    """Whether ``scaler`` skipped the last optimizer step.

    Call it after ``scaler.update()``, with ``scale_before = scaler.get_scale()``
    read before that step. A skipped step always lowers the scale (``update``
    multiplies it by ``backoff_factor`` < 1, and raises it only after steps that
    ran), so the step was skipped exactly when the scale went down. A disabled
    scaler never skips.
    """
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"step_skipped: expected a torch.amp.GradScaler, got {type(scaler).__name__}."
        )
    if not scaler.is_enabled():
        return False
    before = float(scale_before.item() if isinstance(scale_before, Tensor) else scale_before)
    return scaler.get_scale() < before
