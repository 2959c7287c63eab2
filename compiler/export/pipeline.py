"""The export pipeline, in one place: load -> capture -> optimize -> build -> validate -> publish.

`export_targets` reads as that flow; each step is one call to a public function that other commands use on
their own: `export.optimize.optimize`, `export.artifacts.build`, `parity.gate.validate`,
`kiln.compiler.export.manifest.assemble_manifest`, `kiln.compiler.export.staging.install_tree`.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from kiln.compiler.capture.program import CapturedModel, capture, lower
from kiln.compiler.capture.pt2_archive import trusting_pickles
from kiln.compiler.capture.sources import ModelSource, load_model
from kiln.compiler.diagnose.divergence import localize_export
from kiln.compiler.errors import KilnError, MissingBackendError, UnsupportedOpError, UsageError
from kiln.compiler.export.artifacts import Artifact, build, hash_files
from kiln.compiler.export.manifest import assemble_manifest, observed_outputs, source_record
from kiln.compiler.export.optimize import optimize
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.export.result import ExportResult, TargetFailure
from kiln.compiler.export.routes import RouteAttempt, RouteGraphs, keep_only, route_info, routes_failed
from kiln.compiler.export.selection import capture_groups, fit_to_source, select_targets
from kiln.compiler.export.staging import (
    REJECTED,
    check_output_dir,
    converter_temp_files,
    install_tree,
    output_lock,
    staging_area,
)
from kiln.compiler.generation.decoding import TEXT_GENERATION
from kiln.compiler.generation.export import (
    generation_detail,
    generation_samples,
    generation_source,
    generation_targets,
    name_generation_io,
    skip_localization,
    wants_generation,
    with_generation,
)
from kiln.compiler.memory import peak_rss, release_pages, trim_heap
from kiln.compiler.parity.gate import QUANTIZED_PRECISIONS, QUANTIZED_SAMPLES, ParitySamples, validate
from kiln.compiler.parity.input_files import check_input_files
from kiln.compiler.parity.reference import reference_samples
from kiln.compiler.progress import Progress
from kiln.compiler.quantization.calibration import (
    NO_HELD_BACK,
    NOT_REPRESENTATIVE,
    CalibrationData,
    load_calibration,
)
from kiln.compiler.types import Manifest, ParityReport, PassRecord
from kiln.targets.base import BuildRequest, Route, Target


@dataclass
class _Shared:
    """What every target of one capture shares: the source at its batch, the graphs, the parity samples, the
    calibration data, a scratch directory, and each route's graph with the pass pipelines already run on it."""

    source: ModelSource
    captured: CapturedModel
    samples: ParitySamples
    calibration: CalibrationData | None
    scratch: Path
    routes: RouteGraphs


@dataclass
class _Outcome:
    """One target's end: its finished build (directory and manifest), or how it failed."""

    target: Target
    directory: Path | None = None
    manifest: Manifest | None = None
    failure: TargetFailure | None = None
    relative: Path = Path()  # where the build ends up inside the output directory


class _TargetFailed(Exception):
    """A target failed at one step; with several targets, the others go on."""

    def __init__(self, step: str, error: KilnError):
        super().__init__(error.one_line())
        self.step, self.error = step, error


def export_targets(
    model: str | torch.nn.Module,
    targets: str | list[str],
    out: str | Path,
    options: ExportOptions | None = None,
    example_inputs: Any = None,
    progress: Progress | None = None,
) -> list[ExportResult]:
    """Export one model to one or more targets, each validated against the reference; see `compiler.export`.

    With several targets, one that fails to build or run is reported (`ExportResult.failure`) and the others
    are still published, unless `options.all_or_nothing`.
    """
    options = options or ExportOptions()
    progress = progress or Progress(quiet=True)
    out = Path(out)
    chosen = select_targets(targets, options, progress)
    with output_lock(out, options.wait, progress.say), trusting_pickles(options.trust_pickle):
        check_output_dir(out, options.force)
        check_input_files(options, chosen)
        timings: dict[str, float] = {}  # the stages every target shares
        with _timed(progress, timings, "load", model if isinstance(model, str) else type(model).__name__):
            source = load_model(model, example_inputs, options.inputs_files, options.folder_request())
        chosen = fit_to_source(source, chosen, targets, progress)
        if wants_generation(source, options.task, options.cache_size):
            chosen = generation_targets(source, chosen, targets, options, progress.say)
            with _timed(progress, timings, "generation", generation_detail(chosen)):
                source = generation_source(source, chosen, options.cache_size)
        outcomes: list[_Outcome] = []
        # Work files live in the staging directory too, and so do the converters' own temporary files.
        with staging_area(out) as staging, converter_temp_files(staging / "tmp"):
            for batch, group in capture_groups(source, chosen):
                shared = prepare(source, batch, group, options, staging / "work", progress, timings)
                for target in group:
                    outcomes.append(_export_or_fail(target, shared, options, staging, progress, timings, len(chosen)))
            return publish(staging, outcomes, out)


