"""`kiln bench`: time existing exports where they will run, each candidate in its own process, in interleaved
rounds, so that a noisy neighbour (or the machine's drift) hits every candidate alike.

`run_bench(paths, options)` is the whole command: find the candidates (`find_candidates`), start one worker
process per candidate (`kiln.compiler.perf.bench_worker`; loaded once, timed loading and first inference), warm each
up, run `options.rounds` rounds in which every candidate runs `options.runs` timed runs in a rotating order
(`interleave`), and summarize (`kiln.compiler.perf.bench_report`). Workers are loaded one after the other, so that load
and first-inference times are not disturbed by each other.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kiln.compiler.errors import KilnError, MissingBackendError, UsageError, error_text
from kiln.compiler.limits import check_count, check_seconds, check_threads
from kiln.compiler.perf.bench_report import (
    SCHEMA,
    SPREAD_LIMIT,
    TIMED_FAILURE,
    latency_stats,
    speedup,
    write_bench_files,
)
from kiln.compiler.perf.bench_worker import LOAD_TIMEOUT_S, ROUND_TIMEOUT_S, Worker, WorkerFailed
from kiln.compiler.types import Manifest

if TYPE_CHECKING:
    from kiln.compiler.progress import Progress

DEFAULT_ROUNDS = 5
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 5
COMPILE_TIMEOUT_S = 300.0  # torch.compile of a zoo model takes ~25 s on 2 cores; past this it is "too slow"
EAGER, COMPILED, ARTIFACT = "eager", "compile", "artifact"
MAX_RUNS = 5000  # the most runs per round a minimum round time asks for


@dataclass(frozen=True)
class BenchOptions:
    """What `kiln bench` was asked: threads (None: each runtime's default), rounds x timed runs per round after
    `warmup` untimed runs, the batch (None: the stored inputs' own), and the eager / torch.compile comparison."""

    threads: int | None = None
    rounds: int = DEFAULT_ROUNDS
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    batch: int | None = None
    compare_eager: bool = False
    model: str | None = None
    compile_timeout_s: float = COMPILE_TIMEOUT_S
    trust_pickle: bool = False
    write: bool = True
    # Each candidate's runs in a round last at least this long: more runs for a fast model (`kiln tune`; 0, as
    # `kiln bench` has it: exactly `runs`).
    min_round_ms: float = 0.0
    # A worker that does not finish one round's runs (or its warm-up) in this long is stopped or hung: it is
    # killed and its candidate reported as failed, the others go on.
    round_timeout_s: float = ROUND_TIMEOUT_S

    def check(self) -> None:
        """A one-line UsageError for a count or a duration that makes no sense (`kiln.compiler.limits`)."""
        check_threads("--threads", self.threads)
        for flag, value, least in (("--rounds", self.rounds, 1), ("--runs", self.runs, 1),
                                   ("--warmup", self.warmup, 0), ("--batch", self.batch, 1)):  # fmt: skip
            check_count(flag, value, least)
        check_seconds("--compile-timeout", self.compile_timeout_s)
        check_seconds("--round-timeout", self.round_timeout_s)
        if self.model is not None and not self.compare_eager:
            raise UsageError("--model is only used with --compare-eager", "add --compare-eager, or drop --model")


@dataclass
class Candidate:
    """One thing to time: an export directory, or PyTorch eager / torch.compile on an export's inputs."""

    name: str
    kind: str
    directory: Path
    manifest: Manifest
    model: str | None = None
    threads: int | None = None  # this candidate's own thread count (`kiln tune`); None: the options'
    settings: dict[str, str] = field(default_factory=dict)  # RuntimeSettings.to_dict() to load it with
    batch: int | None = None  # this candidate's own batch (`kiln tune`: dynamic-batch builds); None: the options'

    def job(self, options: BenchOptions) -> dict[str, Any]:
        """The first line its worker reads."""
        return {
            "kind": self.kind,
            "directory": str(self.directory),
            "model": self.model,
            "threads": self.threads if self.threads is not None else options.threads,
            "runtime_settings": self.settings,
            "batch": self.batch if self.batch is not None else options.batch,
            "trust_pickle": options.trust_pickle,
        }


def find_candidates(paths: Sequence[str | Path], options: BenchOptions) -> list[Candidate]:
    """Every published export under `paths` (a target subdirectory of a multi-target export is one each), checked:
    runnable here, and able to take `options.batch`; then eager and torch.compile when asked."""
    from kiln.compiler.export.loading import export_dirs
    from kiln.compiler.export.staging import REJECTED
    from kiln.targets import get_target

    found: list[Candidate] = []
    for path in paths:
        for directory in export_dirs(path):
            manifest = Manifest.read(directory)
            if not manifest.published or REJECTED in directory.resolve().parts:
                raise UsageError(
                    f"{directory} is a rejected build (it failed parity), not a published export",
                    "bench the published exports: the --out directory of `kiln export`",
                )
            reason = get_target(manifest.target).unavailable_reason()
            if reason:
                raise MissingBackendError(f"cannot run the {manifest.target} export {directory} here: {reason}")
            if options.batch is not None:
                check_batch(directory, manifest, options.batch)
            found.append(Candidate(manifest.target, ARTIFACT, directory, manifest))
    names = [c.name for c in found]
    for candidate in found:
        if names.count(candidate.name) > 1:
            candidate.name = f"{candidate.name} ({candidate.directory})"
    if options.compare_eager:
        model = eager_source(found, options.model)
        first = found[0]
        found += [Candidate(label, kind, first.directory, first.manifest, model) for label, kind in _TORCH]
    return found


_TORCH = (("pytorch eager", EAGER), ("torch.compile", COMPILED))


def check_batch(directory: Path, manifest: Manifest, batch: int) -> None:
    """Refuse a batch outside the export's dynamic batch range, or any batch for a static export."""
    declared = manifest.target_info.get("dynamic_batch")
    dynamic = bool(manifest.inputs) and all(s.shape and isinstance(s.shape[0], str) for s in manifest.inputs)
    if not declared or not dynamic:
        raise UsageError(
            f"--batch {batch}: {directory} has static input shapes ({manifest.inputs[0].describe()})",
            "re-export with --dynamic-batch MIN:MAX to time other batch sizes, or drop --batch",
        )
    low, _, high = str(declared).partition(":")
    if not low.isdigit() or not high.isdigit():
        raise UsageError(f"{directory}: manifest has an unreadable dynamic_batch {declared!r}", "re-export the model")
    if not int(low) <= batch <= int(high):
        raise UsageError(
            f"--batch {batch} is outside the dynamic batch range {declared} of {directory}",
            f"pick a batch from {low} to {high}, or re-export with a wider --dynamic-batch",
        )


def eager_source(candidates: list[Candidate], model: str | None) -> str:
    """The PyTorch source to time eager and torch.compile on: `model`, else the exports' own source when it can
    be loaded again (a zoo: name, or a file that exists). The candidates must come from one model."""
    hashes = {c.manifest.source.get("state_hash") for c in candidates}
    if len(hashes) > 1:
        raise UsageError(
            "--compare-eager: the exports come from different models (their state hashes differ)",
            "bench the exports of one model at a time",
        )
    if model is not None:
        return model
    described = str(candidates[0].manifest.source.get("description", ""))
    file_part = described.rpartition(":")[0] if ".py:" in described else described
    if described.startswith("zoo:") or (described and Path(file_part).is_file() and file_part[-3:] != ".py"):
        return described
    if described and Path(file_part).is_file():  # never run code that only a manifest names
        raise UsageError(
            f"--compare-eager: the export's source {described!r} is Python code, which Kiln runs only when you name it",
            f"pass --model {described} if you trust that file",
        )
    raise UsageError(
        f"--compare-eager: the export's source {described or '(none recorded)'!r} cannot be loaded from here",
        "pass --model SOURCE (zoo:NAME, file.py:factory or file.pt2)",
    )


class Timed(Protocol):
    """What the scheduler needs of a worker."""

    def time(self, runs: int, warmup: int = 0) -> list[float]:
        """Milliseconds of `runs` timed runs after `warmup` untimed ones."""
        ...


def rotation(count: int, round_index: int) -> list[int]:
    """The order candidates run in, in round `round_index`: each starts a round in turn."""
    return [(round_index + i) % count for i in range(count)]


def runs_per_round(latency_ms: float, options: BenchOptions) -> int:
    """`options.runs`, or more where that many runs of `latency_ms` would last under `options.min_round_ms`: ten
    runs of a sub-millisecond model fit in one scheduler tick, so a single stall would decide its round."""
    if options.min_round_ms <= 0 or not (math.isfinite(latency_ms) and latency_ms > 0):
        return options.runs
    return max(options.runs, min(MAX_RUNS, math.ceil(options.min_round_ms / latency_ms)))


def interleave(
    workers: Sequence[Timed],
    rounds: int,
    runs: int | Sequence[int],
    on_round: Callable[[int], None] | None = None,
    failed: dict[int, str] | None = None,
) -> tuple[list[list[list[float]]], dict[int, str]]:
    """Run `rounds` rounds; in each, every worker runs `runs` timed runs (or its own count, `runs[index]`), in the
    order `rotation` gives. Returns times[worker][round] and the workers that failed (index -> why; skipped from
    then on, as are those already in `failed`)."""
    times: list[list[list[float]]] = [[] for _ in workers]
    failed = dict(failed or {})
    for round_index in range(rounds):
        if on_round is not None:
            on_round(round_index)
        for index in rotation(len(workers), round_index):
            if index in failed:
                continue
            try:
                times[index].append(workers[index].time(runs if isinstance(runs, int) else runs[index]))
            except WorkerFailed as error:
                failed[index] = str(error)
    return times, failed


@dataclass
class Started:
    """A worker that loaded, or why its candidate is left out."""

    candidate: Candidate
    worker: Worker | None
    info: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


def start_workers(
    candidates: list[Candidate], options: BenchOptions, progress: Progress, keep_going: bool = False
) -> list[Started]:
    """Start and load every candidate, one after the other. An export that fails to load stops the command (its
    error, e.g. exit 3 for a missing runtime) unless `keep_going` (`kiln tune`: it is recorded, as torch.compile
    failing or compiling too slowly always is)."""
    started: list[Started] = []
    try:
        for candidate in candidates:
            progress.say(f"loading {candidate.name} ...")
            timeout = options.compile_timeout_s if candidate.kind == COMPILED else LOAD_TIMEOUT_S
            worker = Worker(candidate.job(options), round_timeout_s=options.round_timeout_s)
            try:
                info = worker.start(timeout)
            except BaseException as error:
                worker.close(force=True)
                if not isinstance(error, (KilnError, WorkerFailed)):  # Ctrl-C while it loads
                    raise
                if candidate.kind != COMPILED and not keep_going:  # an export, or eager (a bad --model): stop
                    raise _as_error(candidate, error) from None
                why = (
                    f"too slow to compile (over {timeout:g} s)"
                    if candidate.kind == COMPILED and "no answer" in str(error)
                    else str(error)
                )
                started.append(Started(candidate, None, failure=why))
                progress.say(f"{candidate.name} left out: {why}")
                continue
            started.append(Started(candidate, worker, info))
    except BaseException:
        for entry in started:
            if entry.worker is not None:
                entry.worker.close()
        raise
    return started


def _as_error(candidate: Candidate, error: Exception) -> KilnError:
    if isinstance(error, KilnError):
        return error
    failed = KilnError(f"{candidate.name}: the benchmark worker failed: {error_text(error)}", "rerun with KILN_DEBUG=1")
    failed.exit_code = 4
    return failed


def run_bench(paths: Sequence[str | Path], options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """Time every candidate under `paths` as `options` say; the report (see `report`),
    also
    written as bench.json beside each export's manifest unless `options.write` is False."""
    options.check()
    result = time_candidates(find_candidates(paths, options), options, progress)
    if options.write:
        for note in write_bench_files(result):
            progress.warn(note)
    return result


def time_candidates(
    candidates: list[Candidate], options: BenchOptions, progress: Progress, keep_going: bool = False
) -> dict[str, Any]:
    """Load each candidate in its own worker, warm them up, time them in interleaved rounds; the report (see
    `report`). Shared by `kiln bench` and `kiln tune` (`keep_going`: see
    start_workers)."""
    started = start_workers(candidates, options, progress, keep_going)
    running = [s for s in started if s.worker is not None]
    workers = [s.worker for s in running if s.worker is not None]
    try:
        cold: dict[int, str] = {}
        counts: list[int] = []
        for index, worker in enumerate(workers):
            try:
                probe = worker.time(3 if options.min_round_ms > 0 else 0, options.warmup)
                counts.append(runs_per_round(statistics.median(probe) if probe else 0.0, options))
            except WorkerFailed as error:
                cold[index] = str(error)
                counts.append(options.runs)
        each = f"{min(counts, default=options.runs)}" + (f" to {max(counts)}" if len(set(counts)) > 1 else "")

        def say_round(index: int) -> None:
            progress.say(f"round {index + 1}/{options.rounds}: {each} runs of each of {len(workers)}")

        times, failed = interleave(workers, options.rounds, counts, say_round, cold)
        peaks = [None if i in failed else w.peak_rss_mib() for i, w in enumerate(workers)]
    except BaseException:  # Ctrl-C, or a worker that stopped answering: do not wait for the others
        for worker in workers:
            worker.close(force=True)
        raise
    for worker in workers:
        worker.close()
    return report(started, running, times, failed, peaks, options)


def report(
    started: list[Started],
    running: list[Started],
    times: list[list[list[float]]],
    failed: dict[int, str],
    peaks: list[float | None],
    options: BenchOptions,
) -> dict[str, Any]:
    """The report of one `kiln bench` run: host, settings, and one record per candidate (left-out ones too)."""
    from kiln.compiler.host import host_info

    records: dict[int, dict[str, Any]] = {}
    for index, entry in enumerate(running):
        record = _record(entry, options)
        if index in failed:
            record["failure"] = f"{TIMED_FAILURE}: {failed[index]}"
        elif times[index]:
            record |= latency_stats(times[index])
            record["peak_rss_mib"] = peaks[index]
            batch = record["batch"] or 1
            record["throughput_items_per_s"] = batch * 1000 / record["latency_ms"]["p50"]
        records[id(entry)] = record
    eager = next((r for r in records.values() if r["kind"] == "eager" and "round_medians_ms" in r), None)
    for record in records.values():
        if eager is not None and "round_medians_ms" in record:
            record["speedup_vs_eager"] = speedup(eager["round_medians_ms"], record["round_medians_ms"])
    candidates = [records.get(id(entry)) or _record(entry, options) for entry in started]
    first = started[0].candidate.manifest
    return {
        "schema": SCHEMA,
        "timed_on": host_info(),
        "built_on": first.host,
        "settings": {
            "threads": options.threads,
            "rounds": options.rounds,
            "runs": options.runs,
            "min_round_ms": options.min_round_ms,
            "warmup": options.warmup,
            "batch": options.batch,
        },
        "spread_limit": SPREAD_LIMIT,
        "candidates": candidates,
    }


def _record(entry: Started, options: BenchOptions) -> dict[str, Any]:
    from kiln.compiler.export.manifest import manifest_figures

    candidate, info = entry.candidate, entry.info
    manifest = candidate.manifest
    artifact = candidate.kind == "artifact"
    return {
        "name": candidate.name,
        "kind": candidate.kind,
        "target": manifest.target if artifact else None,
        "precision": manifest.precision if artifact else "fp32",
        "directory": str(candidate.directory) if artifact else None,
        "model": candidate.model,
        "batch": info.get("batch"),
        "threads_asked": candidate.threads if candidate.threads is not None else options.threads,
        "runtime_settings": candidate.settings,
        "thread_control": info.get("thread_control"),
        "runtime_info": info.get("runtime_info", {}),
        "load_s": info.get("load_s"),
        "first_inference_ms": info.get("first_ms"),
        "artifact_bytes": manifest_figures(manifest)["artifact_bytes"] if artifact else None,
        "failure": entry.failure,
    }
