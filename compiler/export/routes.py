"""A target's routes: the ways from the captured model to its artifact, tried in order.

`choose_route` asks the target for its routes (`Target.routes`, `kiln.targets.base.Route`), keeps those the source
can take (`kiln.compiler.export.route_graphs.RouteGraphs.applicable`), and runs each route's stages (`try_route`:
the capture's graph for the route -- the shared capture, or its ONNX lowering by the route's exporter, made once
per capture and only when a target reaches that route -- optimized, built and validated;
`kiln.compiler.export.stages`) until one passes parity (a `fallback` route is tried only when no earlier route
converted). A route that fails to convert, or converts but fails parity, is recorded (`target_info.route` and
`target_info.routes_tried`: `RouteChoice.tried`, `kiln.compiler.export.stages.Validated.finish`); when none
builds, the error names every route (`routes_failed`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.compiler.errors import KilnError, MissingBackendError, UnsupportedOpError, UsageError, plain_text
from kiln.targets.base import Route

if TYPE_CHECKING:
    from kiln.compiler.export.stages import Captured, Validated
    from kiln.compiler.types import ParityReport
    from kiln.targets.base import Target

@dataclass
class RouteAttempt:
    """One route tried for one target: the step it reached and why it was not used ("" when it was)."""

    route: Route
    step: str
    reason: str = ""
    error: KilnError | None = None  # it failed to build (or to run)
    validated: Validated | None = None  # it built and was judged

    @classmethod
    def failed(cls, route: Route, step: str, error: KilnError) -> RouteAttempt:
        """A route that failed to build (or to run) at `step`."""
        return cls(route, step, failure_reason(route, error), error=error)

    @classmethod
    def judged(cls, route: Route, validated: Validated) -> RouteAttempt:
        """A route that built and was judged by the parity gate."""
        report = validated.report
        return cls(route, "validate", "" if report.passed else parity_reason(report), validated=validated)

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


class TargetFailed(Exception):
    """A target failed at one step (no route built, or an error every route would meet); with several targets,
    the others go on."""

    def __init__(self, step: str, error: KilnError):
        super().__init__(error.one_line())
        self.step, self.error = step, error


@dataclass
class RouteChoice:
    """The routes tried for one target and the one kept: the first whose build passed parity, else (rejected) the
    first that built."""

    chosen: RouteAttempt
    attempts: list[RouteAttempt]

    @property
    def validated(self) -> Validated:
        """The kept route's validated stage."""
        assert self.chosen.validated is not None
        return self.chosen.validated

    def tried(self) -> list[dict[str, str]]:
        """What the manifest records of the other routes tried (`target_info.routes_tried`): why each was not
        used."""
        return [a.to_dict() for a in self.attempts if a is not self.chosen]


def choose_route(captured: Captured, target: Target, directory: Path) -> RouteChoice:
    """Run the stages of `target`'s routes in order (`try_route`, each into its own directory beside
    `directory`) until one builds and passes parity; the kept one is moved to `directory`, what the others wrote
    is removed. When no route builds, TargetFailed names the step."""
    routes = captured.routes.applicable(target)
    timings: dict[str, float] = {}  # this target's stage times, over every route tried
    attempts: list[RouteAttempt] = []
    for index, route in enumerate(routes):
        if route.fallback and any(a.validated is not None for a in attempts):
            break  # an earlier route converted (and failed parity): a fallback route is not a second opinion
        attempt = try_route(captured, target, route, directory.with_name(f"{target.name}~{index}"), timings)
        attempts.append(attempt)
        if not attempt.reason:
            break
        if index + 1 < len(routes):
            captured.progress.warn(f"{target.name}: route {route.name} not used ({attempt.step}): {attempt.reason}")
    built = [a for a in attempts if a.validated is not None]
    if not built:
        if not attempts:
            raise TargetFailed("capture", UnsupportedOpError(f"{target.name} has no route from this model", None))
        raise TargetFailed(attempts[0].step, routes_failed(attempts))
    choice = RouteChoice(next((a for a in built if not a.reason), built[0]), attempts)
    artifact = choice.validated.artifact
    tried = [directory.with_name(f"{target.name}~{i}") for i in range(len(attempts))]
    artifact.directory = keep_only(artifact.directory, directory, tried)
    return choice


def try_route(
    captured: Captured, target: Target, route: Route, directory: Path, timings: dict[str, float]
) -> RouteAttempt:
    """One route of one target: its graph optimized, built into `directory` and validated (the stages' seconds
    added to `timings`). A conversion or run failure is returned in the attempt (the next route is tried); a
    usage error or a missing backend, which every route would meet, raises TargetFailed."""
    step = "capture"
    try:
        captured.routes.graph(route, target)
        step = "optimize"
        optimized = captured.optimize(target, route=route, timings=timings)
        step = "build"
        built = optimized.build(directory=directory)
        step = "validate"
        validated = built.validate()
    except (UsageError, MissingBackendError) as error:
        raise TargetFailed(step, error) from error
    except KilnError as error:
        return RouteAttempt.failed(route, step, error)
    return RouteAttempt.judged(route, validated)


__all__ = [
    "RouteAttempt",
    "RouteChoice",
    "TargetFailed",
    "choose_route",
    "failure_reason",
    "keep_only",
    "parity_reason",
    "routes_failed",
    "try_route",
]
