"""The lab's errors a user can fix, in a module without torch.

:func:`normlab.cli.main` catches them to print one line and exit with status 2, and
must do so without importing the torch-heavy modules that raise them;
:mod:`normlab.lab.data.images` and :mod:`normlab.lab.sweep.store` re-export them.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "OutputPathError",
    "ProtocolMismatchError",
    "StoreError",
    "StoreLockedError",
]


class DataError(ValueError):
    """The data cannot be used: empty, unreadable, or of an unknown format."""


class StoreError(RuntimeError):
    """The file is not a normlab run store (corrupt, foreign, or from a newer version)."""


class ProtocolMismatchError(StoreError):
    """A run's protocol differs from the stored runs' and mixing protocols was not allowed."""


class StoreLockedError(StoreError):
    """Another process (a second sweep) is writing the run store."""


class OutputPathError(ValueError):
    """An output path (``--out``, ``--json``, ``--csv``, ``--db``) cannot be written."""
