"""Graph passes over the ONNX graph (onnx_ir) and the FX graph (torch.export), and the pipelines that run them.

A pass (`kiln.passes.base.Pass`) is a small named unit: it takes a graph and returns the graph and whether it
changed anything, the way `onnx_ir.passes` does. A pipeline is the list of passes chosen for one target
at one optimization level (`-O0` none, `-O1` cleanup, `-O2` fusion, `-O3` target-specific), adjusted
by `--passes +name,-name`; passes always run in the registry's order below.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.passes import channels_last, cleanup, fusion, fx
from kiln.passes.base import DEFAULT_LEVEL, FX, LEVELS, ONNX, Pass, PassResult

if TYPE_CHECKING:
    from kiln.compiler.types import PassRecord

__all__ = ["DEFAULT_LEVEL", "FX", "LEVELS", "ONNX", "PASSES", "Pass", "PassAdjustments", "PassResult"]

PASSES: dict[str, Pass] = {
    p.name: p for p in [*cleanup.PASSES, *fusion.PASSES, *channels_last.PASSES, *cleanup.FINAL, *fx.PASSES]
}


@dataclass(frozen=True)
class PassAdjustments:
    """`--passes +name,-name`: passes added to or removed from the level's pipeline."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> PassAdjustments:
        """Parse `+name,-name` (a bare name means +name); unknown names are refused with a suggestion."""
        from kiln.compiler.errors import UsageError

        added: list[str] = []
        removed: list[str] = []
        for item in (part.strip() for part in (text or "").split(",")):
            if not item:
                continue
            name = item.lstrip("+-").strip()
            if name not in PASSES:
                close = difflib.get_close_matches(name, PASSES, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UsageError(f"--passes: unknown pass '{name}'", f"{hint}run `kiln passes` for the list")
            (removed if item.startswith("-") else added).append(name)
        return cls(tuple(added), tuple(removed))


def pipeline_for(ir: str, target: str, level: int = DEFAULT_LEVEL, adjust: PassAdjustments | None = None) -> list[Pass]:
    """The passes run over `ir` for `target` at `level`, with the user's adjustments, in registry order."""
    from kiln.compiler.errors import UsageError

    if level not in LEVELS:
        raise UsageError(f"-O{level}: no such optimization level", "use -O0, -O1, -O2 or -O3")
    adjust = adjust or PassAdjustments()
    chosen = [
        p
        for p in PASSES.values()
        if p.ir == ir
        and p.applies_to(target)
        and p.name not in adjust.removed
        and (p.level <= level or p.name in adjust.added)
    ]
    names = {p.name for p in chosen}
    for graph_pass in chosen:
        missing = [need for need in graph_pass.needs if need not in names]
        if missing:
            raise UsageError(
                f"pass {graph_pass.name} needs {', '.join(missing)}, which this pipeline leaves out",
                f"add +{missing[0]} to --passes, or remove -{graph_pass.name}",
            )
    return chosen


def count_nodes(graph: Any) -> int:
    """Number of nodes that compute something: ONNX nodes of the main graph, or FX call_function nodes."""
    if hasattr(graph, "graph_module"):
        return sum(1 for n in graph.graph.nodes if n.op == "call_function")
    return sum(1 for _ in graph.graph)


def run_pipeline(graph: Any, pipeline: Sequence[Pass], dump: Path | None = None) -> tuple[Any, list[PassRecord]]:
    """Run `pipeline` over `graph`, recording what each pass did; with `dump`, write the graph after each pass.

    A pass that raises, or that changes the graph so that a check it passed before fails (see
    `kiln.passes.contract.check_graph`; and the I/O signature, when the pass preserves it), is rolled back: the
    graph before it goes on to the next pass, and its record says why in `rolled_back`.
    """
    from kiln.compiler.types import PassRecord
    from kiln.passes.contract import check_graph, example_feeds, is_fx, run

    if dump is not None:
        dump_graph(graph, dump / "00-captured")
    reference = None
    if is_fx(graph):
        try:
            reference = run(graph, example_feeds(graph)) if example_feeds(graph) is not None else None
        except Exception:  # a program that does not run is not checked by running it
            reference = None
        baseline: dict[str, str | None] = {"runs": None} if reference is not None else {}
    else:
        baseline = check_graph(graph)
    records = []
    for index, graph_pass in enumerate(pipeline, start=1):
        before = count_nodes(graph)
        graph, changed, problem, seconds = _run_checked(graph_pass, graph, baseline, reference)
        record = PassRecord(graph_pass.name, changed, before, count_nodes(graph), seconds, graph_pass.ir, problem)
        records.append(record)
        if dump is not None:
            dump_graph(graph, dump / f"{index:02d}-{graph_pass.name}")
    return graph, records


def _run_checked(
    graph_pass: Pass, graph: Any, baseline: dict[str, str | None], reference: Any
) -> tuple[Any, bool, str | None, float]:
    """Run one pass and check its result: the graph to go on with, whether it changed, why it was rolled
    back (None if kept), and the pass's own time in seconds (the checks not counted)."""
    from kiln.passes.base import SIGNATURE
    from kiln.passes.contract import check_graph, signature, snapshot

    kept = snapshot(graph)
    started = time.perf_counter()
    try:
        result, changed = graph_pass(graph)
    except Exception as error:  # a pass bug costs the optimization, not the export
        seconds = round(time.perf_counter() - started, 4)
        return kept, False, f"the pass raised {type(error).__name__}: {' '.join(str(error).split())[:300]}", seconds
    seconds = round(time.perf_counter() - started, 4)
    if not changed:
        return result, False, None, seconds
    checks = check_graph(result, reference)
    broken = [f"{name}: {problem}" for name, problem in checks.items() if problem and baseline.get(name, "") is None]
    if SIGNATURE in graph_pass.preserves and signature(kept) != signature(result):
        broken.append("it changed the graph's inputs or outputs (names, dtypes or shapes)")
    if broken:
        return kept, False, "it broke the graph: " + "; ".join(broken), seconds
    return result, True, None, seconds


def dump_graph(graph: Any, stem: Path) -> Path:
    """Write a graph for reading: an ONNX model as `stem.onnx`, an FX program as `stem.txt`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(graph, "graph_module"):
        path = stem.with_suffix(".txt")
        path.write_text(str(graph))
        return path
    return save_onnx(graph, stem.with_suffix(".onnx"))


EXTERNAL_DATA_BYTES = 64 * 2**20  # weights beyond this go to `model.onnx.data`, written tensor by tensor
REUSED_FRACTION = 0.9  # a source data file is linked, not rewritten, when the model still reads this much of it


def save_onnx(model: Any, destination: Path) -> Path:
    """Save an onnx_ir model as one self-contained file, or, with more than EXTERNAL_DATA_BYTES of weights, with
    external data beside it: written one tensor at a time, so that saving never holds the model's weights twice (a
    self-contained file is one protobuf, built whole in memory and then serialized). Weights the model still reads
    unchanged from another model's data file stay in that file, linked (or copied) beside the new one
    (`NAME.data`), and only the others are written (`NAME.extra.data`): the passes rewrite a few weights of a
    decoder, not its gigabytes."""
    import onnx_ir as ir

    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights <= EXTERNAL_DATA_BYTES:
        # Pull weights that lived in the source's external files into the new self-contained file.
        ir.save(ir.external_data.load_to_model(model), str(destination))
        return destination
    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    kept = {id(v): v.const_value for v in values}
    try:
        reused = _reuse_data_files(values, destination)
        _write_external(values, destination.parent, destination.name + (".extra.data" if reused else ".data"))
        ir.save(model, str(destination))
    finally:
        for value in values:
            value.const_value = kept[id(value)]
    return destination


def _reuse_data_files(values: list[Any], destination: Path) -> bool:
    """Point the weights read unchanged from one external data file at a link (or copy) of it beside
    `destination` (`NAME.data`), when the model still reads REUSED_FRACTION of that file; whether it did."""
    import onnx_ir as ir

    by_file: dict[Path, list[Any]] = {}
    for value in values:
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.length is not None:
            by_file.setdefault(Path(tensor.path).resolve(), []).append(value)
    if not by_file:
        return False
    source, readers = max(by_file.items(), key=lambda item: sum(v.const_value.length for v in item[1]))
    if sum(v.const_value.length for v in readers) < REUSED_FRACTION * source.stat().st_size:
        return False
    name = destination.name + ".data"
    link_or_copy(source, destination.parent / name)
    for value in readers:
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(
            name,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=value.name,
            base_dir=destination.parent,
        )
    return True


def _write_external(values: list[Any], directory: Path, name: str) -> None:
    """Write the weights that are not external data yet into `directory/name`, one at a time (64-byte aligned),
    each replaced by a reference to where it went."""
    import onnx_ir as ir

    pending = [v for v in values if not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes > 1024]
    if not pending:
        return
    with open(directory / name, "wb") as file:
        for value in pending:
            tensor = value.const_value
            file.write(b"\0" * (-file.tell() % 64))
            offset = file.tell()
            file.write(tensor.tobytes())
            value.const_value = ir.ExternalTensor(
                name,
                offset,
                file.tell() - offset,
                tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=directory,
            )


def link_or_copy(source: Path, destination: Path) -> None:
    """`destination` as a hard link to `source` (same file system: no bytes copied), else a copy. For data files
    that are never written in place once made."""
    import os
    import shutil

    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
