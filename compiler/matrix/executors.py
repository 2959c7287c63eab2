"""Executors: run a list of jobs, each in its own cell process, locally (a few at a time) or as Ray tasks, and
hand each result to `on_done` as it ends (in the calling thread)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from kiln.compiler.errors import MissingBackendError, UsageError, error_text
from kiln.compiler.matrix.process import Job, identity, kill_live_cells, now, run_job
from kiln.compiler.matrix.results import CONVERSION_FAILED, UNAVAILABLE, CellResult


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
    if not ray.is_initialized():  # its workers import the installed `kiln` (pip install 'kiln[ray]' on each node)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
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
        task = remote.options(num_cpus=1, num_gpus=1 if job.cell.gpu else 0, max_retries=0)
        refs[task.remote(job.payload(), keep_artifacts)] = job
    _collect_ray(ray, refs, on_done)


def _collect_ray(ray: Any, refs: dict[Any, Job], on_done: Callable[[CellResult], None]) -> None:
    """Hand each Ray task's result to `on_done` as it ends (a failed task is a crashed cell); cancel the rest on
    an interrupt."""
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    result = CellResult.from_dict(ray.get(ref))
                except Exception as exc:  # the Ray task itself failed (worker lost, node died)
                    reason = f"ray task failed: {error_text(exc)}"
                    result = identity(job.cell, job.key, status=CONVERSION_FAILED, failure="crash", reason=reason)
                on_done(result)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
