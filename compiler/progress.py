"""Stage lines on stderr while an export runs, and the time each stage took."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from kiln.compiler.memory import peak_rss
from kiln.compiler.signals import raise_if_terminated

CHATTY_LOGGERS = ("torch", "torchao", "onnxscript", "onnx_ir", "openvino", "nncf")


def quiet_libraries() -> None:
    """Keep converter chatter (Python warnings, the converters' loggers) off the terminal; Kiln reports what
    matters. Called once by each entry point that runs exports: the CLI, a matrix cell, a benchmark."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@dataclass
class StageTime:
    """The wall time of one stage, filled in when the stage ends."""

    name: str
    seconds: float = 0.0


class Progress:
    """Prints `[kiln] stage ... 1.2s` lines (unless quiet) and records stage timings, and the process's peak
    resident set when each stage ended (`peaks`, bytes: the stage where it grows is the one that used the memory)."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[StageTime]:
        """Time a stage and report its start and end; the yielded StageTime holds its seconds once it ends."""
        raise_if_terminated()  # a SIGTERM that a converter swallowed stops the run here
        self.say(f"{name}{' ' + detail if detail else ''} ...", end="")
        timed = StageTime(name)
        started = time.perf_counter()
        try:
            yield timed
        except BaseException:
            self.say(" failed", prefix=False)
            raise
        seconds = time.perf_counter() - started
        timed.seconds = round(seconds, 3)
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)
        self.peaks[name] = peak_rss()
        self.say(f" {seconds:.1f}s", prefix=False)

    @contextmanager
    def timed(self, timings: dict[str, float], name: str, detail: str = "") -> Iterator[None]:
        """A stage (`stage`) whose seconds are also added to `timings[name]` (a manifest's stage times)."""
        with self.stage(name, detail) as stage:
            yield
        timings[name] = round(timings.get(name, 0.0) + stage.seconds, 3)

    def warn(self, message: str) -> None:
        """Print a warning the user must see, even when quiet."""
        self.stream.write(f"[kiln] WARNING: {message}\n")
        self.stream.flush()

    def say(self, message: str, end: str = "\n", prefix: bool = True) -> None:
        """Print one progress message unless quiet."""
        if not self.quiet:
            self.stream.write(("[kiln] " if prefix else "") + message + end)
            self.stream.flush()


@contextmanager
def converter_output_captured() -> Iterator[None]:
    """Keep what converters print (graph dumps, their own progress) off the terminal; KILN_DEBUG=1 shows it."""
    if os.environ.get("KILN_DEBUG"):
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), native_stderr_silenced():
        yield


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null (KILN_DEBUG=1 keeps it)."""
    if os.environ.get("KILN_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
