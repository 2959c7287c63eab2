"""Running a matrix: plan the cells, skip finished and cached ones, run the rest in limited processes
(locally or as Ray tasks), stream results to `results.jsonl`, and write the reports."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.matrix.cell_cache import CellCache
from kiln.compiler.matrix.config import CellSpec, MatrixConfig, cell_key, kiln_code_hash
from kiln.compiler.matrix.executors import _ray_cell, run_local, run_ray
from kiln.compiler.matrix.process import (
    KILL_GRACE_S,
    TAIL_CHARS,
    TAIL_LINES,
    Job,
    identity,
    kill_live_cells,
    now,
    run_job,
)
from kiln.compiler.matrix.results import (
    NOT_RUN,
    PASSED,
    RESULTS_FILE,
    UNAVAILABLE,
    CellResult,
    append_result,
    read_results,
    repair_results,
)
from kiln.compiler.progress import Progress
from kiln.compiler.safe_fs import read_text, within, write_file

__all__ = [  # what this module always offered, the moved parts included
    "CELLS_DIR",
    "KILL_GRACE_S",
    "PLAN_FILE",
    "TAIL_CHARS",
    "TAIL_LINES",
    "CellCache",
    "Job",
    "Plan",
    "RunSettings",
    "Shard",
    "_ray_cell",
    "describe",
    "exit_code",
    "identity",
    "kill_live_cells",
    "merge_matrix",
    "now",
    "plan_matrix",
    "run_job",
    "run_local",
    "run_matrix",
    "run_ray",
    "safe_name",
]

PLAN_FILE = "plan.json"
CELLS_DIR = "cells"


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
            data = json.loads(read_text(path))
        except FileNotFoundError:
            raise UsageError(f"{directory} holds no {PLAN_FILE}", "pass directories written by `kiln matrix`") from None
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise UsageError(f"cannot read {path}: {str(exc)[:200]}", "re-run that shard") from None
        try:
            cells = [CellSpec.from_dict(c["cell"]) for c in data["cells"]]
            keys = {c["cell"]["name"] + "/" + c["cell"]["target"] + "/" + c["cell"]["precision"]: c["key"]
                    for c in data["cells"]}  # fmt: skip
            return cls(cells, keys, Shard.parse(data["shard"]), data.get("settings", {}), data.get("host", {}))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UsageError(
                f"{path} is not a plan of `kiln matrix` ({type(exc).__name__}: {exc})", "re-run that shard"
            ) from None


def plan_matrix(config: MatrixConfig, shard: Shard, executor: str) -> Plan:
    """The cells of the matrix and their keys."""
    from kiln.compiler.host import host_info

    cells = config.cells()
    host = host_info()
    code = kiln_code_hash()
    run = {"threads": config.threads, "repeat": config.repeat, "warmup": config.warmup}
    keys = {c.cell_id: cell_key(c, run, code, host) for c in cells}
    return Plan(cells, keys, shard, run | {"executor": executor}, host)


def run_matrix(config: MatrixConfig, settings: RunSettings, progress: Progress) -> tuple[dict[str, Any], int]:
    """Run this shard of the matrix (resuming and using the cache), write its reports; the report and exit code."""
    from kiln.compiler.matrix.reports import write_reports

    plan = plan_matrix(config, settings.shard, settings.executor)
    plan.settings["allow_fail"] = settings.allow_fail  # so that a merge of the shards honours them too
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    within(out / CELLS_DIR, out)  # the cells' directories are removed and rewritten: never outside `out`
    write_file(out / PLAN_FILE, json.dumps(plan.to_dict(), indent=1) + "\n")
    results_path = out / RESULTS_FILE
    repair_results(results_path, progress.warn)  # a line torn by a kill must not swallow the next one
    finished = {} if settings.rerun else read_results(results_path, progress.warn)
    cache = CellCache(settings.cache_dir, progress.warn) if settings.cache_dir else None
    mine = plan.mine()
    results: dict[str, CellResult] = {}

    def record(result: CellResult, tag: str = "") -> None:
        result.shard = str(settings.shard)
        results[result.cell_id] = result
        append_result(results_path, result)
        if cache is not None and not result.cached:
            cache.put(result)
        progress.say(f"[{len(results)}/{len(mine)}] {describe(result)}{tag}")

    jobs, counts = _jobs_to_run(plan, config, settings, finished, cache, results, record)
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


def _jobs_to_run(
    plan: Plan,
    config: MatrixConfig,
    settings: RunSettings,
    finished: dict[str, CellResult],
    cache: CellCache | None,
    results: dict[str, CellResult],
    record: Callable[..., None],
) -> tuple[list[Job], dict[str, int]]:
    """Settle the cells of this shard that need no process (finished before, not applicable, cached) into
    `results`; the jobs of the others, and how many were resumed and cached."""
    jobs: list[Job] = []
    counts = {"resumed": 0, "cached": 0}
    for cell in plan.mine():
        key = plan.keys[cell.cell_id]
        done = finished.get(key)
        if done is not None and done.cell_id == cell.cell_id:
            results[cell.cell_id] = done
            counts["resumed"] += 1
        elif cell.not_applicable:
            record(identity(cell, key, status=UNAVAILABLE, reason=cell.not_applicable, finished_at=now()))
        elif cache is not None and not settings.rerun and (hit := cache.get(key, cell.cell_id)) is not None:
            hit.cached = True
            counts["cached"] += 1
            record(hit, " (cached)")
        else:
            jobs.append(Job(cell, key, settings.out / CELLS_DIR / safe_name(cell.cell_id), config.threads,
                            config.repeat, config.warmup))  # fmt: skip
    return jobs, counts


def merge_matrix(
    directories: list[Path], settings: RunSettings, progress: Progress | None = None
) -> tuple[dict[str, Any], int]:
    """Join the results of shard output directories into one report in `settings.out`."""
    from kiln.compiler.matrix.reports import write_reports

    if not directories:
        raise UsageError("matrix merge needs at least one directory", "pass the --out directories of the shards")
    warn = (progress or Progress()).warn
    plans = [Plan.read(d) for d in directories]
    for plan in plans:
        settings.allow_fail += [p for p in plan.settings.get("allow_fail", []) if p not in settings.allow_fail]
    planned: dict[str, tuple[CellSpec, str]] = {}
    for plan in plans:
        for cell in plan.cells:
            planned.setdefault(cell.cell_id, (cell, plan.keys[cell.cell_id]))
    found: dict[str, CellResult] = {}
    for directory in directories:
        for key, result in read_results(directory / RESULTS_FILE, warn).items():
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
    from kiln.compiler.matrix.results import STATUS_LABELS

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
