"""SIGTERM handled like Ctrl-C.

SIGTERM is what `kill`, systemd, Kubernetes and CI runners send to stop a process. Left to its default action
it kills Kiln on the spot: an export's staging directory and lock file stay behind. Inside
`sigterm_as_interrupt` (the command line runs every command in it) SIGTERM raises `Terminated`, a
KeyboardInterrupt, so every cleanup that Ctrl-C runs runs too (staging directories, locks, worker and cell
processes), and the command exits with `EXIT_TERMINATED` (143, 128 + 15) instead of Ctrl-C's 130.

A second SIGTERM while the first unwinds is ignored (a supervisor that insists sends SIGKILL). A converter that
catches the first `Terminated` (some catch everything) does not stop Kiln for long: the next stage that starts
raises it again (`raise_if_terminated`, called by `kiln.compiler.progress.Progress.stage`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from kiln.compiler.errors import EXIT_INTERRUPTED, EXIT_TERMINATED


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised as a KeyboardInterrupt so that Ctrl-C's cleanup runs."""


_received = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`; the previous handler after. Off the main thread (where
    Python cannot set a handler) the block runs as it is."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received = False


def raise_if_terminated() -> None:
    """Raise `Terminated` again when SIGTERM arrived and something swallowed the first one."""
    if _received:
        raise Terminated()


def interrupted_exit_code(interrupt: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
