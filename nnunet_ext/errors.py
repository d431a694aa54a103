"""Errors that report bad user input. The CLI prints their message (no traceback) and exits 2."""
from __future__ import annotations

from typing import Iterable


class UserInputError(Exception):
    """Something the user gave (a path, an id, a name, an option) cannot be used; the message says why
    and what to do."""


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (process counts), refused with argparse's one-line error."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite number > 0 (a GPU memory target in GB)."""
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def name_some(names: Iterable[str], limit: int = 10) -> str:
    """The first ``limit`` of ``names`` (sorted) for an error message, and how many more there are."""
    names = sorted(names)
    return ', '.join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else '')
