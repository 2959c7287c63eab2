"""The result of one matrix cell, and `results.jsonl`, the file each finished cell is appended to."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from compiler.types import _json_safe

PASSED = "passed"
PARITY_FAILED = "parity_failed"
CONVERSION_FAILED = "conversion_failed"
UNAVAILABLE = "unavailable"
NOT_RUN = "not_run"  # in a merged report: planned, but no shard reported it

STATUS_LABELS = {
    PASSED: "passed",
    PARITY_FAILED: "converted, parity failed",
    CONVERSION_FAILED: "conversion failed",
    UNAVAILABLE: "unavailable here",
    NOT_RUN: "not run",
}
FAILED_STATUSES = (PARITY_FAILED, CONVERSION_FAILED, NOT_RUN)

# Fields that differ from run to run of the same cell (timings, clocks, where and how it ran).
VOLATILE_FIELDS = (
    "latency_ms",
    "reference_ms",
    "speedup",
    "latency_noisy",
    "latency_batches",
    "load_average",
    "export_s",
    "stages",
    "duration_s",
    "started_at",
    "finished_at",
    "cached",
    "shard",
    "cell_dir",
    "stderr_tail",
)
RESULTS_FILE = "results.jsonl"


@dataclass
class CellResult:
    """How one cell ended: its status and why, parity figures, artifact size and latency vs the reference."""

    cell_id: str
    model: str  # the model's row name
    source: str  # the model source
    target: str
    precision: str
    status: str
    reason: str = ""  # one line: why it failed or is unavailable
    failure: str | None = None  # error | crash | timeout | out_of_memory | internal | interrupted
    exit_code: int | None = None  # of the cell's process (negative: killed by that signal)
    stderr_tail: str = ""  # the end of the cell's output, for failures
    max_abs_error: float | None = None  # worst over outputs and parity input sets
    max_rel_error: float | None = None
    min_cosine: float | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)  # per output: the parity metrics
    tolerance: dict[str, Any] | None = None
    reference: str | None = None  # what parity and the speed-up compare against
    artifact_bytes: int | None = None  # the artifact's files, without the parity samples and the manifest
    latency_ms: float | None = None  # median run of the artifact on the example inputs
    reference_ms: float | None = None  # the same for the reference (PyTorch eager; ONNX Runtime for .onnx)
    speedup: float | None = None  # reference_ms / latency_ms: above 1, the artifact is faster
    latency_noisy: bool = False  # other processes disturbed the timed runs
    latency_batches: int | None = None
    load_average: float | None = None  # the machine's 1-minute load average when the timing ended
    threads: int | None = None
    runtime: dict[str, Any] = field(default_factory=dict)  # what the artifact's runtime used
    export_s: float | None = None  # wall time of the export (capture, passes, build, validate)
    stages: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None  # wall time of the whole cell, process start included
    state_hash: str | None = None  # sha256 of the model's weights
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    key: str = ""  # what resume and the cache match on
    cached: bool = False  # taken from the cache of an earlier run
    shard: str = ""  # "I/N" of the run that produced it
    started_at: str = ""
    finished_at: str = ""
    cell_dir: str = ""

    @property
    def failed(self) -> bool:
        """Whether the cell failed (parity, conversion, or never ran); an unavailable target is no failure."""
        return self.status in FAILED_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data (non-finite floats become strings)."""
        return _json_safe(asdict(self))

    def comparable(self) -> dict[str, Any]:
        """The fields that a re-run of the same cell reproduces (no timings, clocks or places)."""
        return {k: v for k, v in self.to_dict().items() if k not in VOLATILE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        """Inverse of `to_dict`; unknown keys (a newer schema) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def append_result(path: Path, result: CellResult) -> None:
    """Append one result as a line and make it durable, so that a killed run keeps every finished cell."""
    line = json.dumps(result.to_dict(), sort_keys=True) + "\n"
    with path.open("a") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_results(path: Path) -> dict[str, CellResult]:
    """The results in a results.jsonl by key, the last line of a key winning; a torn last line is skipped."""
    found: dict[str, CellResult] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            result = CellResult.from_dict(json.loads(line))
        except (ValueError, TypeError):
            continue  # a line cut short by a kill
        found[result.key] = result
    return found
