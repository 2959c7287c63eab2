"""The export pipeline, in one place: load -> capture -> optimize -> build -> validate -> publish.

`export_targets` reads as that flow; each step is one call to a public function that other commands use on
their own: `compiler.optimize.optimize`, `compiler.artifacts.build`, `compiler.parity.validate`,
`compiler.manifest.assemble_manifest`, `compiler.staging.install_tree`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compiler.artifacts import Artifact, build, hash_files
from compiler.capture import CapturedModel, capture, lower
from compiler.divergence import localize_export
from compiler.errors import KilnError, UnsupportedOpError, UsageError
from compiler.layout import NCHW_TO_NHWC, NHWC
from compiler.manifest import assemble_manifest, source_record
from compiler.optimize import optimize
from compiler.options import ExportOptions
from compiler.parity import QUANTIZED_PRECISIONS, QUANTIZED_SAMPLES, ParitySamples, check_input_files, validate
from compiler.progress import Progress
from compiler.pt2_archive import trusting_pickles
from compiler.quantization.calibration import CalibrationData, load_calibration
from compiler.reference import reference_samples
from compiler.selection import fit_to_source, select_targets
from compiler.sources import ModelSource, from_module, load_source
from compiler.staging import REJECTED, check_output_dir, install_tree, output_lock, staging_area
from compiler.types import ExportResult, Manifest, ParityReport, PassRecord, TargetFailure, TensorSpec
from targets import Target

__all__ = ["ExportOptions", "export_targets"]

NOT_REPRESENTATIVE = (
    "int8 calibrated on RANDOM inputs: the quantization ranges are not representative of real data; "
    "pass --calib FILE.npz|DIR|file.py:loader"
)


@dataclass
class _Shared:
    """What every target of one capture shares: the source at its batch, the graphs, the parity samples, the
    calibration data, a scratch directory, why the ONNX lowering failed (if it did) and the pass pipelines
    already run."""

    source: ModelSource
    captured: CapturedModel
    samples: ParitySamples
    calibration: CalibrationData | None
    scratch: Path
    lowering_failure: KilnError | None = None  # the ONNX lowering failed (the FX program is still there)
    optimized: dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]] = field(default_factory=dict)


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
            source = load_model(model, example_inputs, options)
        chosen = fit_to_source(source, chosen, targets, progress)
        outcomes: list[_Outcome] = []
        with staging_area(out) as staging:  # work files live in the staging directory too
            for batch, group in _capture_groups(source, chosen):
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


NO_HELD_BACK = (
    "the calibration source has no rows beyond --calib-samples, so the parity gate's extra int8 input sets are "
    "random (it never judges on rows calibrated on): give more rows than --calib-samples to judge on real data"
)


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
    # With targets that take the FX program too, a failed ONNX lowering fails only the ONNX targets.
    mixed = to_onnx and source.kind == "torch" and any(t.consumes != "onnx" for t in group)
    lowering_failure = None
    via = "ONNX" if source.kind == "onnx" else "torch.export" + " -> ONNX" * to_onnx
    with _timed(progress, timings, "capture", via + (f" at batch {batch}" if batch else "")):
        optimize_onnx = options.opt_level > 0
        captured = capture(source, options.dynamic_batch, scratch, to_onnx and not mixed, optimize_onnx)
        if mixed:
            try:
                captured = lower(captured, scratch, optimize_onnx)
            except UnsupportedOpError as error:
                if options.all_or_nothing:
                    raise
                lowering_failure = error
    calibration = calibration_data(group, captured, source, options, progress, timings)
    quantized = any(options.precision_for(t) in QUANTIZED_PRECISIONS for t in group)
    held = calibration.held_back_sets(captured.inputs, QUANTIZED_SAMPLES) if calibration is not None else []
    with _timed(progress, timings, "reference", f"{source.reference_name} on parity inputs"):
        samples = reference_samples(source, captured, options, quantized, held)
    return _Shared(source, captured, samples, calibration, scratch, lowering_failure)


def export_one(
    target: Target,
    shared: _Shared,
    options: ExportOptions,
    directory: Path,
    progress: Progress,
    timings: dict[str, float],
) -> _Outcome:
    """Optimize, build and validate one target, and write its manifest; a KilnError at a step becomes
    _TargetFailed naming the step."""
    own: dict[str, float] = {}
    if target.consumes == "onnx" and shared.lowering_failure is not None:
        raise _TargetFailed("capture", shared.lowering_failure)
    step = "optimize"
    try:
        with _timed(progress, own, f"passes {target.name}", f"-O{options.opt_level}"):
            graph, records = optimize(shared.captured, target, shared.scratch, options, shared.optimized)
        _say_rollbacks(records, progress)
        step = "build"
        request = options.build_request(target, shared.calibration)
        with _timed(progress, own, f"build {target.name}", target.stage_detail(graph, request)):
            artifact = build(target, graph, request, directory)
        for note in artifact.manifest.notes:
            progress.say(f"note: {note}")
        samples = shared.samples.for_precision(request.precision)
        notes = [] if samples.save(directory) else ["parity samples too large to store: verify needs --model"]
        if shared.calibration is not None and not shared.calibration.representative and request.precision == "int8":
            notes.append(NOT_REPRESENTATIVE)
        elif shared.calibration is not None and request.precision == "int8" and not shared.calibration.held_back:
            notes.append(NO_HELD_BACK)
        step = "validate"
        with _timed(progress, own, f"validate {target.name}", f"{len(samples.inputs)} input sets"):
            report = validate(artifact, samples, options.tolerance(request.precision), shared.source.reference_name)
    except KilnError as error:
        raise _TargetFailed(step, error) from error
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
    )
    manifest = _final_manifest(artifact, shared.source, records, notes, report, options, timings | own)
    manifest.write(directory)
    progress.say(report.summary().replace("\n", "\n[kiln]   "))
    return _Outcome(target, directory, manifest)


def _final_manifest(
    artifact: Artifact,
    source: ModelSource,
    records: list[PassRecord],
    notes: list[str],
    report: ParityReport,
    options: ExportOptions,
    timings: dict[str, float],
) -> Manifest:
    """The manifest of a validated build: its parts, with the outputs' shapes as the artifact produced them."""
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
    return manifest


