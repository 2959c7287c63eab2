"""A target's routes: the ways from the captured model to its artifact, tried in order.

The pipeline asks the target for its routes (`Target.routes`, `kiln.targets.base.Route`), keeps those the source can
take (`RouteGraphs.applicable`), gets each route's graph (`RouteGraphs.graph`: the shared capture, or its ONNX
lowering by the route's exporter, made once per capture and only when a target reaches that route) and
publishes the first route whose build passes parity (a `fallback` route is tried only when no earlier route
converted). A route that fails to convert, or converts but fails parity, is recorded (`route_info`:
`target_info.route` and `target_info.routes_tried`); when none builds, the error names every route
(`routes_failed`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.program import EXPORTERS, CapturedModel, lower
from kiln.compiler.errors import KilnError, UnsupportedOpError, plain_text
from kiln.targets.base import ONNX_FILE, Route

if TYPE_CHECKING:
    from kiln.compiler.types import ParityReport, PassRecord
    from kiln.targets.base import Target

LOWERING_HINT = "use a target that consumes the FX graph, or replace that operation in the model"


@dataclass
class RouteAttempt:
    """One route tried for one target: the step it reached and why it was not used ("" when it was)."""

    route: Route
    step: str
    reason: str = ""
    error: KilnError | None = None  # it failed to build (or to run)
    report: ParityReport | None = None  # it built and was judged

    @classmethod
    def failed(cls, route: Route, step: str, error: KilnError) -> RouteAttempt:
        """A route that failed to build (or to run) at `step`."""
        return cls(route, step, failure_reason(route, error), error=error)

    @classmethod
    def judged(cls, route: Route, report: ParityReport) -> RouteAttempt:
        """A route that built and was judged by the parity gate."""
        return cls(route, "validate", "" if report.passed else parity_reason(report), report=report)

    def to_dict(self) -> dict[str, str]:
        """What `target_info.routes_tried` records of it."""
        return {"route": self.route.name, "step": self.step, "reason": self.reason}


def parity_reason(report: ParityReport) -> str:
    """Why a built route was not used: its failing outputs' figures, on one line."""
    failing = report.failures()
    return (
        "parity failed: "
        + "; ".join(o.summary().removeprefix("FAIL ") for o in failing[:2])
        + (f" (+{len(failing) - 2} more outputs)" if len(failing) > 2 else "")
    )


class RouteGraphs:
    """The graph each route hands to a target, for one capture; and the pass pipelines run on each graph."""

    def __init__(self, captured: CapturedModel, scratch: Path, optimize_onnx: bool, failure: KilnError | None):
        self.captured, self.scratch, self.optimize_onnx = captured, scratch, optimize_onnx
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
        """The target's routes this source can take, in order."""
        routes = target.routes()
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


def routes_failed(attempts: list[RouteAttempt]) -> KilnError:
    """The error when no route built: the first route's, naming what every other route failed with (one
    error shared by several routes, e.g. the lowering failure of both ONNX routes, is said once)."""
    errors: list[KilnError] = []
    for attempt in attempts:
        if attempt.error is not None and all(attempt.error is not e for e in errors):
            errors.append(attempt.error)
    first = errors[0]
    if len(errors) == 1:
        return first
    others = [a for a in attempts if a.error is not None and a.error is not first]
    also = "; ".join(f"{a.route.name} (at {a.step}): {plain_text(a.error.message)}" for a in others if a.error)
    combined = type(first).__new__(type(first))
    combined.__dict__.update(first.__dict__)
    KilnError.__init__(combined, f"{first.message}; other routes failed too: {also}", first.hint)
    return combined


def failure_reason(route: Route, error: KilnError) -> str:
    """Why `route` failed, on one line (without the hint): for an ONNX route whose exporter failed, that
    exporter's own reason."""
    failed = getattr(error, "failed", None)
    if isinstance(failed, dict) and route.exporter in failed:
        return f"lowering to ONNX by the {route.exporter} exporter failed: {failed[route.exporter]}"
    return plain_text(error.message)


def keep_only(chosen: Path, directory: Path, tried: list[Path]) -> Path:
    """Move the chosen route's build `chosen` to `directory` and remove what the other routes wrote; `directory`."""
    for other in tried:
        if other != chosen:
            shutil.rmtree(other, ignore_errors=True)
    chosen.rename(directory)
    return directory


def route_info(chosen: RouteAttempt, attempts: list[RouteAttempt]) -> dict[str, Any]:
    """What the manifest records (`target_info`): the route that produced the artifact, and why each other
    route tried was not used."""
    return {"route": chosen.route.name, "routes_tried": [a.to_dict() for a in attempts if a is not chosen]}


__all__ = [
    "LOWERING_HINT",
    "RouteAttempt",
    "RouteGraphs",
    "failure_reason",
    "keep_only",
    "parity_reason",
    "route_info",
    "routes_failed",
]
