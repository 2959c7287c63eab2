"""The export pipeline: load -> capture -> passes -> build -> validate -> manifest, in one place."""

from __future__ import annotations

import copy
import hashlib
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compiler.backend_errors import backend_failures, operation_named_in  # noqa: F401  (re-exported)
from compiler.calibration import CalibrationData, load_calibration
from compiler.capture import CapturedModel, capture
from compiler.errors import KilnError, MissingBackendError, UsageError
from compiler.host import host_info, versions
from compiler.options import ExportOptions, parse_io  # noqa: F401  (ExportOptions is re-exported)
from compiler.parity import (
    ParitySamples,
    check_input_files,
    in_reference_layout,
    make_inputs,
    read_inputs_file,
    validate,
)
from compiler.progress import Progress, converter_output_captured
from compiler.sources import ModelSource, from_module, load_source
from compiler.staging import REJECTED, check_output_dir, install_tree, staging_area
from compiler.types import ArtifactFile, ExportResult, Manifest, PassRecord
from passes import FX, ONNX, dump_graph, pipeline_for, run_pipeline, save_onnx
from targets import Target, resolve_targets

NOT_REPRESENTATIVE = (
    "int8 calibrated on RANDOM inputs: the quantization ranges are not representative of real data; "
    "pass --calib FILE.npz|DIR|file.py:loader"
)


@dataclass
class _Build:
    target: Target
    directory: Path
    manifest: Manifest
    relative: Path = Path()  # where it ends up inside the output directory


def export_targets(
    model: str | torch.nn.Module,
    targets: str | list[str],
    out: str | Path,
    options: ExportOptions | None = None,
    example_inputs: Any = None,
    progress: Progress | None = None,
) -> list[ExportResult]:
    """Export one model to one or more targets, each validated against the reference; see `export`."""
    options = options or ExportOptions()
    progress = progress or Progress(quiet=True)
    out = Path(out)
    every = _names(targets) == ["all"]
    chosen = _check_targets(resolve_targets(targets), options, every, progress)
    check_output_dir(out, options.force)
    check_input_files(options, chosen)
    with progress.stage("load", model if isinstance(model, str) else type(model).__name__):
        source = _load(model, example_inputs, options)
    chosen = _fit_to_source(source, chosen, every=every, progress=progress)
    with tempfile.TemporaryDirectory(prefix="kiln-work-") as work, staging_area(out) as staging:
        builds = []
        for batch, group in _capture_groups(source, chosen):
            group_source = source.with_batch(batch) if batch else source
            scratch = Path(work) / f"batch{batch or 'example'}"
            to_onnx = any(t.consumes == "onnx" for t in group)
            via = "ONNX" if source.kind == "onnx" else "torch.export" + " -> ONNX" * to_onnx
            with progress.stage("capture", via + (f" at batch {batch}" if batch else "")):
                captured = capture(group_source, options.dynamic_batch, scratch, to_onnx, options.opt_level > 0)
            with progress.stage("reference", f"{source.reference_name} on parity inputs"):
                samples = reference_samples(group_source, captured, options)
            calibration = calibration_data(group, captured, group_source, options, progress)
            optimized: dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]] = {}
            for target in group:
                with progress.stage(f"passes {target.name}", f"-O{options.opt_level}"):
                    graph_model, pass_records = optimize(captured, target, scratch, options, optimized)
                builds.append(
                    build_and_validate(
                        target,
                        source,
                        graph_model,
                        samples,
                        pass_records,
                        staging / "builds" / target.name,
                        options,
                        progress,
                        calibration,
                    )
                )
        install_tree(_assemble(staging, builds, single=len(chosen) == 1), out)
    return [ExportResult(b.target.name, out / b.relative, b.manifest, b.manifest.published) for b in builds]


def build_and_validate(
    target: Target,
    source: ModelSource,
    model: CapturedModel,
    samples: ParitySamples,
    pass_records: list[PassRecord],
    directory: Path,
    options: ExportOptions,
    progress: Progress,
    calibration: CalibrationData | None = None,
) -> _Build:
    """Build one target's artifact, run it on the parity samples, and write its manifest."""
    directory.mkdir(parents=True)
    request = options.build_request(target, calibration)
    with (
        progress.stage(f"build {target.name}", target.stage_detail(model, request)),
        backend_failures(target, "convert"),
        converter_output_captured(),
    ):
        built = target.build(model, directory, request)
    for note in built.notes:
        progress.say(f"note: {note}")
    stored = samples.save(directory)
    notes = list(built.notes) + ([] if stored else ["parity samples too large to store: verify needs --model"])
    if calibration is not None and not calibration.representative and request.precision == "int8":
        notes.append(NOT_REPRESENTATIVE)
    manifest = Manifest(
        target=target.name,
        precision=request.precision,
        source={
            "description": source.description,
            "kind": source.kind,
            "state_hash": source.state_hash,
            "reference": source.reference_name,
        },
        files=[],
        inputs=built.inputs or model.inputs,
        outputs=built.outputs or model.outputs,
        parity=None,
        published=False,
        parity_gate=options.parity_gate,
        runtime_config=built.runtime_config,
        timings={},
        versions=versions(*target.requires.values()),
        host=host_info(),
        passes=pass_records + built.passes,
        target_info={
            "opset": model.opset,
            "dynamic_batch": str(model.dynamic_batch) if model.dynamic_batch else None,
            **built.info,
        },
        notes=notes,
    )
    with progress.stage(f"validate {target.name}", f"{len(samples.inputs)} input sets"):
        with backend_failures(target, "run"):
            runner = target.load(directory, manifest)
        run = in_reference_layout(runner.run, manifest.inputs, manifest.outputs)
        tolerance = options.tolerance(request.precision)
        manifest.parity = validate(run, samples, tolerance, source.reference_name, runner.runtime_info())
    manifest.published = manifest.parity.passed or not options.parity_gate
    if not options.parity_gate and not manifest.parity.passed:
        manifest.notes.append("published without passing parity (--no-parity-gate)")
    manifest.timings = {
        stage: seconds
        for stage, seconds in progress.timings.items()
        if not stage.startswith(("passes ", "build ", "validate ")) or stage.endswith(f" {target.name}")
    }
    manifest.files = hash_files(directory)
    manifest.write(directory)
    progress.say(manifest.parity.summary().replace("\n", "\n[kiln]   "))
    return _Build(target, directory, manifest)


