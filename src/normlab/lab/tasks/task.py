"""What a lab run learns: the loss it minimizes and the errors it reports.

The training loop (:mod:`normlab.lab.run.loop`) knows nothing about labels; a :class:`Task`
turns a model's output and the targets into a loss to minimize and error metrics to
report. The loop trains S networks side by side (the seeds of a packed model, S = 1 for
a lone run), so every tensor a task sees carries that network dim first:

* ``output``: (S, B, ...), the packed model's output; a lone model's (B, ...) output
  gets a leading dim of 1;
* ``target``: (S, B, ...), the targets of each network's own batch (``Split.y_train``
  indexed by each network's sample indices).

Errors are built from a *tally*: counts per network, shape (S, T), that add up over
batches (and over the ranks of a data-parallel run) before :meth:`Task.errors` turns them
into metrics. Counts, not per-batch averages, so that a metric such as mIoU, which is
not a mean of per-batch values, is exact over a whole test set. A metric that is no sum
at all (COCO AP ranks every detection of the set) *gathers*: a task with ``gathers =
True`` returns per-image rows (any float dtype) that are concatenated along T over
batches and ranks (:func:`merge_tallies`), and :meth:`Task.errors` scores the whole set
at once. The loop treats both kinds the same way through :func:`merge_tallies`.

A model that needs the targets in its forward (a torchvision-style detector computes its
losses there) is run by its task: a task with a ``forward(model, x, target)`` method
returns the (S, B, ...) output itself, and the loop calls it through :func:`run_model`.

:data:`CLASSIFICATION` (cross-entropy, top-1 error in %) is the lab's task.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASSIFICATION",
    "Classification",
    "Task",
    "gathers",
    "merge_tallies",
    "run_model",
    "tally_over_ranks",
]


@runtime_checkable
class Task(Protocol):
    """Loss and error metrics of a run from model output and target (shapes: module doc).

    ``metrics`` names what :meth:`errors` returns, in %; the first is the run's headline
    error: ``EpochStats.train_error`` / ``test_error`` and ``RunRecord.final_error``.
    """

    metrics: tuple[str, ...]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each network's mean loss over its batch: shape (S,), differentiable.

        The loop minimizes the sum over the networks, so network s's gradient is that of
        its own loss alone; a task must not mix networks.
        """
        ...

    def tally(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Counts (int64, shape (S, T)) of one batch that sum over batches and ranks."""
        ...

    def errors(self, tally: torch.Tensor) -> list[dict[str, float]]:
        """Per network, each of ``metrics`` in % from a summed :meth:`tally`."""
        ...


def gathers(task: Task) -> bool:
    """Whether ``task``'s tallies are per-image rows to concatenate (module docstring);
    False for counts that sum, the default."""
    return bool(getattr(task, "gathers", False))


def run_model(
    task: Task, model: nn.Module, x: torch.Tensor, target: torch.Tensor, packs: int
) -> torch.Tensor:
    """Output (S, B, ...) of ``model`` on input ``x`` (B, S·C, H, W) with targets (S, B, ...):
    the task's own ``forward`` if it has one (module docstring), else ``model(x)``."""
    forward = getattr(task, "forward", None)
    if forward is not None:
        return forward(model, x, target)  # type: ignore[no-any-return]
    out = model(x)
    return out.unsqueeze(0) if packs == 1 else out


def merge_tallies(task: Task, total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total`` with one more batch's (or rank's) tally ``part``: summed, or concatenated
    along T for a task that :func:`gathers`."""
    if total is None:
        return part
    return torch.cat([total, part], dim=1) if gathers(task) else total + part


def tally_over_ranks(task: Task, tally: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """A data-parallel run's tally over every rank of the process group: counts summed
    (exactly: as float64, rounded back to int64), or per-image rows gathered in rank order
    (every rank takes the same number of equal batches, so each holds the same T)."""
    import torch.distributed as dist

    t = tally.to(device) if device.startswith("cuda") else tally.clone()
    if gathers(task):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat([p.cpu() for p in parts], dim=1)
    summed = t.double()
    dist.all_reduce(summed)
    return summed.cpu().round().to(tally.dtype)


class Classification:
    """Image classification: cross-entropy loss, top-1 error (% of samples misclassified).

    ``output``: logits (S, B, K); ``target``: class indices (S, B). Tally per network:
    ``[misclassified, samples]``.
    """

    metrics: tuple[str, ...] = ("error",)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        packs, batch = target.shape[:2]
        if packs == 1:
            # One network: the mean-reduced loss, as a lone model's training computes it
            # (a mean over a per-sample loss may round differently).
            return F.cross_entropy(output[0], target[0]).reshape(1)
        per_sample = F.cross_entropy(
            output.reshape(packs * batch, -1), target.reshape(-1), reduction="none"
        )
        return per_sample.view(packs, batch).mean(1)

    def tally(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wrong = (output.argmax(-1) != target).sum(1)
        count = torch.full_like(wrong, target.shape[1])
        return torch.stack([wrong, count], dim=1).to(torch.int64)

    def errors(self, tally: torch.Tensor) -> list[dict[str, float]]:
        return [{"error": 100.0 * int(w) / max(1, int(n))} for w, n in tally.tolist()]


#: The lab's task: classification of the split's images into its classes.
CLASSIFICATION = Classification()
