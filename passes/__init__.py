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

from kiln.compiler.errors import error_text
from kiln.passes import cleanup, fusion, fx, transpose_sinking
from kiln.passes.base import DEFAULT_LEVEL, LEVELS, Pass
from kiln.passes.graphs import count_nodes, dump_graph

if TYPE_CHECKING:
    from kiln.compiler.types import PassRecord

PASSES: dict[str, Pass] = {
    p.name: p for p in [*cleanup.PASSES, *fusion.PASSES, *transpose_sinking.PASSES, *cleanup.FINAL, *fx.PASSES]
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
    from kiln.compiler.large_graphs import snapshot
    from kiln.passes.base import SIGNATURE
    from kiln.passes.contract import check_graph, signature

    kept = snapshot(graph)
    started = time.perf_counter()
    try:
        result, changed = graph_pass(graph)
    except Exception as error:  # a pass bug costs the optimization, not the export
        seconds = round(time.perf_counter() - started, 4)
        return kept, False, f"the pass raised {error_text(error)}", seconds
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
