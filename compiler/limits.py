"""The one check of the command line's whole numbers and durations (threads, rounds, runs, timeouts), for the CLI,
the library and the records read back from disk alike. Parity thresholds have theirs in
`kiln.compiler.types.check_thresholds`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.types import is_finite_number

MAX_THREADS = 1024  # a thread count above this is a typo, not a machine
MAX_COUNT = 2**31 - 1  # the largest count the runtimes' C ints take


def check_count(flag: str, value: int | None, least: int = 1, most: int = MAX_COUNT) -> None:
    """A whole number from `least` to `most` (None: not given), else a one-line UsageError naming `flag`. A count
    past what the runtimes' C ints hold would reach them as a raw TypeError or OverflowError."""
    if value is None:
        return
    example = f"e.g. {flag} {max(least, 2)}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{flag} {value!r}: must be a whole number", example)
    if value < least:
        raise UsageError(f"{flag} {value}: must be at least {least}", example)
    if value > most:
        raise UsageError(f"{flag} {value}: must be at most {most}", example)


def check_threads(flag: str, value: int | None) -> None:
    """A thread count: 1 to MAX_THREADS (None: each runtime's default)."""
    check_count(flag, value, 1, MAX_THREADS)


def check_seconds(flag: str, value: float | None) -> None:
    """A duration: a finite number of seconds > 0 (None: not given). A NaN would make every wait on it fail or
    never end."""
    if value is None:
        return
    if not (is_finite_number(value) and value > 0):
        raise UsageError(f"{flag} {value}: must be a finite number of seconds > 0", f"e.g. {flag} 300")


def accepts(check: Callable[..., None], **values: Any) -> bool:
    """Whether `check` (one here, or `kiln.compiler.types.check_thresholds`) takes `values`, none of them None: for a
    table of options that says what is wrong in its own words."""
    try:
        check(**values)
    except UsageError:
        return False
    return None not in values.values()
