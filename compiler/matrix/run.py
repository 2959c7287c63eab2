"""Running a matrix: plan the cells (`kiln.compiler.matrix.plan`), skip finished and cached ones, run the rest in
limited processes (locally or as Ray tasks), stream results to `results.jsonl`, and write the reports."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.matrix.cell_cache import CellCache
from kiln.compiler.matrix.config import CellSpec, MatrixConfig
from kiln.compiler.matrix.executors import run_local, run_ray
from kiln.compiler.matrix.plan import CELLS_DIR, PLAN_FILE, Plan, RunSettings, plan_matrix, safe_name
from kiln.compiler.matrix.process import Job, identity, now
from kiln.compiler.matrix.reports import write_reports
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
from kiln.compiler.safe_fs import within, write_file


def run_matrix(config: MatrixConfig, settings: RunSettings, progress: Progress) -> tuple[dict[str, Any], int]:
    """Run this shard of the matrix (resuming and using the cache), write its reports; the report and exit code."""
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
