"""One `kiln bench` candidate in its own process: `python -m kiln.compiler.perf.bench_worker`.

The parent (`kiln.compiler.perf.benchmark`) writes one JSON job per line on stdin and reads one JSON answer per line:

* the first line is the candidate (`kind`: "artifact", "eager" or "compile"; `directory`: the export whose
  stored parity inputs are timed; `batch`, `threads`, `model` for eager/compile, `trust_pickle`). The worker
  loads it (timed), runs it once (the first inference, timed: for `torch.compile` this is the compilation) and
  answers `{"ok": true, "load_s", "first_ms", "thread_control", "runtime_info"}`, or `{"ok": false, "error",
  "exit_code"}` when it cannot (a one-line Kiln error and its exit code);
* then `{"op": "time", "runs": N, "warmup": W}` -> `{"times_ms": [...]}`, `{"op": "stats"}` -> `{"peak_rss_mib"}`,
  and `{"op": "quit"}` (or the end of stdin: the parent died) ends it.

The answers go on a copy of the original stdout; file descriptor 1 is pointed at stderr, so that whatever a
runtime prints cannot corrupt them. `Worker` is the parent's end of the same protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TextIO

from kiln.compiler.errors import KilnError, UsageError, as_kiln_error
from kiln.compiler.processes import module_command

LOAD_TIMEOUT_S = 900.0  # a worker that neither loads nor answers in this long is stuck
ROUND_TIMEOUT_S = 300.0  # the default of `kiln bench --round-timeout`: one round's (or the warm-up's) runs


def main() -> int:
    """Serve the parent until it says quit or closes stdin."""
    return serve(load_candidate)


def serve(load: Callable[[dict[str, Any]], tuple[Callable[[], Any], dict[str, Any]]]) -> int:
    """The protocol above, with `load` turning the first line's job into a no-argument run and what loading it
    found (`benchmarks/peer_worker.py` serves the peers' runtimes with it)."""
    answers = _protected_answer_channel()
    try:
        job = json.loads(sys.stdin.readline() or "{}")
        run, info = load(job)
    except BaseException as error:  # every failure is answered as one line
        failure = as_kiln_error(error) if isinstance(error, Exception) else KilnError(type(error).__name__)
        _answer(answers, {"ok": False, "error": failure.one_line(), "exit_code": failure.exit_code})
        return failure.exit_code
    _answer(answers, {"ok": True, **info})
    from kiln.compiler.perf.timing import time_ms

    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "time":
            _answer(answers, {"times_ms": time_ms(run, int(request["runs"]), int(request["warmup"]))})
        elif request["op"] == "stats":
            _answer(answers, {"peak_rss_mib": peak_rss_mib()})
        else:
            break
    return 0


def _protected_answer_channel() -> TextIO:
    """A text stream on a copy of stdout; stdout itself (Python's and the native one) goes to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def _answer(channel: TextIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message, default=str) + "\n")
    channel.flush()


def load_candidate(job: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The candidate as a no-argument function that runs it once, and what loading it found."""
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    threads = job.get("threads")
    if job["kind"] == "artifact":
        run, control, info, load_s = _artifact(Path(job["directory"]), threads, job.get("batch"), job["trust_pickle"],
                                               job.get("runtime_settings"))  # fmt: skip
    else:
        run, control, info, load_s = _torch(job, threads)
    batch = info.pop("batch")
    started = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - started) * 1000
    return run, {
        "load_s": round(load_s, 4),
        "first_ms": round(first_ms, 3),
        "thread_control": control,
        "runtime_info": info,
        "batch": batch,
    }


def _rows(feeds: dict[str, Any]) -> int | None:
    """The batch of the inputs: dim 0 of the first one that has a dimension."""
    return next((int(v.shape[0]) for v in feeds.values() if getattr(v, "ndim", 0)), None)


def _artifact(
    directory: Path, threads: int | None, batch: int | None, trust_pickle: bool, settings: dict[str, Any] | None = None
) -> tuple[Callable[[], Any], str, dict[str, Any], float]:
    from kiln.compiler.capture.pt2_archive import trusting_pickles
    from kiln.compiler.export.artifacts import Artifact, load_runner
    from kiln.compiler.perf.timing import bench_feeds
    from kiln.targets.base import RuntimeSettings

    artifact = Artifact.read(directory)
    feeds = bench_feeds(directory, artifact.manifest, batch, artifact_layout=True)
    started = time.perf_counter()
    with trusting_pickles(trust_pickle):
        runner = load_runner(artifact, threads, RuntimeSettings.from_dict(settings))
    load_s = time.perf_counter() - started
    info = {**runner.runtime_info(), "batch": _rows(feeds)}
    return lambda: runner.run(feeds), runner.thread_control, info, load_s


