"""The export's stages as objects, each carrying its own state (as ExecuTorch's `to_edge(...).to_backend(...)
.to_executorch()` and Polygraphy's loaders and runners):

    captured = kiln.capture(model, (example,))      # Captured: the graphs, the reference, the calibration data
    optimized = captured.optimize("onnx")           # Optimized: one target's graph by one route, after its passes
    built = optimized.build(precision="fp32")       # Built: the artifact
    validated = built.validate()                    # Validated: its parity report against the model
    result = validated.save("exports/model")        # published (or kept under .rejected/), as kiln.export does

Each stage holds the `ExportOptions` it was made with; a step's keyword (`passes`, `precision`, `thresholds`)
replaces that group for it and the stages after it. Each step raises only Kiln's exceptions (`kiln_errors_only`).

`kiln.export` (`kiln.compiler.export.pipeline`) composes the same stages: one Captured per capture group
(`capture_source`, `Captured.prepare`), and per target the first route whose Optimized -> Built -> Validated chain
passes (`kiln.compiler.export.routes.choose_route`), finished (`Validated.finish`) and published with the others.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kiln.compiler.capture.program import CapturedModel, capture, lower
from kiln.compiler.capture.pt2_archive import trusting_pickles
from kiln.compiler.capture.sources import ModelSource, load_model
from kiln.compiler.diagnose.divergence import Search, localize, wanted
from kiln.compiler.diagnose.probe import Recipe
from kiln.compiler.diagnose.profile_html import HTML_FILE, write_profile
from kiln.compiler.errors import KilnError, UnsupportedOpError, UsageError, error_text, kiln_errors_only
from kiln.compiler.export.artifacts import Artifact, build, hash_files
from kiln.compiler.export.manifest import assemble_manifest, observed_outputs, source_record
from kiln.compiler.export.optimize import optimize
from kiln.compiler.export.options import ExportOptions, OutputOptions, PassOptions, Thresholds, export_options
from kiln.compiler.export.result import ExportResult, Outcome, publish
from kiln.compiler.export.route_graphs import RouteGraphs
from kiln.compiler.export.selection import example_batch, refusal
from kiln.compiler.export.staging import check_output_dir, output_lock, staging_area
from kiln.compiler.generation.decoding import TEXT_GENERATION
from kiln.compiler.generation.export import (
    check_weight_request,
    generation_samples,
    generation_streams,
    name_generation_io,
    skip_localization,
    wants_generation,
    with_generation,
)
from kiln.compiler.generation.stream_gate import TokenStream, stream_gated
from kiln.compiler.memory import peak_rss, release_pages, trim_heap
from kiln.compiler.parity.gate import QUANTIZED_PRECISIONS, QUANTIZED_SAMPLES, ParitySamples, validate
from kiln.compiler.parity.input_files import check_input_files
from kiln.compiler.parity.reference import reference_samples
from kiln.compiler.progress import Progress
from kiln.compiler.quantization.calibration import NO_HELD_BACK, NOT_REPRESENTATIVE, CalibrationData, load_calibration
from kiln.compiler.types import Manifest, ParityReport, PassRecord
from kiln.targets import get_target
from kiln.targets.base import BuildRequest, Route, Target


class Captured:
    """A model captured once (its FX program and/or ONNX graph, `graph`) and what every target built from it
    shares: the source, the options, a work directory, each route's graph with the pass pipelines already run on
    it (`routes`), the calibration data and the reference outputs on the parity inputs (made on first use, or for
    a known group of targets by `prepare`)."""

    def __init__(
        self,
        source: ModelSource,
        graph: CapturedModel,
        options: ExportOptions,
        work: Path,
        progress: Progress | None = None,
        timings: dict[str, float] | None = None,
        lowering_failure: KilnError | None = None,
    ):
        self.source, self.graph, self.options, self.work = source, graph, options, work
        self.progress = progress or Progress(quiet=True)
        self.timings = {} if timings is None else timings  # the shared stages' seconds (load, capture, ...)
        self.routes = self._route_graphs(lowering_failure)
        # lowered to ONNX already, or never to be (an .onnx source, or a lowering that failed)
        self._lowered = graph.onnx_path is not None or graph.exported is None or lowering_failure is not None
        self._calibration: CalibrationData | None = None
        self._calibrated = False
        self._samples: ParitySamples | None = None
        self._quantized_samples = False
        self._streams: list[TokenStream] | None = None
        self.removes_work: weakref.finalize | None = None  # a work directory of its own (kiln.capture)

    def close(self) -> None:
        """Remove the work directory now if it is the Captured's own (`kiln.capture`): the artifacts built from
        it go with it (`Validated.save` copies one out first)."""
        if self.removes_work is not None:
            self.removes_work()

    @kiln_errors_only
    def optimize(
        self,
        target: Target | str,
        *,
        passes: PassOptions | None = None,
        route: Route | None = None,
        timings: dict[str, float] | None = None,
    ) -> Optimized:
        """The graph `target` takes by `route` (None: its first route this source can take), with the target's
        passes run on it (`passes`: instead of the options'; `timings`: where the seconds of this target's stages
        are added, e.g. over several routes)."""
        target = get_target(target) if isinstance(target, str) else target
        batch = example_batch(self.source)
        if batch is not None and target.fixed_batch not in (None, batch):
            raise UsageError(
                f"target {target.name} builds at batch {target.fixed_batch}, the capture is at batch {batch}",
                f"capture it with example inputs of batch {target.fixed_batch} (kiln.export does that itself)",
            )
        self._lower_for(target)
        route = route or self.first_route(target)
        options = self.options if passes is None else replace(self.options, passes=passes)
        timings = {} if timings is None else timings
        graph = self.routes.graph(route, target)
        with self.progress.timed(timings, f"passes {target.name}", f"-O{options.passes.level}"):
            done = self.routes.optimized_for(route)
            graph, records = optimize(graph, target, self.routes.work_for(route), options.passes, done, route.consumes)
        for record in records:
            if record.rolled_back:
                self.progress.warn(f"pass {record.name} was rolled back: {record.rolled_back}")
        return Optimized(self, target, route, graph, records, options, timings)

    def first_route(self, target: Target) -> Route:
        """The first of `target`'s routes this source can take."""
        routes = self.routes.applicable(target)
        if not routes:
            raise UnsupportedOpError(f"{target.name} has no route from this model", None)
        return routes[0]

    def prepare(self, targets: list[Target]) -> None:
        """Make now what `targets` share, in the order an export reports it: the calibration data (`calibrate`),
        then the reference outputs on the parity inputs (with the quantized precisions' extra sets when one of
        them is quantized)."""
        self.calibrate(targets)
        self._reference(any(self.options.precision_for(t) in QUANTIZED_PRECISIONS for t in targets))
        for target in targets:
            self.streams_for(self.options.precision_for(target))

    def calibrate(self, targets: list[Target]) -> CalibrationData | None:
        """The calibration data of `targets`: loaded when one of them is built at calibrated int8 (loud when it is
        random), else none (and `--calib` is said to be ignored)."""
        if any(self.options.precision_for(t) == "int8" for t in targets):
            return self.calibration_for("int8")
        if self.options.calibration.spec.source is not None:
            self.progress.say("--calib is ignored: no target is exported at precision int8")
        self._calibrated = True
        return None

    def calibration_for(self, precision: str) -> CalibrationData | None:
        """The calibration data a build at `precision` gets (loaded on first use by an int8 build; none for text
        generation, whose int8 is weight-only)."""
        if precision == "int8" and not self._calibrated and self.source.task != TEXT_GENERATION:
            self._calibrated = True
            spec = self.options.calibration.spec
            examples = [t.detach().cpu().numpy() for t in self.source.example_inputs]
            with self.progress.timed(self.timings, "calibration", spec.describe()):
                self._calibration = load_calibration(spec, self.graph.inputs, examples, QUANTIZED_SAMPLES)
            if not self._calibration.representative:
                self.progress.warn(NOT_REPRESENTATIVE)
        return self._calibration

    def samples_for(self, precision: str) -> ParitySamples:
        """The parity input sets an artifact of `precision` is judged on, with the reference outputs on each."""
        quantized = precision in QUANTIZED_PRECISIONS
        if self._samples is None or (quantized and not self._quantized_samples):
            self.calibration_for(precision)  # an int8 gate judges on held-back calibration rows first
            self._reference(quantized)
        assert self._samples is not None
        return self._samples.for_precision(precision)

    def streams_for(self, precision: str) -> list[TokenStream] | None:
        """The token streams a weight-quantized text-generation artifact of `precision` is judged on
        (kiln.compiler.generation.stream_gate), made by the user's model once for every target; else None."""
        if self.source.task != TEXT_GENERATION or not stream_gated(precision):
            return None
        if self._streams is None:
            with self.progress.timed(self.timings, "streams", f"{self.source.reference_name}, teacher-forced"):
                self._streams = generation_streams(self.source, self.graph)
        return self._streams

    def calibration_notes(self, precision: str) -> list[str]:
        """What a manifest says of the calibration of a build at `precision`: random, or nothing held back."""
        data = self._calibration
        if data is None or precision != "int8":
            return []
        return [NOT_REPRESENTATIVE] if not data.representative else [] if data.held_back else [NO_HELD_BACK]

    def new_dir(self, name: str) -> Path:
        """A path in the work directory that does not exist yet, named `name` (or `name-2`, ...)."""
        path, count = self.work / name, 1
        while path.exists():
            count += 1
            path = self.work / f"{name}-{count}"
        return path

    def _reference(self, quantized: bool) -> None:
        calibration = self._calibration
        held = calibration.held_back_sets(self.graph.inputs, QUANTIZED_SAMPLES) if calibration is not None else []
        with self.progress.timed(self.timings, "reference", f"{self.source.reference_name} on parity inputs"):
            if self.source.task == TEXT_GENERATION:
                self._samples = generation_samples(self.source, self.graph, self.options)
            else:
                self._samples = reference_samples(self.source, self.graph, self.options, quantized, held)
        self._quantized_samples = quantized
        settle(self.source)

    def _lower_for(self, target: Target) -> None:
        """Lower the program to ONNX the first time a target that consumes ONNX asks, as an export whose
        targets need it does at capture (the first exporter that converts; its failure fails the ONNX routes)."""
        if self._lowered or target.consumes != "onnx":
            return
        self._lowered, failure = True, None
        with self.progress.timed(self.timings, "capture", "-> ONNX"):
            try:
                self.graph = lower(self.graph, self.work, self.options.passes.level > 0)
            except UnsupportedOpError as error:
                failure = error
        self.routes = self._route_graphs(failure)

    def _route_graphs(self, failure: KilnError | None) -> RouteGraphs:
        """Each route's graph of this capture (`failure`: the ONNX lowering's, which fails the ONNX routes)."""
        level, source = self.options.passes.level, self.source
        return RouteGraphs(self.graph, self.work, level > 0, failure, source.task, self.options.source.llm_format)


