"""What a conversion matrix is: its models, targets, precisions and per-cell options, from TOML and flags."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.limits import MAX_COUNT, MAX_THREADS, accepts, check_count
from kiln.compiler.types import check_thresholds, is_finite_number

DEFAULT_TIMEOUT_S = 600.0
ROOT = Path(__file__).resolve().parent.parent.parent  # the directory holding compiler/, passes/, targets/


@dataclass(frozen=True)
class CellOptions:
    """Options of one cell: parity tolerances and inputs, the limits of its process, and whether it must pass."""

    atol: float | None = None
    rtol: float | None = None
    samples: int = 4
    dynamic_batch: str | None = None
    dynamic: tuple[str, ...] = ()  # --dynamic specs, e.g. ("seq=input_ids:1,attention_mask:1=8:64",)
    inputs: tuple[str, ...] = ()  # extra parity input files (.npz)
    timeout: float = DEFAULT_TIMEOUT_S  # wall-clock seconds before the cell's process group is killed
    memory_limit_gb: float | None = None  # address-space limit of the cell's process; None: physical RAM; 0: none
    expect: str = "pass"  # "pass", or "fail": a failure of this cell does not fail the run
    opt_level: int | None = None  # -O level of Kiln's passes (None: the default)
    calib: str | None = None  # calibration data for int8 (.npz or directory; None: the model's own samples)
    max_drop: float | None = None  # the accuracy budget of quantized precisions (with `metric`)
    metric: str | None = None  # file.py:fn measuring accuracy for max_drop
    min_cosine: float | None = None  # a stricter (or looser) parity cosine threshold
    localize: bool = True  # on a parity failure, find the first diverging module (kiln.compiler.diagnose.divergence)
    io: str | None = None  # --io of the export ("nhwc": image I/O channels-last)

    def export_settings(self) -> dict[str, Any]:
        """The options that reach the export itself, as keywords of `kiln.compiler.export.options.export_options`."""
        settings: dict[str, Any] = {
            "dynamic_batch": self.dynamic_batch,
            "dynamic": self.dynamic,
            "inputs": self.inputs,
            "atol": self.atol,
            "rtol": self.rtol,
            "samples": self.samples,
            "localize": None if self.localize else False,
        }
        optional = {"opt_level": self.opt_level, "calib": self.calib, "min_cosine": self.min_cosine, "io": self.io}
        if self.max_drop is not None:
            optional |= {"max_drop": self.max_drop, "metric": self.metric}
        return settings | {k: v for k, v in optional.items() if v is not None}

    def files(self) -> list[str]:
        """The files whose bytes decide the cell's result besides the model: parity inputs, calibration, metric."""
        metric = self.metric.rpartition(":")[0] if self.metric and ".py:" in self.metric else self.metric
        return [*self.inputs, *(f for f in (self.calib, metric) if f)]

    def merged(self, overrides: dict[str, Any], where: str) -> CellOptions:
        """These options with the keys of a config table applied; unknown keys are refused."""
        known = {f.name for f in fields(self)}
        aliases = {"timeout_s": "timeout", "memory_gb": "memory_limit_gb", "dynamic-batch": "dynamic_batch"}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            name = aliases.get(key, key)
            if name not in known:
                raise UsageError(f"{where}: unknown option '{key}'", f"cell options are: {', '.join(sorted(known))}")
            values[name] = tuple(value) if name in ("inputs", "dynamic") and isinstance(value, list) else value
        for name, value in values.items():
            valid, meaning = OPTION_CHECKS[name]
            if not valid(value):
                raise UsageError(f"{where}: {name} = {value!r} is not valid", f"{name} must be {meaning}")
        return replace(self, **values)


