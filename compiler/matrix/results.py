"""The result of one matrix cell, and `results.jsonl`, the file each finished cell is appended to."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.safe_fs import open_file, read_bytes
from kiln.compiler.types import json_safe

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
    "host",
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
    host: dict[str, Any] = field(
        default_factory=dict
    )  # the machine that ran the cell (`kiln.compiler.host.this_machine`)
    divergence: str = ""  # the divergence record of a parity failure (divergence.json), relative to the run's out
    divergence_summary: str = ""  # its one line: the first diverging module

    @property
    def failed(self) -> bool:
        """Whether the cell failed (parity, conversion, or never ran); an unavailable target is no failure."""
        return self.status in FAILED_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data (non-finite floats become strings)."""
        return json_safe(asdict(self))

    def comparable(self) -> dict[str, Any]:
        """The fields that a re-run of the same cell reproduces (no timings, clocks or places)."""
        return {k: v for k, v in self.to_dict().items() if k not in VOLATILE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        """Inverse of `to_dict`; unknown keys (a newer schema) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def parse(cls, data: Any) -> CellResult:
        """A result read from a file that may be cut short, edited by hand or forged: checked field by field.

        Raises ValueError (one line: what is wrong) for something that is not an object, a missing required
        field, a field of the wrong type or an unknown status. Of the containers (outputs, stages, ...) only their
        own type is checked: nothing formats their contents. Unknown keys (a newer schema) are ignored; "inf",
        "-inf" and "nan" in number fields (how `to_dict` writes them) become floats again.
        """
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but a {type(data).__name__}")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        values: dict[str, Any] = {}
        for name, check in _FIELD_CHECKS.items():
            if name in data:
                value = data[name]
                if not check(value):
                    raise ValueError(f"{name} = {_short(value)} is not {_CHECKS[_FIELD_TYPES[name]][1]}")
                restore = isinstance(value, str) and _FIELD_TYPES[name] == "float | None"  # "nan", "inf", "-inf"
                values[name] = float(value) if restore else value
        if values["status"] not in STATUS_LABELS:
            raise ValueError(f"unknown status {_short(values['status'])}")
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_NON_FINITE = ("inf", "-inf", "nan")
# Each annotation of CellResult's fields: the check of a value read from a file, and what it must be. A field
# whose annotation is missing here fails at import, so that a new field gets a check.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int | None": (lambda v: v is None or _is_int(v), "a whole number or null"),
    "float | None": (
        lambda v: v is None or _is_float(v) or (isinstance(v, str) and v in _NON_FINITE),
        "a number or null",
    ),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list[dict[str, Any]]": (lambda v: isinstance(v, list), "a list"),
    "list[str]": (lambda v: isinstance(v, list), "a list"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
    "dict[str, Any] | None": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "dict[str, float]": (lambda v: isinstance(v, dict), "an object"),
    "dict[str, str]": (lambda v: isinstance(v, dict), "an object"),
}
_FIELD_TYPES = {f.name: str(f.type) for f in fields(CellResult)}
_FIELD_CHECKS = {name: _CHECKS[annotation][0] for name, annotation in _FIELD_TYPES.items()}
_REQUIRED = [f.name for f in fields(CellResult) if f.default is MISSING and f.default_factory is MISSING]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def append_result(path: Path, result: CellResult) -> None:
    """Append one result as a line and make it durable, so that a killed run keeps every finished cell.

    The whole line, newline included, goes in one `write` to a file opened O_APPEND, then fsync: a kill
    mid-write can leave at most a partial last line, which `repair_results` drops before the next run appends.
    """
    view = memoryview((json.dumps(result.to_dict(), sort_keys=True) + "\n").encode())
    fd = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # a link there is refused, not followed
    try:
        while view:  # a regular file takes it in one write; a short one (a signal, a full disk) goes on from there
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_results(path: Path, warn: Callable[[str], None]) -> None:
    """Make a results.jsonl safe to append to: a last line without its newline (a run killed while writing it)
    gets its newline if it is a whole result, else is cut off, with a warning naming the cell that runs again."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}", "check the --out directory") from None
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    last = data[start:]
    try:
        CellResult.parse(json.loads(last))
        fixed = False
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        fixed = True
    with os.fdopen(open_file(path, os.O_RDWR), "r+b") as handle:
        if fixed:
            handle.truncate(start)
        else:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    if fixed:
        cell_id = _cell_of(last.decode("utf-8", errors="replace"))
        cell = f"cell {cell_id}" if cell_id else "its cell"
        warn(f"{path}: its last line was cut short (a run killed while writing it); dropped it: {cell} will run again")


def read_results(path: Path, warn: Callable[[str], None] | None = None) -> dict[str, CellResult]:
    """The results in a results.jsonl by key, the last line of a key winning. A line that is not a whole,
    well-formed result (cut short by a kill, edited by hand) is ignored, with a warning through `warn`."""
    found: dict[str, CellResult] = {}
    if not path.is_file():
        return found
    try:
        text = read_bytes(path).decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}", "check the directory") from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}" + (f" (cell {cell_id})" if (cell_id := _cell_of(line)) else "")
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            if warn is not None:
                warn(f"{where}: not a whole JSON line; ignored it")
            continue
        try:
            result = CellResult.parse(data)
        except ValueError as exc:
            if warn is not None:
                warn(f"{where}: not a cell result: {exc}; ignored it")
            continue
        found[result.key] = result
    return found


def _cell_of(text: str) -> str:
    """The id of the cell that a (possibly partial) JSON line names; "" when it names none."""
    match = re.search(r'"cell_id": "([^"\\]{1,200})"', text)
    return match[1] if match else ""
