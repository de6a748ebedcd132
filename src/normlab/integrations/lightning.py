"""Lightning adapters: a ``LayerSync`` plugin and the ``PreciseBN`` and ``Doctor`` callbacks.

* :class:`NormlabSync`, a ``lightning.pytorch.plugins.LayerSync``: what
  ``Trainer(sync_batchnorm=True)`` does with torch's ``SyncBatchNorm``, with
  :func:`normlab.distributed.convert_sync` / :func:`~normlab.distributed.revert_sync`
  (every normlab batch-statistics layer synced; torch's BatchNorm becomes normlab's,
  sharing its tensors). Lightning applies it when fitting under a parallel strategy
  (ddp, fsdp) and reverts it at teardown: ``Trainer(strategy="ddp",
  plugins=[NormlabSync()])``, without ``sync_batchnorm=True``.
* :class:`PreciseBN`: before each validation of a fit (not the sanity check) and at
  the end of training, recalibrates the model's running statistics
  (:func:`normlab.recalibrate.recalibrate`) from the first ``num_batches`` batches of
  the training dataloader, in eval mode; under a multi-process strategy each rank
  feeds its own shard and the statistics pool over the ranks
  (``process_group="world"``), then :func:`~normlab.distributed.sync_running_stats`
  makes every other running buffer agree too.
* :class:`Doctor`: when training starts, runs :func:`normlab.doctor.diagnose` on the
  model with the first training batch and logs its findings on rank 0 (``report``
  keeps them; ``strict=True`` stops the fit on error findings).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from ..distributed import WORLD, convert_sync, revert_sync
from ..doctor import Report, diagnose
from ..recalibrate.ranks import local_forwards
from ._precise import batch_count, first_batches, recalibrate_in_eval

__all__ = ["Doctor", "NormlabSync", "PreciseBN", "first_item"]

log = logging.getLogger(__name__)


def first_item(batch: Any) -> Any:
    """The model's input of a training batch: ``x`` of an ``(x, y, ...)`` tuple or list,
    the batch itself otherwise (the default ``batch_fn`` of the callbacks)."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


class NormlabSync(LayerSync):
    """Cross-process batch statistics for normlab's layers (and torch's BatchNorm).

    Args:
        process_group: ``"world"`` (the default group) or a ``ProcessGroup``.
    """

    def __init__(self, process_group: Any = WORLD) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync(model, self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync(model)


def _training_batches(trainer: Trainer, limit: int | None) -> list[Any]:
    loader = trainer.train_dataloader
    if loader is None:
        raise RuntimeError(
            "normlab: the trainer has no training dataloader yet, so there are no batches "
            "to take statistics from; the callbacks run within Trainer.fit."
        )
    return first_batches(loader, limit)


def _distributed(trainer: Trainer) -> bool:
    return trainer.world_size > 1


class PreciseBN(Callback):
    """Recalibrate running statistics from training batches before validation and at the end.

    Args:
        num_batches: training batches per recalibration (per rank under DDP).
        method, variance: as :func:`normlab.recalibrate.recalibrate`.
        batch_fn: a training batch -> what the model is called on
            (default :func:`first_item`); moved to the module's device.
        forward_fn: ``forward_fn(model, batch)`` instead of ``model(batch)``.
        before_validation, at_train_end: when to recalibrate.

    ``last`` holds the :class:`~normlab.recalibrate.RecalibrationReport` of the latest
    recalibration.
    """

    def __init__(
        self,
        num_batches: int = 200,
        *,
        method: str = "precise",
        variance: str = "population",
        batch_fn: Callable[[Any], Any] = first_item,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        before_validation: bool = True,
        at_train_end: bool = True,
    ) -> None:
        self.num_batches = batch_count("PreciseBN", num_batches)
        self.method = method
        self.variance = variance
        self.batch_fn = batch_fn
        self.forward_fn = forward_fn
        self.before_validation = before_validation
        self.at_train_end = at_train_end
        self.last: Any = None

    def recalibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Recalibrate ``pl_module`` now (every rank must call it)."""
        batches = [
            move_data_to_device(self.batch_fn(b), pl_module.device)
            for b in _training_batches(trainer, self.num_batches)
        ]
        self.last = recalibrate_in_eval(
            pl_module,
            batches,
            method=self.method,
            variance=self.variance,
            forward_fn=self.forward_fn,
            distributed=_distributed(trainer),
        )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.before_validation and fitting and not trainer.sanity_checking:
            self.recalibrate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_end:
            self.recalibrate(trainer, pl_module)


class Doctor(Callback):
    """Log the doctor's findings on the model when training starts.

    Args:
        train_batch_size: judge the batch statistics of training at this batch size
            (default: the first training batch's own).
        batch_fn: a training batch -> the model's input (default :func:`first_item`).
        forward_fn: as :func:`normlab.doctor.diagnose`.
        strict: raise (stopping the fit) when the doctor finds errors.

    ``report`` holds the :class:`~normlab.doctor.Report`.
    """

    def __init__(
        self,
        *,
        train_batch_size: int | None = None,
        batch_fn: Callable[[Any], Any] = first_item,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        strict: bool = False,
    ) -> None:
        self.train_batch_size = train_batch_size
        self.batch_fn = batch_fn
        self.forward_fn = forward_fn
        self.strict = strict
        self.report: Report | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        example = move_data_to_device(
            self.batch_fn(_training_batches(trainer, 1)[0]), pl_module.device
        )
        # Synced layers normalize locally: only rank 0 runs this forward.
        with local_forwards(pl_module):
            self.report = diagnose(
                pl_module,
                example,
                expect_eval=False,
                train_batch_size=self.train_batch_size,
                forward_fn=self.forward_fn,
            )
        log.info("normlab doctor: %s\n%s", self.report.summary(), self.report.to_table())
        if self.strict and self.report.has_errors:
            raise RuntimeError(
                "normlab doctor found errors in the model (Doctor(strict=True)):\n"
                + self.report.to_table()
            )