def calibration_data(
    targets: list[Target],
    model: CapturedModel,
    source: ModelSource,
    options: ExportOptions,
    progress: Progress,
) -> CalibrationData | None:
    """Calibration samples when a target is asked for calibrated int8, else None; loud when they are random."""
    if not any(options.precision_for(t) == "int8" for t in targets):
        if options.calibration.source is not None:
            progress.say("--calib is ignored: no target is exported at precision int8")
        return None
    examples = [t.detach().cpu().numpy() for t in source.example_inputs]
    with progress.stage("calibration", options.calibration.describe()):
        data = load_calibration(options.calibration, model.inputs, examples)
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


def reference_samples(source: ModelSource, model: CapturedModel, options: ExportOptions) -> ParitySamples:
    """Parity input sets and the reference model's outputs on each."""
    if options.samples < 1:
        raise UsageError(f"--samples {options.samples}: need at least 1", "use the default of 4")
    examples = [t.detach().cpu().numpy() for t in source.example_inputs]
    if len(examples) != len(model.inputs):
        raise UsageError(
            f"the ONNX graph has {len(model.inputs)} inputs but the model takes {len(examples)}",
            "remove unused inputs from forward()",
        )
    batch = model.dynamic_batch
    user_sets = [(f"user:{Path(p).name}", read_inputs_file(Path(p), model.inputs)) for p in options.inputs_files]
    inputs, origins = make_inputs(
        examples, model.inputs, options.samples, [batch.minimum, batch.maximum] if batch else [], user_sets
    )
    reference = reference_runner(source, model)
    return ParitySamples(inputs, origins, [reference(feeds) for feeds in inputs])


def reference_runner(source: ModelSource, model: CapturedModel) -> Any:
    """A function from named numpy inputs to the reference model's named numpy outputs."""
    if source.kind == "onnx":
        from targets.onnxrt import OnnxRuntimeRunner

        assert source.onnx_path is not None
        return OnnxRuntimeRunner(source.onnx_path).run
    module = source.module
    assert module is not None
    names = [s.name for s in model.outputs]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = module(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in model.inputs])
        leaves = torch.utils._pytree.tree_leaves(outputs)
        return {name: leaf.detach().cpu().numpy() for name, leaf in zip(names, leaves)}

    return run


def optimize(
    model: CapturedModel,
    target: Target,
    work: Path,
    options: ExportOptions,
    done: dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]],
) -> tuple[CapturedModel, list[PassRecord]]:
    """Run the target's passes over the graph it consumes; the optimized model and what each pass did.

    `done` holds the pipelines already run for other targets of this capture, so that one is run once.
    """
    ir = FX if target.consumes == "torch" else ONNX
    if options.passes is not None:
        chosen = [p for p in options.passes if p.ir == ir]
    else:
        chosen = pipeline_for(ir, target.name, options.opt_level, options.pass_adjustments)
    key = (ir, *(p.name for p in chosen))
    dump = options.dump_passes / target.name if options.dump_passes is not None else None
    if key in done:
        if dump is not None:
            _dump_final(done[key][0], ir, dump)
        return done[key]
    if ir == ONNX and model.onnx_path is not None:
        import onnx_ir

        graph, records = run_pipeline(onnx_ir.load(str(model.onnx_path)), chosen, dump)
        destination = work / f"optimized-{len(done)}" / "model.onnx"
        destination.parent.mkdir()
        done[key] = replace(model, onnx_path=save_onnx(graph, destination)), records
    elif ir == FX and model.exported is not None and chosen:
        # FX passes may change the program in place: the capture is shared with other targets.
        program, records = run_pipeline(copy.deepcopy(model.exported), chosen, dump)
        done[key] = replace(model, exported=program), records
    else:
        done[key] = model, []
        if dump is not None:
            _dump_final(model, ir, dump)
    return done[key]


