"""The one error hierarchy of Kiln.

Errors are raised where the problem is found; `cli.py` turns them into a one-line
message and an exit code in one place.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

EXIT_PARITY = 1  # an artifact failed parity
EXIT_USAGE = 2  # bad input or usage
EXIT_UNAVAILABLE = 3  # the target is not available on this machine
EXIT_INTERNAL = 4  # a bug in Kiln or a backend
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), see kiln.compiler.signals
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout left (`kiln targets | head`), as a shell reports it

# Terminal escape sequences (colours, bold...) that converters print into their messages
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[@-Z\\-_])")


def plain_text(text: str) -> str:
    """`text` without terminal escape sequences (e.g. `\\x1b[96m`), on one line with single spaces."""
    return " ".join(_ANSI_ESCAPE.sub("", text).split())


def error_text(error: BaseException, limit: int = 300, text: str | None = None) -> str:
    """How another library's (or the user's code's) exception is named inside a Kiln message: `Type: message`,
    the message as plain text on one line (`plain_text`) cut at `limit` characters; the type alone when it says
    nothing. `text`: the part of the message worth showing, where the caller picked it (a converter's summary
    line, the message before its traceback)."""
    shown = plain_text(str(error) if text is None else text)[:limit]
    return f"{type(error).__name__}: {shown}" if shown else type(error).__name__


class KilnError(Exception):
    """Base class: a problem Kiln can explain to the user, with a hint on how to fix it."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint as one line, for the terminal."""
        text = plain_text(self.message)
        if self.hint:
            text += f" (hint: {plain_text(self.hint)})"
        return text


class UsageError(KilnError):
    """Bad input: a missing file, a wrong option, a model that does not match its inputs."""

    exit_code = EXIT_USAGE


class UnsupportedOpError(KilnError):
    """The model uses an operation that capture or a target cannot convert."""

    exit_code = EXIT_USAGE


class MissingBackendError(KilnError):
    """A target needs a package or device that this machine does not have."""

    exit_code = EXIT_UNAVAILABLE


class ParityError(KilnError):
    """An artifact does not compute what PyTorch computes within tolerance."""

    exit_code = EXIT_PARITY


class InternalError(KilnError):
    """A bug in Kiln or a backend, not the user's input: the original exception is its __cause__."""

    exit_code = EXIT_INTERNAL


def as_kiln_error(error: Exception) -> KilnError:
    """Any exception as a Kiln error: itself if it is one, else an InternalError with the message the CLI prints."""
    if isinstance(error, KilnError):
        return error
    internal = InternalError(f"internal error: {error_text(error)}", "rerun with KILN_DEBUG=1 for the traceback")
    internal.__cause__ = error
    return internal


_T = TypeVar("_T")
_WITHIN_KILN = contextvars.ContextVar("within_kiln", default=False)


def kiln_errors_only(function: Callable[..., _T]) -> Callable[..., _T]:
    """A library entry point (`kiln.export`, `kiln.capture`, a stage's step) that raises only Kiln's own
    exceptions: a bug elsewhere becomes an InternalError with the CLI's message, the original exception chained as
    its cause. Called within Kiln (another entry point, or `within_kiln`), exceptions pass as they are."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        if _WITHIN_KILN.get():
            return function(*args, **kwargs)
        with within_kiln():
            try:
                return function(*args, **kwargs)
            except KilnError:
                raise
            except Exception as error:
                raise as_kiln_error(error) from error

    return wrapper


@contextlib.contextmanager
def within_kiln() -> Iterator[None]:
    """Within this block (an export's flow, the CLI), the entry points of `kiln_errors_only` let exceptions pass as
    they are: the caller decides what a bug becomes."""
    token = _WITHIN_KILN.set(True)
    try:
        yield
    finally:
        _WITHIN_KILN.reset(token)
