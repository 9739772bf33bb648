"""argparse types of the subcommands: whole numbers with a lower bound, seconds."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(
    minimum: int, expected: str = "a whole number", too_small: str = "must be >= {minimum}"
) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; the messages say what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            message = too_small.format(minimum=minimum)
            raise argparse.ArgumentTypeError(f"{message}, got {value}")
        return value

    return parse


count = whole_number(0)  # >= 0
positive = whole_number(1)  # >= 1
dataset_row = whole_number(0, "a dataset row number", "dataset rows are numbered from 0")


def seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value