def capture_source(
    source: ModelSource,
    options: ExportOptions,
    work: Path,
    targets: list[Target] | tuple[Target, ...] = (),
    batch: int | None = None,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> Captured:
    """Capture `source` (at `batch`: a target's fixed batch; None: the example's) once into `work` for `targets`
    (none: lowered to ONNX when a target first needs it). With targets that take the FX program too, a failed ONNX
    lowering fails only the ONNX routes (unless `--all-or-nothing`)."""
    source = source.with_batch(batch) if batch else source
    progress = progress or Progress(quiet=True)
    timings = {} if timings is None else timings
    to_onnx = any(t.consumes == "onnx" for t in targets)
    mixed = to_onnx and source.kind == "torch" and any(r.consumes != "onnx" for t in targets for r in t.routes())
    failure = None
    via = "ONNX" if source.kind == "onnx" else "torch.export" + " -> ONNX" * to_onnx
    with progress.timed(timings, "capture", via + (f" at batch {batch}" if batch else "")):
        optimize_onnx = options.passes.level > 0
        captured = capture(source, options.shapes.dynamic, work, to_onnx and not mixed, optimize_onnx)
        if mixed:
            try:
                captured = lower(captured, work, optimize_onnx)
            except UnsupportedOpError as error:
                if options.output.all_or_nothing:
                    raise
                failure = error
        captured = name_generation_io(captured) if source.task == TEXT_GENERATION else captured
    return Captured(source, captured, options, work, progress, timings, failure)


@kiln_errors_only
def capture_model(model: torch.nn.Module | str | Path, example_inputs: Any = None, **options: Any) -> Captured:
    """`kiln.capture`: load and capture `model` (a module with `example_inputs`, or a source string like
    `zoo:cnn`) with the export options `options` (the keywords of `kiln.export`), into a temporary work
    directory removed with the Captured (or by `close`)."""
    settings = export_options(**options)
    check_input_files(settings)
    work = Path(tempfile.mkdtemp(prefix="kiln-capture-"))
    try:
        with trusting_pickles(settings.source.trust_pickle):
            source = load_model(model, example_inputs, settings.parity.inputs_files, settings.source.folder_request())
        if wants_generation(source, settings.source.task, settings.source.cache_size, settings.source.llm_format):
            raise UsageError(
                f"{source.description} is exported for text generation, which the stages do not compose yet",
                "use kiln.export(...) for it, or pass task='forward' for one full-sequence forward",
            )
        captured = capture_source(source, settings, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    captured.removes_work = weakref.finalize(captured, shutil.rmtree, work, True)
    return captured


def settle(source: ModelSource) -> None:
    """Between the steps that read the weights in turn (the model for the reference, a converter, a runtime): free
    what the last step left (its garbage, a runtime session) and drop the resident pages of the model's
    memory-mapped weights (`kiln.compiler.memory.release_pages`), so that the steps do not add up one copy of the
    weights each in this process's memory."""
    gc.collect()
    trim_heap()
    release_pages(addresses=source.weight_addresses())


def carry_files(files: dict[str, Path], directory: Path) -> None:
    """Copy the files the source carries into the export (a checkpoint folder's tokenizer), at their relative
    paths; the manifest lists and hashes them like the artifact's own."""
    for relative, path in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, directory / relative)


@dataclass
class Optimized:
    """One target's graph by one of its routes, with the target's passes run on it (`records`: what each did)."""

    captured: Captured
    target: Target
    route: Route
    graph: CapturedModel
    records: list[PassRecord]
    options: ExportOptions
    timings: dict[str, float] = field(default_factory=dict)  # this target's stage times

    @kiln_errors_only
    def build(self, precision: str | None = None, *, directory: Path | None = None) -> Built:
        """The artifact of this graph at `precision` (None: the options', else the target's default), built into
        the new directory `directory` (None: one in the capture's work directory)."""
        options = self.options if precision is None else replace(self.options, precision=precision)
        refused = refusal(self.target, options)
        if refused is not None:
            raise refused
        if self.captured.source.task != TEXT_GENERATION:  # int4, --group-size, --weights: text generation's
            check_weight_request([self.target], options, generation=False)
        precision = options.precision_for(self.target)
        calibration = self.captured.calibration_for(precision)
        request = replace(
            options.build_request(self.target, calibration),
            route=self.route.name,
            language_model=self.captured.source.language_model,
        )
        directory = directory or self.captured.new_dir(f"build-{self.target.name}")
        detail = self.target.stage_detail(self.graph, request)
        settle(self.captured.source)
        with self.captured.progress.timed(self.timings, f"build {self.target.name}", detail):
            artifact = build(self.target, self.graph, request, directory)
        return Built(self, artifact, request, options)


@dataclass
class Built:
    """An artifact built from an optimized graph, with the request it was built for."""

    optimized: Optimized
    artifact: Artifact
    request: BuildRequest
    options: ExportOptions

    @property
    def target(self) -> Target:
        return self.optimized.target

    @kiln_errors_only
    def validate(self, thresholds: Thresholds | None = None) -> Validated:
        """The parity gate on this artifact: run on the capture's parity inputs and judged against the reference
        outputs within its precision's tolerance with `thresholds` (None: the options')."""
        options = self.options if thresholds is None else replace(self.options, thresholds=thresholds)
        captured, name, precision = self.optimized.captured, self.target.name, self.request.precision
        samples = captured.samples_for(precision)
        tolerance = options.thresholds.tolerance(precision)
        timings, progress, source = self.optimized.timings, captured.progress, captured.source
        settle(source)
        with progress.timed(timings, f"validate {name}", f"{len(samples.inputs)} input sets"):
            report = validate(self.artifact, samples, tolerance, source.reference_name)
        if source.task == TEXT_GENERATION:
            streams = captured.streams_for(precision)
            what = "teacher-forced streams" if streams else "greedy tokens"
            with progress.timed(timings, f"generate {name}", f"{what} vs the reference"):
                report = with_generation(report, self.artifact, source, streams)
            settle(source)
        return Validated(self.optimized, self.artifact, self.request, options, report, samples)

    def first_inputs(self) -> dict[str, np.ndarray]:
        """The first parity input set at this artifact's precision: what `kiln.bench` times by default."""
        return self.optimized.captured.samples_for(self.request.precision).inputs[0]


@dataclass
class Validated(Built):
    """A built artifact with its parity report against the model; `finish` stores what an export directory holds
    beside the artifact (parity samples, localization, manifest), `save` publishes it."""

    report: ParityReport
    samples: ParitySamples
    manifest: Manifest | None = None  # written by `finish`

    @property
    def passed(self) -> bool:
        return self.report.passed

    @kiln_errors_only
    def localized(self, search: Search | None = None) -> Validated:
        """This stage with where the artifact diverges from the model (`report.divergence`; divergence.json and
        divergence.html written next to the artifact), searched as `search` says (None: bisecting, or one build
        where the runtime exposes the module boundaries). A localization that breaks costs a warning, never the
        export."""
        captured, target = self.optimized.captured, self.target
        calibration = captured.calibration_for(self.request.precision)
        recipe = Recipe.of(target, self.options, calibration, self.optimized.route)
        search = search or Search(output_failed=not self.report.passed)
        work = captured.new_dir(f"localize-{target.name}")
        try:
            found = localize(captured.graph, recipe, self.samples, search, workdir=work, progress=captured.progress)
        except Exception as error:  # a diagnostic must not turn a parity verdict into a crash
            captured.progress.warn(f"localization failed: {error_text(error, 200)}")
            return self
        found.write(self.artifact.directory)
        write_profile([found], self.artifact.directory / HTML_FILE)
        return replace(self, report=replace(self.report, divergence=found.to_dict()))

    @kiln_errors_only
    def finish(self, tried: list[dict[str, str]] | None = None) -> Validated:
        """Store the parity samples next to the artifact, localize when wanted (`ParityOptions.localize`: on a
        parity failure by default), and write the manifest: where the model came from, the passes, the notes,
        the verdict, the stage times, every file's hash, and for a target of several routes the route that
        built it and why the others `tried` were not used. This stage with its manifest."""
        captured, directory = self.optimized.captured, self.artifact.directory
        progress = captured.progress
        carry_files(captured.source.carried, directory)
        for note in self.artifact.manifest.notes:
            progress.say(f"note: {note}")
        notes = [] if self.samples.save(directory) else ["parity samples too large to store: verify needs --model"]
        notes += captured.calibration_notes(self.request.precision)
        options = self.options
        if captured.source.task == TEXT_GENERATION:
            options = skip_localization(options, self.report, progress)
        localize = self.report.divergence is None and wanted(options.parity.localize, self.report, captured.graph)
        done = self.localized() if localize else self
        assert self.artifact.parts is not None
        parts = replace(
            self.artifact.parts,
            source=source_record(captured.source),
            passes=self.optimized.records,
            notes=notes,
            parity=done.report,
            parity_gate=options.parity.gate,
            timings=captured.timings | self.optimized.timings,
            files=hash_files(directory),
        )
        manifest = assemble_manifest(parts)
        manifest.outputs = observed_outputs(manifest.outputs, done.report)
        manifest.host = {**manifest.host, "peak_rss": peak_rss(), "peak_rss_by_stage": dict(progress.peaks)}
        if len(self.target.routes()) > 1:
            manifest.target_info |= {"route": self.optimized.route.name, "routes_tried": tried or []}
        manifest.write(directory)
        progress.say(done.report.summary().replace("\n", "\n[kiln]   "))
        return replace(done, manifest=manifest)

    @kiln_errors_only
    def save(self, out: str | Path, output: OutputOptions | None = None) -> ExportResult:
        """Publish this artifact to `out` as `kiln.export` does (finished first if it is not): in place when it
        passed parity (or the gate is off), else under `out/.rejected/<target>`; an existing `out` is refused
        unless `output.force` (None: the options'). The result says whether it was published."""
        finished = self if self.manifest is not None else self.finish()
        output, out = output or self.options.output, Path(out)
        with output_lock(out, output.wait, finished.optimized.captured.progress.say):
            check_output_dir(out, output.force)
            with staging_area(out) as staging:
                copy = staging / "builds" / self.target.name
                shutil.copytree(finished.artifact.directory, copy)
                (result,) = publish(staging, [Outcome(self.target, copy, finished.manifest)], out)
        return result
