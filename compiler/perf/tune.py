"""`kiln tune`: build every candidate (target x precision, plus the plain -O0 export, NHWC image I/O and a dynamic
batch: `kiln.compiler.perf.tune_candidates`), keep those the parity gate (and, for quantized ones, the accuracy budget)
passes, time them with their runtime settings the way `kiln bench` does, all at one batch (`--batch`, default the
example's), and publish the winner to `DIR/best/` with a leaderboard.

The builds are cells of a `kiln matrix` run in `DIR/builds` (`kiln.compiler.matrix`: each in its own limited process;
results.jsonl is the resume log, so a killed tune resumes and an unchanged candidate is not rebuilt). Runtime
settings (`kiln.targets.base.RuntimeSettings`: ONNX Runtime's graph optimization level, OpenVINO's performance hint and
inference precision) and thread counts share one build and are timed as separate candidates, in the same
interleaved rounds (`kiln.compiler.perf.benchmark.time_candidates`). The ranking and the tie rule are in
`kiln.compiler.perf.tune_report`, the leaderboards in `kiln.compiler.perf.leaderboard`. Building here and timing on
the deployment machine (`--build-only`, `--time-only`, a moved DIR) is `kiln.compiler.perf.tune_deploy`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.perf.bench_worker import ROUND_TIMEOUT_S
from kiln.compiler.perf.leaderboard import write_leaderboards
from kiln.compiler.perf.tune_candidates import PLAIN, Entry, Plan, Variant, check_batch, check_io
from kiln.compiler.perf.tune_files import (
    BEST_DIR,
    BUILDS_DIR,
    check_build,
    locate_builds,
    provenance,
    save_builds,
    tune_directory,
    withdraw_best,
)
from kiln.compiler.perf.tune_report import publish, rank

if TYPE_CHECKING:
    from kiln.compiler.matrix.results import CellResult
    from kiln.compiler.progress import Progress
    from kiln.targets.base import Target

OBJECTIVES = ("latency", "throughput", "size")
DEFAULT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Each candidate's timed runs in a round last at least this long (more runs for a fast model): with ten runs of
# a 0.1 ms model a round is one scheduler tick, and tune ranked a tiny model's candidates by their stalls.
MIN_ROUND_MS = 50.0


def default_targets() -> tuple[str, ...]:
    """What `kiln tune` builds without --targets: the targets that say so (`Target.tuned_by_default`)."""
    from kiln.targets import TARGETS

    return tuple(t.name for t in TARGETS if t.tuned_by_default)


@dataclass(frozen=True)
class TuneOptions:
    """What `kiln tune` was asked."""

    targets: tuple[str, ...] = field(default_factory=default_targets)
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    objective: str = "latency"
    threads: tuple[int, ...] = ()  # thread counts to time each candidate at (empty: each runtime's default)
    min_cosine: float | None = None
    max_drop: float | None = None
    metric: str | None = None
    calib: str | None = None
    plain: bool = True  # also build the plain -O0 fp32 export of each target
    runtime_search: bool = True  # also time each build with its target's runtime settings
    rounds: int = 5
    runs: int = 10
    warmup: int = 3
    executor: str = "local"
    timeout_s: float = 600.0
    build_only: bool = False  # build and verify, time nothing, publish no best/ (`kiln.compiler.perf.tune_deploy`)
    io: tuple[str, ...] | None = None  # layouts to build ("nchw", "nhwc"); None: NHWC at fp32 only, for images
    batch: int | None = None  # the batch every candidate is timed at (None: the example's)
    round_timeout_s: float = ROUND_TIMEOUT_S  # a timing worker silent this long in a round is killed: candidate failed
    force: bool = False  # tune into a directory that is not a tune directory; replace a best/ not proven tune's
    wait: bool = False  # queue behind another Kiln run into the same --out instead of failing

    def check(self) -> None:
        """A one-line UsageError for a value that makes no sense: the thresholds as `kiln export` checks them
        (`kiln.compiler.types.check_thresholds`), the counts and durations as `kiln bench` does
        (`kiln.compiler.limits`)."""
        from kiln.compiler.limits import check_count, check_seconds, check_threads
        from kiln.compiler.types import check_thresholds

        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r} is unknown", f"use one of: {', '.join(OBJECTIVES)}")
        check_thresholds(min_cosine=self.min_cosine, max_drop=self.max_drop)
        if self.metric is not None and self.max_drop is None:
            raise UsageError("--metric is only used with --max-drop", "add --max-drop X, or drop --metric")
        for flag, value, least in (("--rounds", self.rounds, 1), ("--runs", self.runs, 1),
                                   ("--warmup", self.warmup, 0)):  # fmt: skip
            check_count(flag, value, least)
        for threads in self.threads:
            check_threads("--threads", threads)
        check_seconds("--round-timeout", self.round_timeout_s)
        if not self.targets or not self.precisions:
            raise UsageError("no candidates: --targets and --precisions must each name at least one", "e.g. onnx,fp32")
        if self.executor not in ("local", "ray"):
            raise UsageError(f"--executor {self.executor!r} is unknown", "use local or ray")
        if self.io is not None:
            check_io(self.io)
        check_batch(self.batch)


def parse_list(text: str | None, default: Sequence[str], flag: str) -> tuple[str, ...]:
    """A comma list (None: the default)."""
    if text is None:
        return tuple(default)
    items = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    if not items:
        raise UsageError(f"{flag} {text!r} names nothing", f"e.g. {flag} {','.join(default)}")
    return items


def parse_threads(text: str | None) -> tuple[int, ...]:
    """`--threads 2` or `--threads 1,2` (None: each runtime's default)."""
    if text is None:
        return ()
    try:
        return tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise UsageError(
            f"--threads {text!r} is not a whole number or a comma list of them", "e.g. --threads 2"
        ) from None


def plan(source: str, options: TuneOptions) -> Plan:
    """The matrix of builds for `source`: each target x each precision it has (the others listed as skipped), the
    variants `kiln.compiler.perf.tune_candidates` plans (NHWC, dynamic batch, the plain -O0 fp32 export) on the targets
    that
    take them, the thresholds and the accuracy budget of quantized precisions."""
    from kiln.compiler.matrix.config import CellRule, MatrixConfig, ModelEntry, model_name
    from kiln.compiler.perf.tune_candidates import Asked, for_targets, probe, variants
    from kiln.targets import get_target

    targets = list(dict.fromkeys(get_target(t) for t in options.targets))
    skipped: list[dict[str, str]] = []
    chosen: list[Target] = []
    for target in targets:
        reason = target.unavailable_reason() or target.limitation()
        if reason:
            skipped.append({"target": target.name, "precision": "*", "reason": f"not available here: {reason}"})
            continue
        chosen.append(target)
        for precision in options.precisions:
            if precision not in target.precisions:
                why = f"{target.name} has no {precision} (it has {', '.join(target.precisions)})"
                skipped.append({"target": target.name, "precision": precision, "reason": why})
    if not any(p in t.precisions for t in chosen for p in options.precisions):
        raise UsageError(
            f"no candidates: none of the targets {','.join(options.targets)} has any of the precisions "
            f"{','.join(options.precisions)} here",
            "check --targets and --precisions (kiln targets lists each target's precisions)",
        )
    common, quantized = _cell_options(options)
    name = model_name(source)
    source = absolute_source(source)
    shape = probe(source)
    asked = Asked(options.precisions, options.io, options.batch, options.objective, options.plain)
    builds, more = variants(asked, shape)
    skipped += more
    batch = options.batch if options.batch is not None else shape.batch
    models = [
        ModelEntry(source, name + variant.suffix, targets=able, precisions=variant.precisions,
                   options=common | variant.export_options())
        for variant, able in for_targets(builds, chosen, options.precisions, batch, skipped)
    ]  # fmt: skip
    config = MatrixConfig(
        models=models,
        targets=[t.name for t in chosen],
        precisions=list(options.precisions),
        rules=[CellRule("*/*/int8*", quantized)] if quantized else [],
        threads=max(options.threads, default=2),
        repeat=3,
        warmup=1,
    )
    config.cells()  # refuses what cannot be planned now
    return Plan(config, skipped, {name + v.suffix: v for v in builds}, batch)


def _cell_options(options: TuneOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cell options of every build (timeout, thresholds) and those of the quantized ones (calibration data,
    accuracy budget)."""
    common: dict[str, Any] = {"timeout": options.timeout_s}
    if options.min_cosine is not None:
        common["min_cosine"] = options.min_cosine
    quantized: dict[str, Any] = {}
    if options.calib is not None:
        quantized["calib"] = _existing(options.calib, "--calib")
    if options.max_drop is not None:
        quantized["max_drop"] = options.max_drop
        if options.metric is not None:
            file, _, function = options.metric.rpartition(":")
            quantized["metric"] = f"{_existing(file, '--metric')}:{function}"
    return common, quantized


def absolute_source(source: str) -> str:
    """A file source with its path made absolute (the builds run in other processes, maybe elsewhere); a missing
    file is a UsageError now, not one per candidate."""
    if source.startswith("zoo:"):
        from kiln.compiler.capture.zoo import ZOO

        if source.removeprefix("zoo:") not in ZOO:
            raise UsageError(f"no built-in model {source!r}", f"choose one of: {', '.join(f'zoo:{n}' for n in ZOO)}")
        return source
    path, separator, factory = source.rpartition(":")
    if not (separator and path.endswith(".py")):
        path, factory = source, ""
    return _existing(path, "MODEL") + (f":{factory}" if factory else "")


def _existing(path: str, flag: str) -> str:
    if not path or not Path(path).exists():
        raise UsageError(f"{flag} {path!r} does not exist", "check the path")
    return str(Path(path).resolve())


def run_tune(source: str, out: Path, options: TuneOptions, progress: Progress) -> dict[str, Any]:
    """The whole command: build (resuming), verify, time, rank, publish `out/best`, write the leaderboards (with
    `options.build_only`: build and verify only, to be timed elsewhere by
    `kiln.compiler.perf.tune_deploy.time_builds`)."""
    from kiln.compiler.matrix.plan import RunSettings
    from kiln.compiler.matrix.run import run_matrix

    options.check()
    out = Path(os.path.abspath(out))  # the cells run elsewhere (other processes, Ray) and record it
    with tune_directory(out, options.force, options.wait, progress, building=True):
        planned = plan(source, options)
        out.mkdir(parents=True, exist_ok=True)
        settings = RunSettings(out=out / BUILDS_DIR, keep_artifacts=True, executor=options.executor)
        assert planned.config is not None
        report, _ = run_matrix(planned.config, settings, progress)
        builds = [_cell(c) for c in report["cells"]]
        save_builds(out / BUILDS_DIR, source, planned, options.executor)
        return evaluate(source, out, builds, planned, options, progress)


def evaluate(
    source: str, out: Path, builds: list[CellResult], planned: Plan, options: TuneOptions, progress: Progress
) -> dict[str, Any]:
    """The builds' candidates verified (runtime settings), timed, ranked, the winner published to `out/best` and
    the leaderboards written; the leaderboard. With `options.build_only`, nothing timed and nothing published.
    Each build's files are found under `out/builds` wherever `out` was when it was built (`locate_builds`). Call
    with `out` prepared and locked (`kiln.compiler.perf.tune_files.tune_directory`)."""
    builds, refused = locate_builds(builds, out / BUILDS_DIR)
    entries = _entries(builds, planned, options, progress, refused)
    if not options.build_only:
        _time(entries, options, progress)
    board = rank(entries, options.objective, planned.batch, timed=not options.build_only)
    board |= {"model": source, "skipped": planned.skipped, "builds": len(builds)}
    board |= provenance(out / BUILDS_DIR, builds, None if options.build_only else options.threads)
    if board["winner"] is not None:
        winner = next(e for e in entries if e.name == board["winner"]["name"])
        publish(winner, out / BEST_DIR, board)
    else:
        withdraw_best(out / BEST_DIR, progress)
    write_leaderboards(out, board)
    return board


def _cell(data: dict[str, Any]) -> CellResult:
    from kiln.compiler.matrix.results import CellResult

    return CellResult.parse(data)


def _entries(
    builds: list[CellResult], planned: Plan, options: TuneOptions, progress: Progress, refused: dict[str, str]
) -> list[Entry]:
    """Every build x runtime setting x thread count, each knowing its variant (layout, batch range) and the batch
    it is timed at; a build that failed, whose recorded directory is `refused` (cell id -> why), whose artifact
    is gone or is not what its manifest and tune's records say (`kiln.compiler.perf.tune_files.check_build`), once,
    rejected. The figures of a build come from its checked manifest, none from results.jsonl."""
    from kiln.compiler.export.manifest import manifest_figures
    from kiln.compiler.matrix.results import PASSED, STATUS_LABELS
    from kiln.targets import get_target
    from kiln.targets.base import RuntimeSettings

    entries: list[Entry] = []
    for build in builds:
        kind = planned.variants.get(build.model) or Variant(plain=build.model.endswith(PLAIN))
        directory = Path(build.cell_dir) / "export" if build.cell_dir else None
        unproven = replace(build, artifact_bytes=None, min_cosine=None, max_abs_error=None)
        base = Entry("", build.target, build.precision, kind.plain, RuntimeSettings(), None, unproven, None,
                     variant=kind, batch=planned.batch if kind.batch_range else None)  # fmt: skip
        base.name = base.build_name
        if build.status != PASSED:
            base.rejected = f"{STATUS_LABELS.get(build.status, build.status)}: {build.reason or 'no reason recorded'}"
        elif build.cell_id in refused:
            base.rejected = refused[build.cell_id]
        elif directory is None or not directory.is_dir():
            base.rejected = f"its build directory {directory} is gone: delete {BUILDS_DIR}/results.jsonl to rebuild"
        else:
            try:
                manifest = check_build(directory, build.target, build.precision, kind)
                base.build = replace(build, **manifest_figures(manifest))
            except ValueError as exc:
                base.rejected = str(exc)[:500]
        if base.rejected is not None:
            entries.append(base)
            continue
        base.directory = directory
        variants = get_target(build.target).runtime_variants(build.precision) if options.runtime_search else ()
        for variant in variants or (RuntimeSettings(),):
            for threads in options.threads or (None,):
                label = [] if variant.is_default else [variant.label()]
                label += [f"threads={threads}"] if len(options.threads) > 1 else []
                name = base.build_name + (f" [{' '.join(label)}]" if label else "")
                entries.append(replace(base, name=name, settings=variant, threads=threads, timing={}))
    for entry in entries:
        if entry.rejected is None and entry.settings.inference_precision == "default":
            entry.rejected = _parity_with_settings(entry, progress)
    return entries


def _parity_with_settings(entry: Entry, progress: Progress) -> str | None:
    """The parity gate again for a runtime setting that may change the numbers (the CPU's own inference
    precision); None when it passes, else why it is rejected. The entry keeps the accuracy measured so, which
    the leaderboard and the tie rule use instead of the build's."""
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.parity.gate import ParitySamples, validate
    from kiln.compiler.types import Tolerance
    from kiln.targets import get_target

    assert entry.directory is not None
    artifact = Artifact.read(entry.directory)
    manifest = get_target(entry.target).with_runtime_settings(artifact.manifest, entry.settings)
    samples = ParitySamples.load(entry.directory, manifest.parity.sample_origins if manifest.parity else [])
    if samples is None:
        return "no stored parity samples to check this runtime setting on"
    tolerance = manifest.parity.tolerance if manifest.parity else Tolerance.for_precision(manifest.precision)
    progress.say(f"parity of {entry.name} ...")
    report = validate(replace(artifact, manifest=manifest), samples, tolerance, "stored reference")
    floats = [o for o in report.outputs if o.kind == "float"]
    entry.min_cosine = min((o.min_cosine for o in floats), default=1.0)
    entry.max_abs_error = max((o.max_abs_error for o in floats), default=0.0)
    failures = "; ".join(o.summary() for o in report.failures())
    return None if report.passed else f"parity failed with this setting: {failures}"[:400]


def _time(entries: list[Entry], options: TuneOptions, progress: Progress) -> None:
    """Time every candidate not rejected in the same interleaved rounds (`kiln bench`'s machinery); a candidate
    that fails to load or run is rejected with its reason."""
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.perf.benchmark import ARTIFACT, BenchOptions, Candidate, time_candidates

    live = [e for e in entries if e.rejected is None and e.directory is not None]
    if not live:
        return
    bench = BenchOptions(rounds=options.rounds, runs=options.runs, warmup=options.warmup, write=False,
                         min_round_ms=MIN_ROUND_MS, round_timeout_s=options.round_timeout_s)  # fmt: skip
    candidates = [
        Candidate(e.name, ARTIFACT, e.directory, Artifact.read(e.directory).manifest, threads=e.threads,
                  settings=e.settings.to_dict(), batch=e.batch)
        for e in live if e.directory is not None
    ]  # fmt: skip
    progress.say(f"timing {len(candidates)} candidates in {options.rounds} interleaved rounds ...")
    result = time_candidates(candidates, bench, progress, keep_going=True)
    by_name = {r["name"]: r for r in result["candidates"]}
    for entry in live:
        record = by_name.get(entry.name, {})
        if record.get("failure") or "latency_ms" not in record:
            entry.rejected = f"could not be timed: {record.get('failure') or 'no timing'}"
        entry.timing = record