def _export_or_fail(
    target: Target,
    shared: _Shared,
    options: ExportOptions,
    staging: Path,
    progress: Progress,
    timings: dict[str, float],
    count: int,
) -> _Outcome:
    """One target's export; a failure of one of several targets is recorded instead of raised."""
    try:
        return export_one(target, shared, options, staging / "builds" / target.name, progress, timings)
    except _TargetFailed as failed:
        if count == 1 or options.all_or_nothing:
            raise failed.error from None
        progress.warn(f"{target.name} failed at {failed.step}: {failed.error.one_line()}")
        return _Outcome(target, failure=TargetFailure(failed.step, failed.error.one_line(), failed.error.exit_code))


def prepare(
    source: ModelSource,
    batch: int | None,
    group: list[Target],
    options: ExportOptions,
    work: Path,
    progress: Progress,
    timings: dict[str, float],
) -> _Shared:
    """Capture the model once for a group of targets, and compute what they share: the reference outputs on the
    parity inputs, and calibration data when one of them is quantized."""
    source = source.with_batch(batch) if batch else source
    scratch = work / f"batch{batch or 'example'}"
    to_onnx = any(t.consumes == "onnx" for t in group)
    # With targets (or routes) that take the FX program too, a failed ONNX lowering fails only the ONNX routes.
    mixed = to_onnx and source.kind == "torch" and any(r.consumes != "onnx" for t in group for r in t.routes())
    lowering_failure = None
    via = "ONNX" if source.kind == "onnx" else "torch.export" + " -> ONNX" * to_onnx
    with _timed(progress, timings, "capture", via + (f" at batch {batch}" if batch else "")):
        optimize_onnx = options.opt_level > 0
        captured = capture(source, options.dynamic, scratch, to_onnx and not mixed, optimize_onnx)
        if mixed:
            try:
                captured = lower(captured, scratch, optimize_onnx)
            except UnsupportedOpError as error:
                if options.all_or_nothing:
                    raise
                lowering_failure = error
        captured = name_generation_io(captured) if source.task == TEXT_GENERATION else captured
    calibration = calibration_data(group, captured, source, options, progress, timings)
    quantized = any(options.precision_for(t) in QUANTIZED_PRECISIONS for t in group)
    held = calibration.held_back_sets(captured.inputs, QUANTIZED_SAMPLES) if calibration is not None else []
    with _timed(progress, timings, "reference", f"{source.reference_name} on parity inputs"):
        if source.task == TEXT_GENERATION:
            samples = generation_samples(source, captured, options)
        else:
            samples = reference_samples(source, captured, options, quantized, held)
    settle(source)
    routes = RouteGraphs(captured, scratch, optimize_onnx, lowering_failure)
    return _Shared(source, captured, samples, calibration, scratch, routes)


def export_one(
    target: Target,
    shared: _Shared,
    options: ExportOptions,
    directory: Path,
    progress: Progress,
    timings: dict[str, float],
) -> _Outcome:
    """Build and validate one target by the first of its routes that builds and passes parity (when none
    passes, the first that built is kept, rejected; a fallback route is tried only when no earlier one built),
    and write its manifest; when no route builds, the error becomes _TargetFailed naming the step. The build
    request and the parity sets of its precision are computed here, once, for every route."""
    own: dict[str, float] = {}
    request = options.build_request(target, shared.calibration)
    samples = shared.samples.for_precision(request.precision)
    built = _build_by_routes(target, request, samples, shared, options, directory, progress, own)
    artifact, records, chosen, attempts = built
    carry_files(shared.source.carried, artifact.directory)
    for note in artifact.manifest.notes:
        progress.say(f"note: {note}")
    notes = [] if samples.save(directory) else ["parity samples too large to store: verify needs --model"]
    if shared.calibration is not None and not shared.calibration.representative and request.precision == "int8":
        notes.append(NOT_REPRESENTATIVE)
    elif shared.calibration is not None and request.precision == "int8" and not shared.calibration.held_back:
        notes.append(NO_HELD_BACK)
    assert chosen.report is not None
    report = chosen.report
    if shared.source.task == TEXT_GENERATION:
        options = skip_localization(options, report, progress)
    report = localize_export(
        target,
        shared.captured,
        samples,
        shared.calibration,
        options,
        report,
        directory,
        shared.scratch,
        progress,
        chosen.route,
    )
    manifest = _final_manifest(artifact, shared.source, records, notes, report, options, timings | own, progress.peaks)
    if len(target.routes()) > 1:
        manifest.target_info |= route_info(chosen, attempts)
    manifest.write(directory)
    progress.say(report.summary().replace("\n", "\n[kiln]   "))
    return _Outcome(target, directory, manifest)


