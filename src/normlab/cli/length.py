"""``normlab sweep``'s training-length options: ``--epochs E`` or ``--steps N``, not both.

Built without torch (every ``normlab`` command builds the sweep's parser).
"""

from __future__ import annotations

import argparse

from .args import GivenOption, positive_int

__all__ = ["add_length_arguments"]


class _OneLength(GivenOption):
    """Store the value; refuse the other length option if it was given too.

    argparse's mutually exclusive groups miss an option given at its default value
    (``--epochs 3 --steps 500``), so the check reads what was given.
    """

    def check_given(self, namespace: argparse.Namespace) -> None:
        other = {"epochs": "steps", "steps": "epochs"}[self.dest]
        if other in getattr(namespace, "given_options", ()):
            raise argparse.ArgumentError(
                self,
                f"not allowed with --{other}: a run is as long as either a number of epochs "
                "or a number of optimizer steps; give one of them",
            )


def add_length_arguments(p: argparse.ArgumentParser, default_epochs: int) -> None:
    """Add ``--epochs`` (default ``default_epochs``) and ``--steps`` (default None) to ``p``."""
    p.add_argument(
        "--epochs",
        type=positive_int,
        action=_OneLength,
        default=default_epochs,
        help="epochs at every batch size (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        action=_OneLength,
        help="instead of --epochs: exactly this many optimizer steps at every batch size, "
        f"so that large batches are not simply undertrained; the data still reshuffles "
        f"every pass, the run is evaluated {default_epochs} times and the warm-up is the "
        "same fraction of training as with epochs",
    )
