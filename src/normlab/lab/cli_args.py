"""Argument types of the lab's commands: comma-separated lists (no torch import)."""

from __future__ import annotations

import argparse

__all__ = ["int_list", "name_list", "positive_int"]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,8, got {text!r}"
        ) from None


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
