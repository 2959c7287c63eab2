"""One matrix cell in its own process: `python -m kiln.compiler.matrix.cell JOB.json RESULT.json`.

The process exports the model to the cell's target (the normal pipeline, parity gate included), then times
the artifact and the reference on the example inputs with the same number of threads. It writes what it
found to RESULT.json and exits with `kiln export`'s codes (0 passed, 1 parity failed, 2 bad input or
unsupported, 3 unavailable here, 4 internal error). A crash, a hang or running out of memory leaves no
RESULT.json: the parent process reports those from the exit status and the captured output.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kiln.compiler.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, KilnError, error_text
from kiln.compiler.host import this_machine
from kiln.compiler.matrix.config import CellSpec
from kiln.compiler.matrix.results import CONVERSION_FAILED, PARITY_FAILED, PASSED, UNAVAILABLE


def main(argv: list[str] | None = None) -> int:
    """Run the cell described by JOB.json and write RESULT.json; returns the exit code."""
    job_path, result_path = argv if argv is not None else sys.argv[1:]
    job = json.loads(Path(job_path).read_text())
    _limit_memory(job.get("memory_bytes"))
    _die_with_parent(int(job["parent_pid"]))
    outcome, code = run_cell(job)
    outcome["host"] = this_machine()  # with Ray, the node that built it; `kiln tune` says where it was built
    partial = Path(result_path).with_suffix(".partial")
    partial.write_text(json.dumps(outcome, default=str))
    os.replace(partial, result_path)
    return code


def run_cell(job: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Export, validate and time one cell; its outcome (fields of CellResult) and exit code."""
    from kiln.targets import get_target

    cell = CellSpec.from_dict(job["cell"])
    target = get_target(cell.target)
    reason = target.unavailable_reason()
    if reason:
        return {"status": UNAVAILABLE, "reason": f"{target.name} is not available here: {reason}"}, 3
    try:
        return _export_and_time(cell, job)
    except KilnError as error:
        status = UNAVAILABLE if error.exit_code == 3 else CONVERSION_FAILED
        failure = "out_of_memory" if "MemoryError" in error.message else "error"
        print(f"kiln: error: {error.one_line()}", file=sys.stderr)
        return {"status": status, "reason": error.one_line(), "failure": failure if status != UNAVAILABLE else None}, (
            error.exit_code
        )
    except MemoryError:
        traceback.print_exc()
        return {"status": CONVERSION_FAILED, "reason": "ran out of memory (MemoryError)", "failure": "out_of_memory"}, (
            EXIT_INTERNAL
        )
    except KeyboardInterrupt:
        return {"status": CONVERSION_FAILED, "reason": "interrupted", "failure": "interrupted"}, EXIT_INTERRUPTED
    except Exception as error:
        traceback.print_exc()
        reason = f"internal error: {error_text(error)}"
        return {"status": CONVERSION_FAILED, "reason": reason, "failure": "internal"}, EXIT_INTERNAL


def _export_and_time(cell: CellSpec, job: dict[str, Any]) -> tuple[dict[str, Any], int]:
    import torch
    from kiln.compiler.diagnose.divergence_record import DIVERGENCE_FILE
    from kiln.compiler.export.manifest import manifest_figures
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.progress import Progress, quiet_libraries

    quiet_libraries()
    threads = int(job["threads"])
    torch.set_num_threads(threads)
    settings = export_options(precision=cell.precision, force=True, **cell.options.export_settings())
    progress = Progress(stream=sys.stderr)
    started = time.perf_counter()
    (result,) = export_targets(cell.model, cell.target, Path(job["export_dir"]), settings, progress=progress)
    outcome: dict[str, Any] = {"export_s": round(time.perf_counter() - started, 3), "stages": dict(progress.timings)}
    manifest = result.manifest
    assert manifest is not None and manifest.parity is not None  # one target: a failure raises
    parity = manifest.parity
    outcome |= manifest_figures(manifest) | {
        "status": PASSED if parity.passed else PARITY_FAILED,
        "reason": "" if parity.passed else "; ".join(o.summary() for o in parity.failures())[:500],
        "outputs": [asdict(o) for o in parity.outputs],
        "tolerance": asdict(parity.tolerance),
        "reference": parity.reference,
        "runtime": parity.runtime,
        "state_hash": manifest.source.get("state_hash"),
        "versions": manifest.versions,
        "notes": list(manifest.notes),
        "threads": threads,
    }
    record = result.directory / DIVERGENCE_FILE
    if record.is_file() and parity.divergence:
        outcome["divergence"] = str(record.relative_to(Path(job["export_dir"])))
        outcome["divergence_summary"] = str(parity.divergence.get("summary", ""))
    try:
        outcome |= _latency(cell, result.directory, threads, int(job["repeat"]), int(job["warmup"]))
    except Exception as error:  # the verdict stands; say why there is no latency
        traceback.print_exc()
        outcome["notes"].append(f"latency not measured: {error_text(error, 200)}")
    return outcome, 0 if parity.passed else 1


def _latency(cell: CellSpec, directory: Path, threads: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Median latency of the artifact and of the reference on the first parity input set (the example)."""
    from kiln.compiler.capture.sources import load_source
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.parity.gate import ParitySamples
    from kiln.compiler.parity.reference import reference_runner
    from kiln.compiler.perf.timing import BenchSettings, bench, least_disturbed

    artifact = Artifact.read(directory)
    samples = ParitySamples.load(directory, [])
    if samples is None:
        raise RuntimeError("the export stored no parity inputs to time it on")
    feeds = samples.inputs[0]
    timed = bench(artifact, feeds, BenchSettings(threads, repeat, warmup))
    reference = reference_runner(load_source(cell.model), artifact.manifest.inputs, artifact.manifest.outputs, threads)
    eager = least_disturbed(lambda: reference(feeds), repeat, warmup)
    latency = timed.latency
    return {
        "latency_ms": latency.median_ms,
        "reference_ms": eager.median_ms,
        "speedup": eager.median_ms / latency.median_ms if latency.median_ms > 0 else None,
        "latency_noisy": latency.noisy or eager.noisy,
        "latency_batches": latency.batches + eager.batches,
        "load_average": round(os.getloadavg()[0], 2),
    }


def _limit_memory(limit: int | None) -> None:
    """Cap this process's address space, so that a runaway converter fails here and not the machine."""
    if not limit:
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the matrix process dies, even by SIGKILL, so that no cell outlives its run."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
