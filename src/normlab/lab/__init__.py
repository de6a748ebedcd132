"""The lab: how each norm behaves as the batch shrinks, as library code returning records.

One sub-package per role: ``data`` (images, scenes, user folders, the embedded set),
``models`` (ResNet, U-Net, a user's factory), ``tasks`` (the Task protocol, classification,
segmentation), ``run`` (config, protocol, the one loop, packing, train), ``sweep`` (the
grid, workers, torchrun ranks, the store), ``analysis`` (t-tests, power, compare, the
report) and ``bench``; ``defaults`` and ``errors`` are the torch-free pieces they share.
:func:`run_sweep` trains the grid, :class:`RunStore` keeps every finished run in SQLite,
:func:`write_report` turns stored runs into tables, Welch tests, a plot and Markdown.

The exported names are imported from their modules on first access (PEP 562), so that
the torch-free parts (``analysis.compare``, ``analysis.ttests``) load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes, names_from

if TYPE_CHECKING:
    from .analysis.report import ReportFiles, summarize, write_json, write_report
    from .data.images import DataError, ImageData, Split, load_images, split_data
    from .models.resnet import build_model
    from .models.user_model import build_user_model, load_factory
    from .run.train import EpochStats, RunConfig, RunRecord, train_run
    from .sweep.orchestrate import SweepConfig, SweepResult, default_norms, merge_shards, run_sweep
    from .sweep.runner import SweepInterrupted
    from .sweep.store import ProtocolMismatchError, RunStore, StoreError

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
    "build_user_model",
    "default_norms",
    "load_factory",
    "load_images",
    "merge_shards",
    "run_sweep",
    "split_data",
    "summarize",
    "train_run",
    "write_json",
    "write_report",
]

#: Each module and the public names that live there.
_MODULES = {
    ".data.images": ("DataError", "ImageData", "Split", "load_images", "split_data"),
    ".models.resnet": ("build_model",),
    ".models.user_model": ("build_user_model", "load_factory"),
    ".analysis.report": ("ReportFiles", "summarize", "write_json", "write_report"),
    ".sweep.runner": ("SweepInterrupted",),
    ".sweep.store": ("ProtocolMismatchError", "RunStore", "StoreError"),
    ".sweep.orchestrate": (
        "SweepConfig",
        "SweepResult",
        "default_norms",
        "merge_shards",
        "run_sweep",
    ),
    ".run.train": ("EpochStats", "RunConfig", "RunRecord", "train_run"),
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), names_from(_MODULES), __all__)
