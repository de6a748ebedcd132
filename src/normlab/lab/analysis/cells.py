"""A cell of the sweep's grid as the report sees it: all seeds of one norm × batch size.

Its own module so that the report and the segmentation report (which renders cells of its
own metrics) both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cell"]


@dataclass(frozen=True)
class Cell:
    """All seeds of one norm × batch size (× protocol, when a store holds several)."""

    norm: str
    batch_size: int
    errors: tuple[float, ...]
    mean: float
    std: float
    ci95: float
    #: The protocol's name when the runs span several protocols (``"epochs=1"``), else "".
    protocol: str = ""
    #: How many of the seeds diverged (non-finite loss); their error is the one they had
    #: when they stopped, so a cell with any is flagged in every table and the JSON.
    diverged: int = 0

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def row(self) -> str:
        """The row's name in tables and plots: ``BN``, or ``BN (epochs=1)``."""
        return self.norm.upper() + (f" ({self.protocol})" if self.protocol else "")