def observed_outputs(specs: list[TensorSpec], report: ParityReport) -> list[TensorSpec]:
    """The output specs with each static dimension as the artifact really produced it (a declared shape can be
    wrong: an ONNX file may declare [1, 0] for an output of [1, 10]); named dynamic dimensions stay named."""
    produced = {o.name: o.shape for o in report.outputs if o.shape is not None}
    fixed = []
    for spec in specs:
        shape = produced.get(spec.name)
        if shape is not None and spec.layout == NHWC and len(shape) == 4:
            shape = [shape[i] for i in NCHW_TO_NHWC]  # the report's shapes are in the reference's layout
        if shape is not None and len(shape) == len(spec.shape):
            spec = replace(spec, shape=tuple(d if isinstance(d, str) else n for d, n in zip(spec.shape, shape)))
        elif shape is not None:
            spec = replace(spec, shape=tuple(shape))
        fixed.append(spec)
    return fixed


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


def _capture_groups(source: ModelSource, targets: list[Target]) -> list[tuple[int | None, list[Target]]]:
    """Targets grouped by the batch they must be captured at (None: the example inputs' own batch)."""
    first = source.example_inputs[0] if source.example_inputs else None
    example_batch = first.shape[0] if first is not None and first.dim() else None
    groups: dict[int | None, list[Target]] = {}
    for target in targets:
        batch = target.fixed_batch if target.fixed_batch not in (None, example_batch) else None
        groups.setdefault(batch, []).append(target)
    return sorted(groups.items(), key=lambda item: item[0] or 0)


def load_model(model: str | Path | torch.nn.Module, example_inputs: Any, options: ExportOptions) -> ModelSource:
    """The model the user gave: a source string (zoo:NAME, file.py:factory, .pt2, .onnx) or a module."""
    if isinstance(model, (str, Path)):
        user = [read_inputs_file_raw(p) for p in options.inputs_files] if str(model).endswith(".onnx") else None
        return load_source(str(model), user)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"the model must be a torch.nn.Module or a source string, not {type(model).__name__}",
            "pass a module with example_inputs, or e.g. 'zoo:cnn', 'model.onnx', 'file.py:factory'",
        )
    if example_inputs is None:
        raise UsageError("export(module, ...) needs example_inputs", "pass example_inputs=(tensor, ...)")
    return from_module(model, example_inputs)


def read_inputs_file_raw(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a user's .npz, unchecked (an .onnx source takes its example inputs from it)."""
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise UsageError(f"cannot read inputs file {path}: {exc}", "pass an .npz written by numpy.savez") from None
