"""The optimize step: each target's pass pipeline over the graph it consumes (the ONNX graph or the FX program)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from passes import FX, ONNX, dump_graph, pipeline_for, run_pipeline, save_onnx

if TYPE_CHECKING:
    from compiler.capture import CapturedModel
    from compiler.options import ExportOptions
    from compiler.types import PassRecord
    from targets.base import Target


def optimize(
    model: CapturedModel,
    target: Target,
    work: Path,
    options: ExportOptions,
    done: dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]],
    consumes: str | None = None,
) -> tuple[CapturedModel, list[PassRecord]]:
    """Run the target's passes over the graph it consumes (`consumes`, when given: the graph of the route being
    built, "onnx" or "torch"); the optimized model and what each pass did.

    `done` holds the pipelines already run on this same graph for other targets, so that one is run once.
    """
    ir = FX if (consumes or target.consumes) == "torch" else ONNX
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
        destination.parent.mkdir(parents=True)
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
