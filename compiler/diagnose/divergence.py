"""Where an artifact diverges from PyTorch: the first module whose output is out of the precision's tolerance.

Target-agnostic: the captured FX program is cut at a module boundary (`kiln.compiler.diagnose.cut`), that prefix is
built as the artifact was (`Recipe`: the same target, route, precision, passes and calibration;
`kiln.compiler.export.optimize.optimize`, `kiln.compiler.export.artifacts.build`), run on the parity inputs and
judged against PyTorch's value of that boundary (`kiln.compiler.parity.gate.validate`, with the gate's tolerance at
that precision: quantized precisions by cosine and SNR, as the gate does). A bisection over the boundaries in
execution order finds the first failing one in about log2(N) builds; a prefix that fails to convert is failing
too, and its error names the op. `localize(captured, recipe, samples, search)` is the method; the export's
validated stage (`kiln.compiler.export.stages.Validated.localized`) calls it after the gate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.program import CapturedModel
from kiln.compiler.diagnose.cut import (
    Boundary,
    eager_check,
    intermediates,
    live_at,
    live_name,
    module_boundaries,
    prefix_program,
    reference_module,
)
from kiln.compiler.diagnose.divergence_record import Divergence, ModuleError
from kiln.compiler.diagnose.fast_path import read_boundaries
from kiln.compiler.diagnose.probe import PROBE, NotBuilt, Probe, Recipe, build_program
from kiln.compiler.errors import KilnError
from kiln.compiler.export.artifacts import Artifact
from kiln.compiler.parity.gate import ParitySamples, validate
from kiln.compiler.progress import Progress

if TYPE_CHECKING:
    from kiln.compiler.types import ParityReport
    from kiln.targets.base import Route, Target

FOLLOWING = 3  # modules listed after the first diverging one


@dataclass(frozen=True, kw_only=True)
class Search:
    """How a localization searches: `method` `auto` (the runtime's fast path where it has one, else bisection) or
    `bisection`; `every`: build every boundary (a per-module error profile; N builds) instead of bisecting;
    `output_failed`: the whole model is known to fail (the gate said so), so no build of it is needed."""

    method: str = "auto"
    every: bool = False
    output_failed: bool = True


def localize(
    source: CapturedModel,
    recipe: Recipe,
    samples: ParitySamples,
    search: Search = Search(),
    *,
    workdir: Path,
    progress: Progress | None = None,
) -> Divergence:
    """The first module of `source` (its captured FX program) whose output diverges from PyTorch when built as
    `recipe` says (target, route, precision, calibration, passes) and judged on `samples`' inputs, searched as
    `search` says.

    When the output is not known to fail (`search.output_failed` False), the last boundary is built first and, if
    it passes, nothing diverges. The `auto` method reads the boundaries from the runtime in one build where it can
    (`kiln.compiler.diagnose.fast_path`) and the answer is certain, else bisects. Every prefix is built by
    `recipe.route`, the route that produced the artifact (`target_info.route`; None: the default capture, the
    dynamo exporter for an ONNX target).
    """
    assert source.exported is not None, "localize needs the captured FX program"
    started = time.perf_counter()
    progress = progress or Progress(quiet=True)
    bounds = module_boundaries(source.exported)
    probe = Probe(source, recipe, samples, workdir, progress, reference_module(source.exported), bounds=bounds)
    checked = eager_check(source.eager, source.exported, bounds, samples.inputs[0]) if source.eager and bounds else ""
    found, first, used = _search(probe, bounds, search)
    error = found[first] if first is not None else None
    following = [found.get(b.index) or ModuleError.at(b) for b in bounds[(first or 0) + 1 :][:FOLLOWING]]
    route, target = recipe.route, recipe.target
    outputs_only = first is None and search.output_failed and not search.every
    return Divergence(
        target=target.name,
        precision=recipe.request.precision,
        first=error,
        inputs=found.get(first - 1) if first else None,
        following=following if first is not None else [],
        measured=[found[i] for i in sorted(found)],
        boundaries=len(bounds),
        builds=probe.builds,
        seconds=round(time.perf_counter() - started, 2),
        conversion_error=error.reason.removeprefix("conversion failed: ") if error and _unconverted(error) else None,
        notes=_notes(bounds, outputs_only, route is None and len(target.routes()) > 1),
        method=used,
        tolerance=_tolerance(recipe.tolerance()),
        route=route.name if route is not None else "",
        reference=checked or "boundary values from the program the user gave (a .pt2): it is the model",
    )


def _notes(bounds: list[Boundary], outputs_only: bool, route_unknown: bool) -> list[str]:
    """What the record says beside its answer: the route was not known, no module to cut at, or every boundary
    passes while the outputs fail (`outputs_only`)."""
    notes = []
    if route_unknown:
        notes.append("prefixes built by the default capture: the route that produced the artifact is not known")
    if not bounds:
        notes.append("the model has no submodule to cut at: every op is in its own forward()")
    elif outputs_only:
        notes.append(
            f"the outputs fail but every module boundary passes: it diverges in forward()'s own ops after "
            f"{bounds[-1].label()}"
        )
    return notes


def _search(probe: Probe, bounds: list[Boundary], search: Search) -> tuple[dict[int, ModuleError], int | None, str]:
    """Every boundary measured, the first failing one and how it was found: `fast-path` (every boundary up to the
    first failing one read from the runtime in one build), `fast-path+bisection` (the runtime's boundaries narrow
    the search to the unmapped ones between the last passing and the first failing one, which are bisected),
    `bisection`, or `every` (each boundary built)."""
    every, output_failed = search.every, search.output_failed
    fast = read_boundaries(probe, bounds) if search.method != "bisection" else None
    found: dict[int, ModuleError] = dict(fast or {})
    failing = [i for i in sorted(found) if not found[i].passed]
    first = failing[0] if failing else None
    if fast and all(i in fast for i in range(len(bounds) if first is None else first + 1)):
        return found, first, "fast-path"
    if every:
        probe.frontier = False  # each boundary is built on its own
        for boundary in bounds:
            found[boundary.index] = found.get(boundary.index) or _measure(probe, boundary)[boundary.index]
        return found, next((i for i in sorted(found) if not found[i].passed), None), "every"
    if fast and (first is not None or output_failed):
        low = max((i + 1 for i in found if found[i].passed and (first is None or i < first)), default=0)
        high = len(bounds) if first is None else first
        return found, _bisect(probe, bounds, found, True, low, high), "fast-path+bisection"
    found = {}
    return found, _bisect(probe, bounds, found, output_failed), "bisection"


def _tolerance(tolerance: Any) -> dict[str, Any]:
    return {key: value for key, value in asdict(tolerance).items() if key != "min_agreement"}


def _bisect(
    probe: Probe,
    bounds: list[Boundary],
    found: dict[int, ModuleError],
    output_failed: bool,
    low: int = 0,
    high: int | None = None,
) -> int | None:
    """The index of the first failing boundary (None: none fails), building about log2(N) prefixes.

    Invariant: every boundary below `low` passes (`low` - 1 was built and passed with every boundary still live
    at it, or is the model's inputs) and boundary `high` fails (`high` == N: the model's output, known to fail);
    `low`, `high`: a narrower start. A prefix fails when its boundary or one still live at its cut fails (a
    branch computed earlier and consumed later); the first failing one is the new `high`."""
    high = len(bounds) if high is None else high
    if not bounds:
        return None
    if not output_failed:
        low, high = _step(probe, bounds[-1], found, low, len(bounds))
        if low == len(bounds):
            return None
    while low < high:
        low, high = _step(probe, bounds[(low + high) // 2], found, low, high)
    return high if high < len(bounds) else None


def _step(probe: Probe, boundary: Boundary, found: dict[int, ModuleError], low: int, high: int) -> tuple[int, int]:
    """Build the prefix cut at `boundary` and narrow (`low`, `high`): past it when it and every boundary live at
    its cut pass, else to the first of them that fails (one judged before, below `low`, is left as it was)."""
    measured = _measure(probe, boundary)
    for index, error in measured.items():
        if index == boundary.index or index not in found:
            found[index] = error
    failing = [i for i in sorted(measured) if not measured[i].passed and i >= low]
    return (low, failing[0]) if failing else (boundary.index + 1, high)


def _measure(probe: Probe, boundary: Boundary) -> dict[int, ModuleError]:
    """Build the program cut at `boundary` for the target and judge its output and those of the boundaries still
    live at the cut (by boundary index); one progress line."""
    started = time.perf_counter()
    probe.builds += 1
    work = probe.work / f"boundary-{boundary.index:04d}"
    result = ModuleError.at(boundary)
    result.measured = True
    live: dict[int, ModuleError] = {}
    try:
        artifact, samples, names = _build(probe, boundary, work)
        tolerance = probe.recipe.thresholds.tolerance(artifact.manifest.precision)
        for metrics in validate(artifact, samples, tolerance, "PyTorch intermediate").outputs:
            index = names[metrics.name]
            b = probe.bounds[index] if index != boundary.index else boundary
            error = result if index == boundary.index else ModuleError.at(b)
            error.take(metrics)
            if error is not result:
                error.cut_at = boundary.index
                live[index] = error
    except NotBuilt as failed:
        result.passed, result.reason = False, f"conversion failed: {failed.error.one_line()}"
        result.cosine, result.snr_db = 0.0, -math.inf
    except KilnError as error:
        result.passed, result.reason = False, error.one_line()  # the cut, or running the built prefix, failed
        result.cosine, result.snr_db = 0.0, -math.inf
    verdict = "ok  " if result.passed and all(e.passed for e in live.values()) else "FAIL"
    seconds = time.perf_counter() - started
    failing = [e.label() for e in live.values() if not e.passed]
    also = f"; live at the cut: {len(live)}" + (f", failing {', '.join(failing)}" if failing else "") if live else ""
    probe.progress.say(
        f"localize {probe.target.name} build {probe.builds}: [{boundary.index + 1}/{len(probe.bounds)}] {verdict} "
        f"{boundary.label()} {result.figures() if not _unconverted(result) else result.reason}{also} "
        f"({seconds:.1f}s)"
    )
    return {**live, boundary.index: result}


def _build(probe: Probe, boundary: Boundary, work: Path) -> tuple[Artifact, ParitySamples, dict[str, int]]:
    """The prefix up to `boundary` (its outputs: the boundary's tensor, then those of the boundaries still live at
    the cut), optimized and built as the export was; the parity inputs with PyTorch's values of those boundaries
    as the reference; and the boundary index of each output name."""
    assert probe.captured.exported is not None
    program = probe.captured.exported
    live = live_at(program, probe.bounds, boundary) if probe.frontier and probe.bounds else []
    example = list(probe.samples.inputs[0].values())
    prefix = prefix_program(probe.captured, boundary, example, PROBE, live)
    artifact, _ = build_program(probe, prefix, work)
    names = {PROBE: boundary.index} | {live_name(PROBE, b): b.index for b in live}
    nodes = {name: (boundary if index == boundary.index else probe.bounds[index]).node for name, index in names.items()}
    # PyTorch's value of the boundaries, computed when needed: keeping every boundary's would cost N activations
    values = [intermediates(program, list(nodes.values()), feeds, probe.reference) for feeds in probe.samples.inputs]
    reference = [{name: value[node] for name, node in nodes.items()} for value in values]
    return artifact, ParitySamples(probe.samples.inputs, probe.samples.origins, reference), names


def route_named(target: Target, name: str | None) -> Route | None:
    """The target's route called `name` (a manifest's `target_info.route`), or None."""
    return next((r for r in target.routes() if r.name == name), None)


def _unconverted(error: ModuleError) -> bool:
    return error.reason.startswith("conversion failed: ")


def wanted(when: bool | None, report: ParityReport, captured: CapturedModel) -> bool:
    """Whether an export localizes (`when`: `ParityOptions.localize`): on a parity failure unless `--no-localize`,
    always with `--localize`; only for a PyTorch source (an FX program to cut)."""
    if captured.exported is None or when is False:
        return False
    return bool(when) or not report.passed