OPTION_CHECKS: dict[str, tuple[Any, str]] = {
    "atol": (lambda v: accepts(check_thresholds, atol=v), "a finite number >= 0"),
    "rtol": (lambda v: accepts(check_thresholds, rtol=v), "a finite number >= 0"),
    "samples": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "dynamic_batch": (lambda v: isinstance(v, str), 'a string "MIN:MAX"'),
    "dynamic": (lambda v: isinstance(v, tuple) and all(isinstance(p, str) for p in v), 'a list of "NAME:AXIS=MIN:MAX"'),
    "inputs": (lambda v: isinstance(v, tuple) and all(isinstance(p, str) for p in v), "a list of .npz paths"),
    "timeout": (lambda v: is_finite_number(v) and v > 0, "a number of seconds > 0"),
    "memory_limit_gb": (lambda v: is_finite_number(v) and v >= 0, "a number of GiB >= 0 (0: no limit)"),
    "expect": (lambda v: v in ("pass", "fail"), '"pass" or "fail"'),
    "opt_level": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 3, "a whole number 0..3"),
    "calib": (lambda v: isinstance(v, str), "a path (.npz or a directory)"),
    "max_drop": (lambda v: accepts(check_thresholds, max_drop=v), "a finite number >= 0"),
    "metric": (lambda v: isinstance(v, str) and ":" in v, "file.py:function"),
    "min_cosine": (lambda v: accepts(check_thresholds, min_cosine=v), "a number from 0 to 1"),
    "localize": (lambda v: isinstance(v, bool), "true or false"),
    "io": (lambda v: v == "nhwc", '"nhwc" (channels-last image I/O; the only --io option)'),
}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the matrix, with the targets, precisions and options it overrides."""

    source: str
    name: str
    targets: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None
    files: tuple[str, ...] = ()  # more files whose bytes are part of the model (weights), for the cache key
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CellRule:
    """Options for every cell whose id (`model/target/precision`) matches a glob pattern."""

    match: str
    options: dict[str, Any]


@dataclass(frozen=True)
class CellSpec:
    """One cell of the matrix: a model source on one target at one precision, with its options."""

    model: str  # the model source, as `kiln export` takes it
    name: str  # the model's row name in reports
    target: str  # canonical target name
    precision: str
    options: CellOptions
    gpu: bool = False  # the target needs a GPU (Ray asks for one)
    fingerprint: str = ""  # sha256 of what defines the model (its source file, weights files)
    not_applicable: str | None = None  # why this target cannot take this source at all

    @property
    def cell_id(self) -> str:
        """`model/target/precision`, unique in a matrix."""
        return f"{self.name}/{self.target}/{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellSpec:
        """Inverse of `to_dict`."""
        options = dict(data["options"])
        options["inputs"] = tuple(options.get("inputs", ()))
        return cls(**{**data, "options": CellOptions(**options)})


@dataclass
class MatrixConfig:
    """A whole matrix: models, targets, precisions, option defaults and rules, and the run's settings."""

    models: list[ModelEntry]
    targets: list[str] = field(default_factory=lambda: ["all"])
    precisions: list[str] = field(default_factory=lambda: ["default"])  # "default": each target's own
    defaults: CellOptions = field(default_factory=CellOptions)
    rules: list[CellRule] = field(default_factory=list)
    allow_fail: list[str] = field(default_factory=list)
    jobs: int = 1
    threads: int = 2
    repeat: int = 20
    warmup: int = 3

    def cells(self) -> list[CellSpec]:
        """Every cell, sorted by id: each model on each of its targets at each precision that target has."""
        from kiln.targets import TARGETS, get_target

        cells: list[CellSpec] = []
        for model in self.models:
            names = model.targets or tuple(self.targets)
            chosen = list(TARGETS) if "all" in names else list(dict.fromkeys(get_target(n) for n in names))
            wanted = model.precisions or tuple(self.precisions)
            fingerprint = model_fingerprint(model)
            for target in chosen:
                asked = dict.fromkeys(target.default_precision if p == "default" else p for p in wanted)
                precisions = target.precisions if "all" in wanted else [p for p in asked if p in target.precisions]
                for precision in precisions:
                    cell = CellSpec(
                        model=model.source,
                        name=model.name,
                        target=target.name,
                        precision=precision,
                        options=self.defaults.merged(model.options, f"model {model.name}"),
                        gpu=target.needs_gpu,
                        fingerprint=fingerprint,
                        not_applicable=(
                            f"{target.name} needs a PyTorch model, but {model.source} is ONNX"
                            if model.source.endswith(".onnx") and target.consumes != "onnx"
                            else None
                        ),
                    )
                    for rule in self.rules:
                        if matches(cell.cell_id, [rule.match]):
                            cell = replace(cell, options=cell.options.merged(rule.options, f"cells '{rule.match}'"))
                    cells.append(cell)
        if not cells:
            raise UsageError(
                "the matrix has no cells: no target has the precisions asked for",
                "check --targets and --precisions (kiln targets lists each target's precisions)",
            )
        ids = [c.cell_id for c in cells]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise UsageError(
                f"two models share the name of cell {duplicates[0]}", 'give one of them another name = "..."'
            )
        return sorted(cells, key=lambda c: c.cell_id)


