"""The one-call export, `kiln.export`, composed of the stages (`kiln.compiler.export.stages`):
load -> capture (once per capture group) -> per target, the first route whose optimize -> build -> validate passes
-> finish (parity samples, localization, manifest) -> publish every target in one step.

`export_targets` reads as that flow. The same stages are the library's composable path (`kiln.capture(...)
.optimize(...).build(...).validate(...)`); what only the one-call path adds is here: the targets chosen and
checked before any work, the output directory's lock, the staging directory, text generation, a failure of one of
several targets reported instead of raised, and publishing them together.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from kiln.compiler.capture.pt2_archive import trusting_pickles
from kiln.compiler.capture.sources import load_model
from kiln.compiler.errors import within_kiln
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.export.result import ExportResult, Outcome, TargetFailure, publish
from kiln.compiler.export.routes import TargetFailed, choose_route
from kiln.compiler.export.selection import capture_groups, fit_to_source, select_targets
from kiln.compiler.export.stages import Captured, capture_source
from kiln.compiler.export.staging import check_output_dir, converter_temp_files, output_lock, staging_area
from kiln.compiler.generation.decoding import TEXT_GENERATION
from kiln.compiler.generation.export import (
    check_weight_request,
    generation_detail,
    generation_source,
    generation_targets,
    wants_generation,
)
from kiln.compiler.parity.input_files import check_input_files
from kiln.compiler.progress import Progress
from kiln.targets.base import Target


def export_targets(
    model: str | torch.nn.Module,
    targets: str | list[str],
    out: str | Path,
    options: ExportOptions | None = None,
    example_inputs: Any = None,
    progress: Progress | None = None,
) -> list[ExportResult]:
    """Export one model to one or more targets, each validated against the reference; see `kiln.export`.

    With several targets, one that fails to build or run is reported (`ExportResult.failure`) and the others
    are still published, unless `options.output.all_or_nothing`.
    """
    options = options or ExportOptions()
    progress = progress or Progress(quiet=True)
    out = Path(out)
    chosen = select_targets(targets, options, progress)
    with (
        within_kiln(),  # the stages let a bug's exception pass as it is: the caller decides what it becomes
        output_lock(out, options.output.wait, progress.say),
        trusting_pickles(options.source.trust_pickle),
    ):
        check_output_dir(out, options.output.force)
        check_input_files(options, chosen)
        timings: dict[str, float] = {}  # the stages every target shares
        with progress.timed(timings, "load", model if isinstance(model, str) else type(model).__name__):
            source = load_model(model, example_inputs, options.parity.inputs_files, options.source.folder_request())
        chosen = fit_to_source(source, chosen, targets, progress)
        if wants_generation(source, options.source.task, options.source.cache_size, options.source.llm_format):
            chosen = generation_targets(source, chosen, targets, options, progress.say)
            # int8/int4 builds are weight-only from here (ExportOptions.build_request)
            options = replace(options, source=replace(options.source, task=TEXT_GENERATION))
            with progress.timed(timings, "generation", generation_detail(chosen)):
                source = generation_source(source, chosen, options.source.cache_size)
        else:
            check_weight_request(chosen, options, generation=False)
        outcomes: list[Outcome] = []
        # Work files live in the staging directory too, and so do the converters' own temporary files.
        with staging_area(out) as staging, converter_temp_files(staging / "tmp"):
            for batch, group in capture_groups(source, chosen):
                work = staging / "work" / f"batch{batch or 'example'}"
                captured = capture_source(source, options, work, group, batch, progress, timings)
                captured.prepare(group)
                for target in group:
                    outcomes.append(_export_or_fail(captured, target, staging / "builds", len(chosen)))
            return publish(staging, outcomes, out)


def _export_or_fail(captured: Captured, target: Target, builds: Path, count: int) -> Outcome:
    """One target's export from `captured` into `builds/<target>`: the first route whose stages pass parity (else
    the first that built, rejected), finished with the routes tried; a failure of one of several targets is
    recorded instead of raised."""
    try:
        choice = choose_route(captured, target, builds / target.name)
    except TargetFailed as failed:
        if count == 1 or captured.options.output.all_or_nothing:
            raise failed.error from None
        captured.progress.warn(f"{target.name} failed at {failed.step}: {failed.error.one_line()}")
        return Outcome(target, failure=TargetFailure(failed.step, failed.error.one_line(), failed.error.exit_code))
    finished = choice.validated.finish(choice.tried())
    return Outcome(target, finished.artifact.directory, finished.manifest)


__all__ = ["export_targets"]
