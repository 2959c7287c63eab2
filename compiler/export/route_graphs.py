"""The graph each route of a target starts from, for one capture (`RouteGraphs`): the shared capture, or its ONNX
lowering by the route's exporter, made once per capture and only when a target reaches that route; and the pass
pipelines already run on each graph. The stages (`kiln.compiler.export.stages.Captured.routes`) hold one;
`kiln.compiler.export.routes` chooses among a target's routes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.compiler.capture.program import EXPORTERS, CapturedModel, lower
from kiln.compiler.errors import KilnError, UnsupportedOpError
from kiln.compiler.generation.decoding import TEXT_GENERATION
from kiln.compiler.generation.llm_format import GENAI
from kiln.targets.base import ONNX_FILE, Route

if TYPE_CHECKING:
    from kiln.compiler.types import PassRecord
    from kiln.targets.base import Target

LOWERING_HINT = "use a target that consumes the FX graph, or replace that operation in the model"


class RouteGraphs:
    """The graph each route hands to a target, for one capture; and the pass pipelines run on each graph."""

    def __init__(
        self,
        captured: CapturedModel,
        scratch: Path,
        optimize_onnx: bool,
        failure: KilnError | None,
        task: str | None = None,
        llm_format: str | None = None,
    ):
        self.captured, self.scratch, self.optimize_onnx = captured, scratch, optimize_onnx
        self.task, self.llm_format = task, llm_format  # the export's task, and --llm-format
        self.lowered: dict[str, CapturedModel | KilnError] = {}  # by exporter
        self.optimized: dict[str, dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]]] = {}
        if captured.onnx_path is not None and captured.exported is not None:
            record = captured.lowering.get("onnx_route", {})
            self.lowered[record.get("route", EXPORTERS[0])] = captured
            for exporter, reason in record.get("failed", {}).items():
                self.lowered[exporter] = UnsupportedOpError(
                    f"lowering to ONNX by the {exporter} exporter failed: {reason}", LOWERING_HINT
                )
        if failure is not None:  # no exporter converted: every ONNX route fails with the same error
            for exporter in getattr(failure, "failed", None) or EXPORTERS:
                self.lowered[exporter] = failure

    def applicable(self, target: Target) -> list[Route]:
        """The target's routes this source can take, in order: a route that writes the runtime's own LLM format
        only on a text-generation export, first; `--llm-format` keeps only those routes (genai) or only the plain
        ones (stateless)."""
        generating = self.task == TEXT_GENERATION
        routes = [r for r in target.routes() if generating or not r.llm_format]
        if self.llm_format is not None:
            routes = [r for r in routes if r.llm_format == (self.llm_format == GENAI)]
        routes = sorted(routes, key=lambda r: not r.llm_format)  # stable: the runtime's own LLM format first
        if self.captured.exported is None:  # an .onnx source: the file is the one ONNX graph
            return [ONNX_FILE] if any(r.consumes == "onnx" for r in routes) else []
        return [r for r in routes if r.exporter != "torchscript" or self.captured.eager is not None]

    def graph(self, route: Route, target: Target) -> CapturedModel:
        """The graph `route` hands to `target` (lowered to ONNX now if no target needed it yet); a KilnError when
        the route's exporter cannot convert the model."""
        captured = self.captured
        if route.consumes == "torch":
            return captured if target.consumes == "torch" else replace(captured, onnx_path=None, lowering={})
        if not route.exporter or captured.exported is None:
            return captured
        if route.exporter not in self.lowered:
            fx_only = replace(captured, onnx_path=None, lowering={})
            try:
                self.lowered[route.exporter] = lower(
                    fx_only, self.scratch / route.exporter, self.optimize_onnx, (route.exporter,)
                )
            except KilnError as error:
                self.lowered[route.exporter] = error
        found = self.lowered[route.exporter]
        if isinstance(found, KilnError):
            raise found
        return found

    def work_for(self, route: Route) -> Path:
        """Where the pass pipelines on the graph of `route` write their graphs."""
        return self.scratch / f"passes-{route.exporter or route.consumes}"

    def optimized_for(self, route: Route) -> dict[tuple[str, ...], tuple[CapturedModel, list[PassRecord]]]:
        """The pass pipelines already run on the graph of `route` (shared by the targets that take that graph)."""
        return self.optimized.setdefault(route.exporter or route.consumes, {})