def matches(cell_id: str, patterns: list[str]) -> bool:
    """Whether `model/target/precision` matches one of the glob patterns (`model/target` means any precision)."""
    for pattern in patterns:
        full = pattern if pattern.count("/") >= 2 else pattern + "/*" * (2 - pattern.count("/"))
        if fnmatch.fnmatchcase(cell_id, full):
            return True
    return False


def load_config(path: Path | None, overrides: dict[str, Any]) -> MatrixConfig:
    """The matrix of a TOML file (or the defaults) with command-line overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist", "check the path given to --config") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}", "fix the TOML syntax") from None
    data |= {k: v for k, v in overrides.items() if v is not None}
    known = {"models", "targets", "precisions", "defaults", "cells", "allow_fail", "jobs", "threads", "repeat",
             "warmup", *(f.name for f in fields(CellOptions))}  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"unknown key '{unknown[0]}' in the matrix config", f"known keys: {', '.join(sorted(known))}")
    top_options = {k: data[k] for k in (f.name for f in fields(CellOptions)) if k in data}
    defaults = CellOptions().merged(dict(data.get("defaults", {})) | top_options, "defaults")
    config = MatrixConfig(
        models=_models(data.get("models", ["zoo:all"])),
        targets=_names(data.get("targets", "all"), "targets"),
        precisions=_names(data.get("precisions", "default"), "precisions"),
        defaults=defaults,
        rules=[_rule(r) for r in data.get("cells", [])],
        allow_fail=_names(data.get("allow_fail", []), "allow_fail"),
        jobs=_positive(data.get("jobs", 1), "jobs"),
        threads=_positive(data.get("threads", 2), "threads"),
        repeat=_positive(data.get("repeat", 20), "repeat"),
        warmup=_positive(data.get("warmup", 3), "warmup", minimum=0),
    )
    return config


def _names(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"'{key}' must be a comma list or a list of strings", f'write {key} = ["...", "..."]')
    return [v.strip() for v in value if v.strip()]


def _positive(value: Any, key: str, minimum: int = 1) -> int:
    check_count(key, value, minimum, MAX_THREADS if key == "threads" else MAX_COUNT)  # the CLI's one check
    return int(value)


def _rule(table: Any) -> CellRule:
    if not isinstance(table, dict) or not isinstance(table.get("match"), str):
        raise UsageError('each [[cells]] table needs match = "model/target/precision"', "globs such as */tpu/* work")
    options = {k: v for k, v in table.items() if k != "match"}
    CellOptions().merged(options, f"cells '{table['match']}'")  # refuse unknown keys now
    return CellRule(table["match"], options)


def _models(value: Any) -> list[ModelEntry]:
    """Model entries from a comma list, a list of sources, or a list of tables with `source`."""
    items = _names(value, "models") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UsageError("'models' must be a list", 'write models = ["zoo:all", "my_model.py:build"]')
    entries: list[ModelEntry] = []
    for item in items:
        table = {"source": item} if isinstance(item, str) else item
        if not isinstance(table, dict) or not isinstance(table.get("source"), str):
            raise UsageError(f"model entry {item!r} has no source", 'write source = "zoo:cnn" (or file.py:factory)')
        source = table["source"].strip()
        rest = {k: v for k, v in table.items() if k not in ("source", "name", "targets", "precisions", "files")}
        CellOptions().merged(rest, f"model {source}")  # refuse unknown keys now
        sources = _zoo_names() if source == "zoo:all" else [source]
        for one in sources:
            zoo_name = one.removeprefix("zoo:")
            if one.startswith("zoo:") and zoo_name not in _zoo_names_bare():
                raise UsageError(f"no built-in model '{zoo_name}'", f"choose one of: {', '.join(_zoo_names_bare())}")
            entries.append(
                ModelEntry(
                    source=one,
                    name=str(table.get("name") or model_name(one)) if source != "zoo:all" else model_name(one),
                    targets=tuple(_names(table["targets"], "targets")) if "targets" in table else None,
                    precisions=tuple(_names(table["precisions"], "precisions")) if "precisions" in table else None,
                    files=tuple(_names(table.get("files", []), "files")),
                    options=rest,
                )
            )
    if not entries:
        raise UsageError("the matrix has no models", "pass --models zoo:all or list models in the config")
    return entries


def _zoo_names_bare() -> list[str]:
    from kiln.compiler.capture.zoo import ZOO

    return list(ZOO)


def _zoo_names() -> list[str]:
    return [f"zoo:{name}" for name in _zoo_names_bare()]


def model_name(source: str) -> str:
    """The row name of a model source: the zoo name, the factory's name, or the file's stem."""
    if source.startswith("zoo:"):
        return source.removeprefix("zoo:")
    path, factory = _split_source(source)
    return factory or Path(path).stem


def _split_source(source: str) -> tuple[str, str]:
    """(file, factory) of `file.py:factory`; (file, "") of `.pt2` and `.onnx` sources."""
    path, separator, factory = source.rpartition(":")
    return (path, factory) if separator and path.endswith(".py") else (source, "")


def model_fingerprint(model: ModelEntry) -> str:
    """sha256 of what defines a model without running it: its source file (the zoo's module for `zoo:`),
    the zoo name or factory, and the bytes of the extra `files`. A missing file hashes as missing."""
    digest = hashlib.sha256(model.source.encode())
    if model.source.startswith("zoo:"):
        paths = [ROOT / "compiler" / "capture" / "zoo.py"]
    else:
        paths = [Path(_split_source(model.source)[0])]
    for path in [*paths, *(Path(f) for f in model.files)]:
        digest.update(str(path).encode())
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()


def kiln_code_hash() -> str:
    """sha256 of Kiln's own code (compiler/, passes/, targets/): a change to it invalidates cached cells."""
    digest = hashlib.sha256()
    for package in ("compiler", "passes", "targets"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def toolchain(target: str) -> dict[str, str]:
    """Versions of Python, torch, ONNX and the target's packages, without importing them."""
    from kiln.compiler.host import versions
    from kiln.targets import get_target

    return versions(*get_target(target).requires.values())


def cell_key(cell: CellSpec, run: dict[str, Any], code_hash: str, host: dict[str, Any]) -> str:
    """The key of a cell's result: what it ran, on which toolchain, host and settings. Equal keys, equal result
    (but for timings): resume and the cache skip a cell whose key they already hold."""
    payload = {
        "cell": cell.to_dict() | {"options": asdict(replace(cell.options, expect="pass"))},
        "run": run,
        "kiln": code_hash,
        "toolchain": toolchain(cell.target),
        "host": {"cpu": host.get("cpu"), "flags": host.get("cpu_flags"), "machine": host.get("machine")},
        "inputs": [_file_digest(Path(p)) for p in cell.options.files()],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def physical_memory_gb() -> float:
    """This machine's RAM in GiB (the default address-space limit of a cell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 16.0
