"""The optimize step: each target's pass pipeline over the graph it consumes (the ONNX graph or the FX program)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError, error_text
from kiln.compiler.large_graphs import load_ir, save_onnx, snapshot
from kiln.passes import pipeline_for, run_pipeline
from kiln.passes.base import FX, ONNX
from kiln.passes.graphs import dump_graph

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.export.options import PassOptions
    from kiln.compiler.types import PassRecord
    from kiln.targets.base import Target


def optimize(
    model: CapturedModel,
    target: Target,
    work: Path,
    passes: PassOptions,
    done: dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]],
    consumes: str | None = None,
) -> tuple[CapturedModel, list[PassRecord]]:
    """Run the target's passes (`passes`: the level's pipeline with the user's adjustments, or an explicit one)
    over the graph it consumes (`consumes`, when given: the graph of the route being
    built, "onnx" or "torch"); the optimized model and what each pass did.

    `done` holds the pipelines already run on this same graph for other targets, so that one is run once.
    """
    ir = FX if (consumes or target.consumes) == "torch" else ONNX
    if passes.pipeline is not None:
        chosen = [p for p in passes.pipeline if p.ir == ir]
    else:
        chosen = pipeline_for(ir, target.name, passes.level, passes.adjustments)
    key = (ir, *(p.name for p in chosen))
    dump = passes.dump / target.name if passes.dump is not None else None
    if key in done:
        if dump is not None:
            _dump_final(done[key][0], ir, dump)
        return done[key]
    if ir == ONNX and model.onnx_path is not None:
        graph, records = run_pipeline(load_ir(model.onnx_path), chosen, dump)
        destination = work / f"optimized-{len(done)}" / "model.onnx"
        destination.parent.mkdir(parents=True)
        done[key] = replace(model, onnx_path=_save(graph, destination, model.onnx_path)), records
    elif ir == FX and model.exported is not None and chosen:
        # FX passes may change the program in place: the capture is shared with other targets (the copy shares the
        # weights: a pass gives a weight a new value by replacing it in the copy's state dict, never in place).
        program, records = run_pipeline(snapshot(model.exported), chosen, dump)
        done[key] = replace(model, exported=program), records
    else:
        done[key] = model, []
        if dump is not None:
            _dump_final(model, ir, dump)
    return done[key]


def _save(graph: Any, destination: Path, given: Path) -> Path:
    """`save_onnx` of the optimized graph. When it cannot be serialized because the graph the passes were given
    cannot be either (a name that is not UTF-8, which ONNX's checker and ONNX Runtime let through), that is bad
    input (UsageError naming the problem), not a bug of the passes."""
    import onnx_ir

    try:
        return save_onnx(graph, destination)
    except onnx_ir.serde.SerdeError as error:
        try:
            onnx_ir.serde.serialize_model(load_ir(given))
        except Exception:  # the input itself: reported with the error of the optimized graph (the same one)
            raise UsageError(
                f"the ONNX graph cannot be serialized: {_serde_problem(error)}",
                "the model breaks the ONNX format (e.g. a name that is not UTF-8 text): re-export it",
            ) from None
        raise  # the input serializes, the passes' output does not: a bug


def _serde_problem(error: BaseException) -> str:
    """The innermost object a serialization failed on, and why, in one line."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    innermost = next((e for e in reversed(chain) if type(e).__name__ == "SerdeError"), error)
    called, _, where = str(innermost).partition(" with: ")  # "Error calling serialize_node_into with: Node(..."
    what = called.rpartition("serialize_")[2].removesuffix("_into")
    where = f"{what} {' '.join(where.split())}"
    where = where if len(where) <= 100 else where[:97] + "..."
    root = chain[-1]
    return f"{where}: {error_text(root, 200)}"


def _dump_final(model: CapturedModel, ir: str, dump: Path) -> None:
    """For --dump-passes: the graph a target received from a pipeline already run for another target."""
    graph: Any = model.exported
    if ir == ONNX:
        graph = load_ir(model.onnx_path) if model.onnx_path is not None else None
    if graph is not None:
        dump_graph(graph, dump / "final")
