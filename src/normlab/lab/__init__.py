"""The lab: how each norm behaves as the batch shrinks, as library code returning records.

``sweep.run_sweep`` trains the grid norms × batch sizes × seeds (``train.train_run`` per
run), ``store.RunStore`` keeps every finished run in SQLite, and ``report`` turns the
stored runs into a table with spread, Welch tests, a plot and a Markdown report.
"""

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
