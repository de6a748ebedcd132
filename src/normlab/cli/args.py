"""Argument types and actions of the lab's commands (no torch import)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "GivenOption",
    "finite_float",
    "int_at_least",
    "int_list",
    "name_list",
    "positive_float",
    "positive_int",
]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,8, got {text!r}"
        ) from None


def name_list(text: str) -> list[str]:
    """Comma-separated names; an empty list (``""``, ``","``) is refused, never read as
    "the default"."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names such as bn,gn, got {text!r} (no name)"
        )
    return names


def int_at_least(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An argument type: an integer >= ``minimum``; ``meaning`` explains the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}{meaning}, got {value}"
            )
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some errors
    return parse


positive_int = int_at_least(1)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def finite_float(text: str) -> float:
    """A finite number (``nan`` and ``inf`` refused)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``nan``, ``inf``, ``0`` and negatives refused)."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


class GivenOption(argparse.Action):
    """Store the value, and add the option's ``dest`` to ``namespace.given_options``.

    argparse cannot tell an option left at its default from one given at the default's
    value; the task's defaults replace only the options the user did not give.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        self.check_given(namespace)
        setattr(namespace, self.dest, values)
        namespace.given_options = {*getattr(namespace, "given_options", ()), self.dest}

    def check_given(self, namespace: argparse.Namespace) -> None:
        """Refuse the option in view of those given before it (a subclass's rule; none here)."""
