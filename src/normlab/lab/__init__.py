"""The lab: how each norm behaves as the batch shrinks, as library code returning records.

``sweep.run_sweep`` trains the grid norms × batch sizes × seeds (``train.train_run`` per
run), ``store.RunStore`` keeps every finished run in SQLite, and ``report`` turns the
stored runs into a table with spread, Welch tests, a plot and a Markdown report.

The exported names are imported from their submodules on first access (PEP 562), so that
the torch-free parts (``compare``, ``stats``, ``power``) load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .data import DataError, ImageData, Split, load_images, split_data
    from .models import build_model
    from .report import ReportFiles, summarize, write_json, write_report
    from .runner import SweepInterrupted
    from .store import ProtocolMismatchError, RunStore, StoreError
    from .sweep import SweepConfig, SweepResult, default_norms, merge_shards, run_sweep
    from .train import EpochStats, RunConfig, RunRecord, train_run

__all__ = [
    "DataError",
    "EpochStats",
    "ImageData",
    "ProtocolMismatchError",
    "ReportFiles",
    "RunConfig",
    "RunRecord",
    "RunStore",
    "Split",
    "StoreError",
    "SweepConfig",
    "SweepInterrupted",
    "SweepResult",
    "build_model",
    "default_norms",
    "load_images",
    "merge_shards",
    "run_sweep",
    "split_data",
    "summarize",
    "train_run",
    "write_json",
    "write_report",
]

#: Exported name -> the submodule it is imported from.
_SOURCES = {
    "DataError": "data",
    "EpochStats": "train",
    "ImageData": "data",
    "ProtocolMismatchError": "store",
    "ReportFiles": "report",
    "RunConfig": "train",
    "RunRecord": "train",
    "RunStore": "store",
    "Split": "data",
    "StoreError": "store",
    "SweepConfig": "sweep",
    "SweepInterrupted": "runner",
    "SweepResult": "sweep",
    "build_model": "models",
    "default_norms": "sweep",
    "load_images": "data",
    "merge_shards": "sweep",
    "run_sweep": "sweep",
    "split_data": "data",
    "summarize": "report",
    "train_run": "train",
    "write_json": "report",
    "write_report": "report",
}


__getattr__, __dir__ = lazy_attributes(
    __name__, globals(), {k: (f".{v}", k) for k, v in _SOURCES.items()}, __all__
)
