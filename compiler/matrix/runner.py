"""Running a matrix: plan the cells, skip finished and cached ones, run the rest in limited processes
(locally or as Ray tasks), stream results to `results.jsonl`, and write the reports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compiler.errors import MissingBackendError, UsageError
from compiler.matrix.config import ROOT, CellSpec, MatrixConfig, cell_key, kiln_code_hash, physical_memory_gb
from compiler.matrix.results import (
    CONVERSION_FAILED,
    NOT_RUN,
    PARITY_FAILED,
    PASSED,
    RESULTS_FILE,
    UNAVAILABLE,
    CellResult,
    append_result,
    read_results,
)
from compiler.progress import Progress

PLAN_FILE = "plan.json"
CELLS_DIR = "cells"
TAIL_LINES = 40
TAIL_CHARS = 4000
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Shard:
    """Shard I of N (1-based): every N-th cell of the sorted cell list, starting at the I-th."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse `I/N`."""
        index, _, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            raise UsageError(f"--shard '{text}' is not I/N", "write for example --shard 2/4") from None
        if not 1 <= shard.index <= shard.count:
            raise UsageError(f"--shard {text}: need 1 <= I <= N", "shards are numbered from 1")
        return shard

    def select(self, cells: list[CellSpec]) -> list[CellSpec]:
        """This shard's cells of the (sorted) cell list."""
        return [c for i, c in enumerate(cells) if i % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RunSettings:
    """How to run a matrix (not what is in it)."""

    out: Path
    shard: Shard = field(default_factory=Shard)
    rerun: bool = False
    cache_dir: Path | None = None  # None: no cache
    keep_artifacts: bool = False
    executor: str = "local"  # "local" or "ray"
    address: str | None = None  # Ray cluster address (None: RAY_ADDRESS, or a new local instance)
    baseline: Path | None = None
    allow_fail: list[str] = field(default_factory=list)
    error_factor: float = 10.0
    latency_factor: float = 1.10


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


# ------------------------------------------------------------------------------------------ one cell


_LIVE: dict[int, subprocess.Popen[bytes]] = {}  # running cell processes, killed on interrupt
_LIVE_LOCK = threading.Lock()


def run_job(job: Job, keep_artifacts: bool = False) -> CellResult:
    """Run one cell in a new process group with its time and memory limits; its result, whatever happens."""
    cell, options = job.cell, job.cell.options
    shutil.rmtree(job.cell_dir, ignore_errors=True)
    job.cell_dir.mkdir(parents=True)
    export_dir = job.cell_dir / "export"
    result_path = job.cell_dir / "result.json"
    memory_gb = physical_memory_gb() if options.memory_limit_gb is None else options.memory_limit_gb
    if cell.gpu:
        memory_gb = 0  # CUDA reserves more address space than any sane limit; the GPU bounds it anyway
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(job.threads)  # read once, when torch loads
    scratch = job.cell_dir / "tmp"  # the cell's temporary files, removed below even when the cell was killed
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    env.pop("KILN_DEBUG", None)
    started_at, started = now(), time.monotonic()
    log_path = job.cell_dir / "cell.log"
    timed_out = False
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "compiler.matrix.cell", str(job_file), str(result_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills converters it started too
        )
        with _LIVE_LOCK:
            _LIVE[process.pid] = process
        try:
            process.wait(timeout=options.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process)
            with _LIVE_LOCK:
                _LIVE.pop(process.pid, None)
    duration = round(time.monotonic() - started, 3)
    tail = _tail(log_path)
    timing = {"started_at": started_at, "finished_at": now(), "duration_s": duration, "cell_dir": str(job.cell_dir)}
    if not timed_out and result_path.is_file():
        outcome = json.loads(result_path.read_text())
        result = identity(cell, job.key, exit_code=process.returncode, **outcome, **timing)
    else:
        result = identity(cell, job.key, status=CONVERSION_FAILED, exit_code=process.returncode, **timing)
        result.failure, result.reason = _why_no_result(process.returncode, timed_out, options.timeout, tail)
    if result.failure == "out_of_memory" and memory_gb:
        result.reason = f"out of memory (limit {memory_gb:g} GiB of address space): {result.reason}"
    if result.status != PASSED:
        result.stderr_tail = tail
    if export_dir.is_dir() and not keep_artifacts:
        for manifest in export_dir.rglob("manifest.json"):
            shutil.copy(manifest, job.cell_dir / "manifest.json")
        shutil.rmtree(export_dir, ignore_errors=True)
    for leftover in [scratch, *job.cell_dir.glob(".kiln-*")]:  # what a killed export could not clean up
        shutil.rmtree(leftover, ignore_errors=True)
    return result


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


# ------------------------------------------------------------------------------------------ executors


def run_local(jobs: list[Job], workers: int, keep_artifacts: bool, on_done: Callable[[CellResult], None]) -> None:
    """Run jobs, `workers` at a time, each in its own process; `on_done` as each ends."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-cell")
    pending: set[Future[CellResult]] = set()
    try:
        pending = {pool.submit(run_job, job, keep_artifacts) for job in jobs}
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(future.result())
    except BaseException:
        for future in pending:
            future.cancel()
        kill_live_cells()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray_cell(payload: dict[str, Any], keep_artifacts: bool) -> dict[str, Any]:
    """A Ray task: one cell, run on the worker exactly as the local executor runs it."""
    return run_job(Job.from_payload(payload), keep_artifacts).to_dict()


def run_ray(jobs: list[Job], address: str | None, keep_artifacts: bool, on_done: Callable[[CellResult], None]) -> None:
    """Run each job as a Ray task (1 CPU, and 1 GPU for a GPU target) on an existing cluster or a local one."""
    try:
        import ray
    except ImportError:
        raise MissingBackendError("--executor ray needs ray", "pip install 'kiln[ray]'") from None
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}}
    if not ray.is_initialized():
        try:
            ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
        except ConnectionError as exc:
            raise UsageError(f"cannot reach the Ray cluster at {address}: {exc}", "check --address") from None
    remote = ray.remote(_ray_cell)
    refs: dict[Any, Job] = {}
    if not ray.cluster_resources().get("GPU"):  # a GPU task would wait forever for a GPU that never comes
        for job in (j for j in jobs if j.cell.gpu):
            reason = f"{job.cell.target} needs a GPU and the Ray cluster has none"
            on_done(identity(job.cell, job.key, status=UNAVAILABLE, reason=reason, finished_at=now()))
        jobs = [j for j in jobs if not j.cell.gpu]
    for job in jobs:
        task = remote.options(num_cpus=1, num_gpus=1 if job.cell.gpu else 0, runtime_env=runtime_env, max_retries=0)
        refs[task.remote(job.payload(), keep_artifacts)] = job
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    result = CellResult.from_dict(ray.get(ref))
                except Exception as exc:  # the Ray task itself failed (worker lost, node died)
                    reason = f"ray task failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                    result = identity(job.cell, job.key, status=CONVERSION_FAILED, failure="crash", reason=reason)
                on_done(result)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


# ------------------------------------------------------------------------------------------ cache


class CellCache:
    """Results of earlier runs by cell key, in a directory shared between runs (and output directories)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> CellResult | None:
        """The cached result of this key, if any."""
        try:
            return CellResult.from_dict(json.loads(self._path(key).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, result: CellResult) -> None:
        """Keep a result whose outcome a re-run would repeat: not crashes, timeouts or unavailable targets."""
        if result.status not in (PASSED, PARITY_FAILED) and result.failure != "error":
            return
        path = self._path(result.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(result.to_dict()))
        os.replace(partial, path)


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Plan:
    """Every cell of the matrix with its key, and which of them this shard runs."""

    cells: list[CellSpec]
    keys: dict[str, str]  # cell id -> key
    shard: Shard
    settings: dict[str, Any]
    host: dict[str, Any]

    def mine(self) -> list[CellSpec]:
        """The cells of this shard."""
        return self.shard.select(self.cells)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (written as plan.json beside the results)."""
        return {
            "schema_version": 1,
            "shard": str(self.shard),
            "settings": self.settings,
            "host": self.host,
            "cells": [
                {"cell": c.to_dict(), "key": self.keys[c.cell_id], "shard": self._shard_of(i)}
                for i, c in enumerate(self.cells)
            ],
        }

    def _shard_of(self, index: int) -> str:
        return f"{index % self.shard.count + 1}/{self.shard.count}"

    @classmethod
    def read(cls, directory: Path) -> Plan:
        """The plan.json of a matrix output directory."""
        path = directory / PLAN_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{directory} holds no {PLAN_FILE}", "pass directories written by `kiln matrix`") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}", "re-run that shard") from None
        cells = [CellSpec.from_dict(c["cell"]) for c in data["cells"]]
        keys = {c["cell"]["name"] + "/" + c["cell"]["target"] + "/" + c["cell"]["precision"]: c["key"]
                for c in data["cells"]}  # fmt: skip
        return cls(cells, keys, Shard.parse(data["shard"]), data.get("settings", {}), data.get("host", {}))


def plan_matrix(config: MatrixConfig, shard: Shard, executor: str) -> Plan:
    """The cells of the matrix and their keys."""
    from compiler.host import host_info

    cells = config.cells()
    host = host_info()
    code = kiln_code_hash()
    run = {"threads": config.threads, "repeat": config.repeat, "warmup": config.warmup}
    keys = {c.cell_id: cell_key(c, run, code, host) for c in cells}
    return Plan(cells, keys, shard, run | {"executor": executor}, host)


def run_matrix(config: MatrixConfig, settings: RunSettings, progress: Progress) -> tuple[dict[str, Any], int]:
    """Run this shard of the matrix (resuming and using the cache), write its reports; the report and exit code."""
    from compiler.matrix.reports import write_reports

    plan = plan_matrix(config, settings.shard, settings.executor)
    plan.settings["allow_fail"] = settings.allow_fail  # so that a merge of the shards honours them too
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    results_path = out / RESULTS_FILE
    finished = {} if settings.rerun else read_results(results_path)
    cache = CellCache(settings.cache_dir) if settings.cache_dir else None
    mine = plan.mine()
    results: dict[str, CellResult] = {}
    jobs: list[Job] = []
    counts = {"resumed": 0, "cached": 0}

    def record(result: CellResult, tag: str = "") -> None:
        result.shard = str(settings.shard)
        results[result.cell_id] = result
        append_result(results_path, result)
        if cache is not None and not result.cached:
            cache.put(result)
        progress.say(f"[{len(results)}/{len(mine)}] {describe(result)}{tag}")

    for cell in mine:
        key = plan.keys[cell.cell_id]
        if key in finished:
            results[cell.cell_id] = finished[key]
            counts["resumed"] += 1
        elif cell.not_applicable:
            record(identity(cell, key, status=UNAVAILABLE, reason=cell.not_applicable, finished_at=now()))
        elif cache is not None and not settings.rerun and (hit := cache.get(key)) is not None:
            hit.cached = True
            counts["cached"] += 1
            record(hit, " (cached)")
        else:
            jobs.append(Job(cell, key, out / CELLS_DIR / safe_name(cell.cell_id), config.threads, config.repeat,
                            config.warmup))  # fmt: skip
    progress.say(
        f"matrix: {len(mine)} cells in shard {settings.shard} of {len(plan.cells)}; "
        f"{counts['resumed']} already done, {counts['cached']} from the cache, {len(jobs)} to run "
        f"({settings.executor}{f', {config.jobs} at a time' if settings.executor == 'local' else ''})"
    )
    if settings.executor == "ray":
        run_ray(jobs, settings.address, settings.keep_artifacts, record)
    else:
        run_local(jobs, config.jobs, settings.keep_artifacts, record)
    ordered = [results[c.cell_id] for c in mine]
    report = write_reports([plan], ordered, out, settings)
    return report, exit_code(report)


def merge_matrix(directories: list[Path], settings: RunSettings) -> tuple[dict[str, Any], int]:
    """Join the results of shard output directories into one report in `settings.out`."""
    from compiler.matrix.reports import write_reports

    if not directories:
        raise UsageError("matrix merge needs at least one directory", "pass the --out directories of the shards")
    plans = [Plan.read(d) for d in directories]
    for plan in plans:
        settings.allow_fail += [p for p in plan.settings.get("allow_fail", []) if p not in settings.allow_fail]
    planned: dict[str, tuple[CellSpec, str]] = {}
    for plan in plans:
        for cell in plan.cells:
            planned.setdefault(cell.cell_id, (cell, plan.keys[cell.cell_id]))
    found: dict[str, CellResult] = {}
    for directory in directories:
        for key, result in read_results(directory / RESULTS_FILE).items():
            if planned.get(result.cell_id, (None, ""))[1] == key:
                found[result.cell_id] = result
    ordered = [
        found.get(cell_id)
        or identity(cell, key, status=NOT_RUN, reason="no shard reported this cell (did a shard fail to run?)")
        for cell_id, (cell, key) in sorted(planned.items())
    ]
    settings.out.mkdir(parents=True, exist_ok=True)
    report = write_reports(plans, ordered, settings.out, settings)
    return report, exit_code(report)


def exit_code(report: dict[str, Any]) -> int:
    """1 when a cell expected to pass failed or regressed, else 0."""
    return 1 if report["summary"]["unexpected_failures"] or report["summary"]["regressions"] else 0


def safe_name(cell_id: str) -> str:
    """A directory name for a cell id."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell_id.replace("/", "__"))


def describe(result: CellResult) -> str:
    """One line: the cell, its status, and its figures or its reason."""
    from compiler.matrix.results import STATUS_LABELS

    text = f"{result.cell_id}: {STATUS_LABELS.get(result.status, result.status)}"
    figures = []
    if result.max_abs_error is not None:
        figures.append(f"max err {result.max_abs_error:.2g}")
    if result.latency_ms is not None:
        figures.append(f"{result.latency_ms:.3g} ms")
    if result.speedup is not None:
        figures.append(f"{result.speedup:.2f}x")
    if figures:
        text += f" ({', '.join(figures)})"
    if result.reason and result.status != PASSED:
        text += f": {result.reason[:200]}"
    if result.duration_s is not None:
        text += f" [{result.duration_s:.1f}s]"
    return text