def _build_by_routes(
    target: Target,
    request: BuildRequest,
    samples: ParitySamples,
    shared: _Shared,
    options: ExportOptions,
    directory: Path,
    progress: Progress,
    own: dict[str, float],
) -> tuple[Artifact, list[PassRecord], RouteAttempt, list[RouteAttempt]]:
    """Try the target's routes in order; the first build that passes parity (else the first that built), its
    pass records, its attempt and every attempt. When no route builds, _TargetFailed names the step."""
    routes = shared.routes.applicable(target)
    attempts: list[RouteAttempt] = []
    built: dict[int, tuple[Artifact, list[PassRecord]]] = {}
    for index, route in enumerate(routes):
        if route.fallback and built:
            break  # an earlier route converted (and failed parity): a fallback route is not a second opinion
        attempt_dir = directory.with_name(f"{target.name}~{index}")
        attempt, result = _try_route(target, route, request, samples, shared, options, attempt_dir, progress, own)
        attempts.append(attempt)
        if result is not None:
            built[index] = result
        if not attempt.reason:
            break
        if index + 1 < len(routes):
            progress.warn(f"{target.name}: route {route.name} not used ({attempt.step}): {attempt.reason}")
    if not built:
        if not attempts:
            raise _TargetFailed("capture", UnsupportedOpError(f"{target.name} has no route from this model", None))
        raise _TargetFailed(attempts[0].step, routes_failed(attempts))
    index = next((i for i in built if not attempts[i].reason), min(built))
    (artifact, records), chosen = built[index], attempts[index]
    artifact.directory = keep_only(
        artifact.directory, directory, [directory.with_name(f"{target.name}~{i}") for i in range(len(attempts))]
    )
    return artifact, records, chosen, attempts


def _try_route(
    target: Target,
    route: Route,
    request: BuildRequest,
    samples: ParitySamples,
    shared: _Shared,
    options: ExportOptions,
    directory: Path,
    progress: Progress,
    own: dict[str, float],
) -> tuple[RouteAttempt, tuple[Artifact, list[PassRecord]] | None]:
    """One route of one target: optimize, build (as `request` asks) and validate its graph on `samples`; the
    attempt, and the artifact with the pass records when it built. A conversion or run failure is returned in
    the attempt (the next route is tried); a usage error or a missing backend, which every route would meet,
    raises _TargetFailed."""
    step = "capture"
    try:
        graph = shared.routes.graph(route, target)
        step = "optimize"
        with _timed(progress, own, f"passes {target.name}", f"-O{options.opt_level}"):
            done = shared.routes.optimized_for(route)
            graph, records = optimize(graph, target, shared.routes.work_for(route), options, done, route.consumes)
        _say_rollbacks(records, progress)
        step = "build"
        settle(shared.source)
        request = replace(request, route=route.name)
        with _timed(progress, own, f"build {target.name}", target.stage_detail(graph, request)):
            artifact = build(target, graph, request, directory)
        step = "validate"
        settle(shared.source)
        with _timed(progress, own, f"validate {target.name}", f"{len(samples.inputs)} input sets"):
            tolerance = options.tolerance(request.precision)
            report = validate(artifact, samples, tolerance, shared.source.reference_name)
        if shared.source.task == TEXT_GENERATION:
            with _timed(progress, own, f"generate {target.name}", "greedy tokens vs the reference"):
                report = with_generation(report, artifact, shared.source)
            settle(shared.source)
    except (UsageError, MissingBackendError) as error:
        raise _TargetFailed(step, error) from error
    except KilnError as error:
        return RouteAttempt.failed(route, step, error), None
    return RouteAttempt.judged(route, report), (artifact, records)


