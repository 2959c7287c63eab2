"""One cell's process: `Job` (what it needs), `run_job` (run it in a new process group with its time and memory
limits, and turn whatever happened into a `CellResult`), and killing the cells still running on Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.compiler.matrix.config import CellSpec, physical_memory_gb
from kiln.compiler.matrix.results import CONVERSION_FAILED, PASSED, CellResult
from kiln.compiler.processes import module_command
from kiln.compiler.safe_fs import remove_tree

TAIL_LINES = 40
TAIL_CHARS = 4000


@dataclass
class Job:
    """A cell to run, with everything its process needs."""

    cell: CellSpec
    key: str
    cell_dir: Path
    threads: int
    repeat: int
    warmup: int

    def payload(self) -> dict[str, Any]:
        """JSON-ready, for the cell's process (and a Ray worker)."""
        return {
            "cell": self.cell.to_dict(),
            "key": self.key,
            "cell_dir": str(self.cell_dir),
            "threads": self.threads,
            "repeat": self.repeat,
            "warmup": self.warmup,
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Job:
        """Inverse of `payload`."""
        return cls(
            CellSpec.from_dict(data["cell"]),
            data["key"],
            Path(data["cell_dir"]),
            data["threads"],
            data["repeat"],
            data["warmup"],
        )


def now() -> str:
    """The time as ISO 8601 UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def identity(cell: CellSpec, key: str, **fields: Any) -> CellResult:
    """A result naming its cell, with the given fields."""
    return CellResult(
        cell_id=cell.cell_id,
        model=cell.name,
        source=cell.model,
        target=cell.target,
        precision=cell.precision,
        key=key,
        **fields,
    )


_LIVE: dict[int, subprocess.Popen[bytes]] = {}  # running cell processes, killed on interrupt
_LIVE_LOCK = threading.Lock()


def run_job(job: Job, keep_artifacts: bool = False) -> CellResult:
    """Run one cell in a new process group with its time and memory limits; its result, whatever happens."""
    cell, options = job.cell, job.cell.options
    remove_tree(job.cell_dir)  # a link in its place is removed, never followed
    job.cell_dir.mkdir(parents=True)
    export_dir = job.cell_dir / "export"
    result_path = job.cell_dir / "result.json"
    memory_gb = physical_memory_gb() if options.memory_limit_gb is None else options.memory_limit_gb
    if cell.gpu:
        memory_gb = 0  # CUDA reserves more address space than any sane limit; the GPU bounds it anyway
    job_file = _write_job_file(job, export_dir, memory_gb)
    scratch = job.cell_dir / "tmp"  # the cell's temporary files, removed below even when the cell was killed
    scratch.mkdir()
    started_at, started = now(), time.monotonic()
    log_path = job.cell_dir / "cell.log"
    command = module_command("kiln.compiler.matrix.cell", str(job_file), str(result_path))
    returncode, timed_out = _run_process_group(command, _cell_env(job.threads, scratch), log_path, options.timeout)
    duration = round(time.monotonic() - started, 3)
    tail = _tail(log_path)
    timing = {"started_at": started_at, "finished_at": now(), "duration_s": duration, "cell_dir": str(job.cell_dir)}
    if not timed_out and result_path.is_file():
        outcome = json.loads(result_path.read_text())
        result = identity(cell, job.key, exit_code=returncode, **outcome, **timing)
    else:
        result = identity(cell, job.key, status=CONVERSION_FAILED, exit_code=returncode, **timing)
        result.failure, result.reason = _why_no_result(returncode, timed_out, options.timeout, tail)
    if result.failure == "out_of_memory" and memory_gb:
        result.reason = f"out of memory (limit {memory_gb:g} GiB of address space): {result.reason}"
    if result.status != PASSED:
        result.stderr_tail = tail
    if result.divergence:
        result.divergence = _divergence_link(job.cell_dir, export_dir / result.divergence, keep_artifacts)
    _clean_cell_dir(job.cell_dir, export_dir, scratch, keep_artifacts)
    return result


def _divergence_link(cell_dir: Path, record: Path, keep_artifacts: bool) -> str:
    """Where the cell's divergence record stays, relative to the run's output directory: in the kept export,
    else copied (with its page, divergence.html) into the cell's directory before the export is removed."""
    if not keep_artifacts:
        for kept in [record, record.with_suffix(".html")]:
            if kept.is_file():
                shutil.copy(kept, cell_dir / kept.name)
        record = cell_dir / record.name
    return str(record.relative_to(cell_dir.parent.parent))


def _write_job_file(job: Job, export_dir: Path, memory_gb: float) -> Path:
    """job.json: what the cell's process reads (the job, where to export, its memory limit, who its parent is)."""
    job_file = job.cell_dir / "job.json"
    job_file.write_text(
        json.dumps(
            job.payload()
            | {
                "export_dir": str(export_dir),
                "memory_bytes": int(memory_gb * 2**30) if memory_gb else None,
                "parent_pid": os.getpid(),
            },
            indent=2,
        )
    )
    return job_file


def _cell_env(threads: int, scratch: Path) -> dict[str, str]:
    """The cell process's environment: its thread count, its own temporary directory."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)  # read once, when torch loads
    env["TMPDIR"] = str(scratch)
    env.pop("KILN_DEBUG", None)
    return env


def _run_process_group(command: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, bool]:
    """Run `command` in its own process group, output to `log_path`, killing the group when it ends or at `timeout`;
    (its exit code, whether it timed out)."""
    timed_out = False
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills converters it started too
        )
        with _LIVE_LOCK:
            _LIVE[process.pid] = process
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process)
            with _LIVE_LOCK:
                _LIVE.pop(process.pid, None)
    return process.returncode, timed_out


def _clean_cell_dir(cell_dir: Path, export_dir: Path, scratch: Path, keep_artifacts: bool) -> None:
    """Keep the manifest (and the artifact only if asked); remove what a killed export could not clean up."""
    if export_dir.is_dir() and not keep_artifacts:
        for manifest in export_dir.rglob("manifest.json"):
            shutil.copy(manifest, cell_dir / "manifest.json")
        shutil.rmtree(export_dir, ignore_errors=True)
    for leftover in [scratch, *cell_dir.glob(".kiln-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:  # the output lock file of a killed export
            leftover.unlink(missing_ok=True)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the cell's process group (what it left running included), and reap the cell."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def kill_live_cells() -> None:
    """Kill every running cell process (on Ctrl-C)."""
    with _LIVE_LOCK:
        processes = list(_LIVE.values())
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _tail(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-TAIL_LINES:])[-TAIL_CHARS:]


def _why_no_result(code: int | None, timed_out: bool, timeout: float, tail: str) -> tuple[str, str]:
    """(failure, reason) of a cell process that left no result: it hung, crashed or ran out of memory."""
    stages = [line for line in tail.splitlines() if line.startswith("[kiln] ") and line.endswith("...")]
    during = f" during: {stages[-1].removeprefix('[kiln] ').removesuffix(' ...')}" if stages else ""
    if timed_out:
        return "timeout", f"timed out after {timeout:g}s{during} (process group killed)"
    if any(s in tail for s in ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")):
        return "out_of_memory", f"ran out of memory{during}"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return "crash", f"crashed: killed by {name}{during}"
    return "crash", f"exited with code {code} without a result{during}"