def _torch(job: dict[str, Any], threads: int | None) -> tuple[Callable[[], Any], str, dict[str, Any], float]:
    """PyTorch eager, or `torch.compile` (default mode) of it, on the export's inputs in the reference layout."""
    import torch
    from kiln.compiler.capture.pt2_archive import trusting_pickles
    from kiln.compiler.capture.sources import load_source
    from kiln.compiler.parity.reference import reference_runner
    from kiln.compiler.perf.timing import bench_feeds
    from kiln.compiler.types import Manifest

    if threads:
        torch.set_num_threads(threads)
    directory = Path(job["directory"])
    manifest = Manifest.read(directory)
    feeds = bench_feeds(directory, manifest, job.get("batch"), artifact_layout=False)
    started = time.perf_counter()
    with trusting_pickles(job["trust_pickle"]):
        source = load_source(job["model"])
    if source.module is None:
        raise UsageError(
            f"--compare-eager: {job['model']} is not a PyTorch model", "pass a PyTorch source with --model SOURCE"
        )
    if job["kind"] == "compile":
        source.module = torch.compile(source.module)  # type: ignore[assignment]
    reference = reference_runner(source, manifest.inputs, manifest.outputs)
    load_s = time.perf_counter() - started
    info: dict[str, Any] = {"runtime": f"torch {torch.__version__}", "threads": torch.get_num_threads()}
    info["batch"] = _rows(feeds)
    if job["kind"] == "compile":
        info["compile_mode"] = "default"
    return lambda: reference(feeds), "torch.set_num_threads", info, load_s


def peak_rss_mib() -> float | None:
    """This process's peak resident set size (VmHWM) in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class WorkerFailed(Exception):
    """A worker process died, hung or answered with an error."""


class Worker:
    """A candidate's own process (`kiln.compiler.perf.bench_worker`, or another module that `serve`s, run by
    `kiln.compiler.processes.module_command`), spoken to one JSON line at a time."""

    def __init__(self, job: dict[str, Any], module: str = "kiln.compiler.perf.bench_worker",
                 round_timeout_s: float = ROUND_TIMEOUT_S):  # fmt: skip
        self.round_timeout_s = round_timeout_s  # how long one `time` may take before the worker is killed
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close()): the worker's stderr
        self.process = subprocess.Popen(
            module_command(module),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,  # its own process group: killing it also ends torch.compile's helpers
        )
        self._send(job)

    def start(self, timeout: float) -> dict[str, Any]:
        """Wait until it has loaded the candidate and run it once: load_s, first_ms, thread_control, runtime_info.
        A worker's own Kiln error is raised as such (with its exit code)."""
        answer = self._read(timeout)
        if not answer.get("ok"):
            error = KilnError(str(answer.get("error", "the worker failed")))
            error.exit_code = int(answer.get("exit_code", 4))
            raise error
        return answer

    def time(self, runs: int, warmup: int = 0) -> list[float]:
        """Milliseconds of `runs` timed runs after `warmup` untimed ones."""
        self._send({"op": "time", "runs": runs, "warmup": warmup})
        return [float(t) for t in self._read(self.round_timeout_s, " (--round-timeout): stopped or hung")["times_ms"]]

    def peak_rss_mib(self) -> float | None:
        """The worker's peak resident set size so far (VmHWM)."""
        self._send({"op": "stats"})
        return self._read(60)["peak_rss_mib"]

    def close(self, force: bool = False) -> None:
        """Ask it to quit (`force`: do not ask); kill it when it does not."""
        try:
            if force:
                raise WorkerFailed("stopped")
            self._send({"op": "quit"})
            self.process.wait(timeout=10)
        except (WorkerFailed, subprocess.TimeoutExpired):
            self.kill()
        finally:
            self.log.close()

    def kill(self) -> None:
        """End its whole process group (the worker and whatever it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(self._died()) from None

    def _read(self, timeout: float, why: str = "") -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerFailed(f"no answer in {timeout:g} s{why}; killed it")
        line = self.process.stdout.readline()
        if not line:
            raise WorkerFailed(self._died())
        return dict(json.loads(line))

    def _died(self) -> str:
        code = self.process.wait()
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        return f"its process exited with status {code}" + (f": {lines[-1][:200]}" if lines else "")


if __name__ == "__main__":
    sys.exit(main())