def _final_manifest(
    artifact: Artifact,
    source: ModelSource,
    records: list[PassRecord],
    notes: list[str],
    report: ParityReport,
    options: ExportOptions,
    timings: dict[str, float],
    peaks: dict[str, int],
) -> Manifest:
    """The manifest of a validated build: its parts, with the outputs' shapes as the artifact produced them, and the
    process's peak resident set so far (`host.peak_rss`, and when each stage ended: `host.peak_rss_by_stage`)."""
    assert artifact.parts is not None
    parts = replace(
        artifact.parts,
        source=source_record(source),
        passes=records,
        notes=notes,
        parity=report,
        parity_gate=options.parity_gate,
        timings=timings,
        files=hash_files(artifact.directory),
    )
    manifest = assemble_manifest(parts)
    manifest.outputs = observed_outputs(manifest.outputs, report)
    manifest.host = {**manifest.host, "peak_rss": peak_rss(), "peak_rss_by_stage": dict(peaks)}
    return manifest


def carry_files(files: dict[str, Path], directory: Path) -> None:
    """Copy the files the source carries into the export (a checkpoint folder's tokenizer), at their relative
    paths; the manifest lists and hashes them like the artifact's own."""
    for relative, path in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, directory / relative)


def settle(source: ModelSource) -> None:
    """Between the steps that read the weights in turn (the model for the reference, a converter, a runtime): free
    what the last step left (its garbage, a runtime session) and drop the resident pages of the model's
    memory-mapped weights (`kiln.compiler.memory.release_pages`), so that the steps do not add up one copy of the
    weights each in this process's memory."""
    gc.collect()
    trim_heap()
    release_pages(addresses=source.weight_addresses())


def publish(staging: Path, outcomes: list[_Outcome], out: Path) -> list[ExportResult]:
    """Move the finished builds into `out` (passed ones in place, failed ones under `.rejected/`), in one step."""
    built = [o for o in outcomes if o.directory is not None]
    if built:
        install_tree(_assemble(staging, built, single=len(outcomes) == 1), out)
    return [
        ExportResult(
            o.target.name,
            out / o.relative,
            o.manifest,
            o.manifest is not None and o.manifest.published,
            o.failure,
        )
        for o in outcomes
    ]


def _assemble(staging: Path, builds: list[_Outcome], single: bool) -> Path:
    """Lay out the final tree: passed builds in place, failed ones under `.rejected/`."""
    tree = staging / "tree"
    first = builds[0]
    if single and first.manifest is not None and first.manifest.published and first.directory is not None:
        first.directory.rename(tree)
        return tree
    tree.mkdir()
    for build_ in builds:
        assert build_.manifest is not None and build_.directory is not None
        build_.relative = Path(build_.target.name) if build_.manifest.published else Path(REJECTED, build_.target.name)
        (tree / build_.relative).parent.mkdir(exist_ok=True)
        build_.directory.rename(tree / build_.relative)
    return tree


@contextmanager
def _timed(progress: Progress, timings: dict[str, float], name: str, detail: str) -> Iterator[None]:
    """A progress stage whose seconds are added to `timings[name]`."""
    with progress.stage(name, detail) as stage:
        yield
    timings[name] = round(timings.get(name, 0.0) + stage.seconds, 3)


def _say_rollbacks(records: list[PassRecord], progress: Progress) -> None:
    """One line per pass that broke the graph and was rolled back."""
    for record in records:
        if record.rolled_back:
            progress.warn(f"pass {record.name} was rolled back: {record.rolled_back}")


def calibration_data(
    targets: list[Target],
    model: CapturedModel,
    source: ModelSource,
    options: ExportOptions,
    progress: Progress,
    timings: dict[str, float],
) -> CalibrationData | None:
    """Calibration samples when a target is asked for calibrated int8, else None; loud when they are random."""
    if not any(options.precision_for(t) == "int8" for t in targets):
        if options.calibration.source is not None:
            progress.say("--calib is ignored: no target is exported at precision int8")
        return None
    examples = [t.detach().cpu().numpy() for t in source.example_inputs]
    with _timed(progress, timings, "calibration", options.calibration.describe()):
        data = load_calibration(options.calibration, model.inputs, examples, QUANTIZED_SAMPLES)
    if not data.representative:
        progress.warn(NOT_REPRESENTATIVE)
    return data