def _dump_final(model: CapturedModel, ir: str, dump: Path) -> None:
    """For --dump-passes: the graph a target received from a pipeline already run for another target."""
    graph: Any = model.exported
    if ir == ONNX:
        import onnx_ir

        graph = onnx_ir.load(str(model.onnx_path)) if model.onnx_path is not None else None
    if graph is not None:
        dump_graph(graph, dump / "final")


def hash_files(directory: Path) -> list[ArtifactFile]:
    """Every file of an artifact directory (but the manifest) with size and sha256."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json"):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        files.append(ArtifactFile(str(path.relative_to(directory)), path.stat().st_size, digest.hexdigest()))
    return files


def _load(model: str | torch.nn.Module, example_inputs: Any, options: ExportOptions) -> ModelSource:
    if isinstance(model, (str, Path)):
        user = [read_inputs_file_raw(p) for p in options.inputs_files] if str(model).endswith(".onnx") else None
        return load_source(str(model), user)
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


def _check_targets(targets: list[Target], options: ExportOptions, every: bool, progress: Progress) -> list[Target]:
    """The targets that can do what the options ask; with `all`, skip the others (saying why), else refuse."""
    fitting = []
    for target in targets:
        refusal = _refusal(target, options)
        if refusal is None:
            fitting.append(target)
        elif every and isinstance(refusal, UsageError) and len(targets) > 1:
            progress.say(f"skipping {target.name}: {refusal.message}")
        else:
            raise refusal
    if not fitting:
        raise UsageError("no target can export with these options", "run `kiln targets` for what each supports")
    if options.device is not None and not any(t.devices for t in fitting):
        raise UsageError(
            f"--device {options.device} applies to none of the targets {', '.join(t.name for t in fitting)}",
            "--device is for targets that compile for a device, e.g. aoti (name it: `all` leaves out targets "
            "that are limited on this machine)",
        )
    return fitting


def _refusal(target: Target, options: ExportOptions) -> KilnError | None:
    """Why `target` cannot export with these options, or None."""
    precision = options.precision_for(target)
    if target.static_shapes and options.dynamic_batch is not None:
        return UsageError(
            f"target {target.name} needs static shapes, but --dynamic-batch {options.dynamic_batch} was given",
            f"export {target.name} without --dynamic-batch, once per batch size you serve "
            "(set the batch of the example inputs)",
        )
    if precision not in target.precisions:
        return UsageError(
            f"target {target.name} does not support precision {precision}",
            f"use one of: {', '.join(target.precisions)}",
        )
    if options.accuracy is not None and (precision != "int8" or not target.accuracy_aware):
        return UsageError(
            f"--max-drop does not apply to target {target.name} at precision {precision}",
            "it is for --precision int8 on targets that can keep layers in float (kiln targets --json: accuracy_aware)",
        )
    if options.accuracy is not None and options.accuracy.max_drop < 0:
        return UsageError(f"--max-drop {options.accuracy.max_drop}: must be 0 or more", "e.g. --max-drop 0.01")
    unsupported_io = [o for o in options.io if o not in target.io_options]
    if unsupported_io:
        return UsageError(
            f"target {target.name} does not support --io {','.join(unsupported_io)}",
            f"it supports: {', '.join(target.io_options) or 'no --io options'}",
        )
    reason = target.unavailable_reason()
    if reason:
        return MissingBackendError(
            f"target {target.name} is not available on this machine: {reason}",
            "install what it needs, or choose another target (kiln targets)",
        )
    try:
        target.check_request(options.build_request(target, None))
    except KilnError as refusal:
        return refusal
    return None


def _names(targets: str | list[str]) -> list[str]:
    return [n.strip() for n in (targets.split(",") if isinstance(targets, str) else targets) if n.strip()]


def _fit_to_source(source: ModelSource, targets: list[Target], every: bool, progress: Progress) -> list[Target]:
    """The targets that can take this source; with `all`, skip the rest, else refuse them."""
    fitting = [t for t in targets if source.kind == "torch" or t.consumes == "onnx"]
    if every and fitting:
        for skipped in (t for t in targets if t not in fitting):
            progress.say(f"skipping {skipped.name}: it needs a PyTorch model, not ONNX")
        return fitting
    for target in targets:
        if target not in fitting:
            raise UsageError(
                f"target {target.name} needs a PyTorch model, but {source.description} is ONNX",
                "give the model as file.py:factory, .pt2 or zoo:NAME, or pick an ONNX-consuming target",
            )
    return targets


def _assemble(staging: Path, builds: list[_Build], single: bool) -> Path:
    """Lay out the final tree: passed builds in place, failed ones under `.rejected/`."""
    tree = staging / "tree"
    if single and builds[0].manifest.published:
        builds[0].directory.rename(tree)
        builds[0].relative = Path()
        return tree
    tree.mkdir()
    for build in builds:
        build.relative = Path(build.target.name) if build.manifest.published else Path(REJECTED, build.target.name)
        (tree / build.relative).parent.mkdir(exist_ok=True)
        build.directory.rename(tree / build.relative)
    return tree
