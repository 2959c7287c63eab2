"""How the artifact was built and judged, which every prefix build of a localization repeats (`Recipe`), what
those prefix builds share (`Probe`), and how a prefix is built: optimized and built as the export was, by the
export's route (`build_program`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.program import EXPORTERS, CapturedModel, lower
from kiln.compiler.errors import KilnError
from kiln.compiler.export.artifacts import Artifact, build
from kiln.compiler.export.optimize import optimize
from kiln.compiler.export.options import PassOptions, Thresholds
from kiln.compiler.parity.gate import ParitySamples
from kiln.compiler.progress import Progress

if TYPE_CHECKING:
    from kiln.compiler.diagnose.cut import Boundary
    from kiln.compiler.export.options import ExportOptions
    from kiln.compiler.quantization.calibration import CalibrationData
    from kiln.compiler.types import Tolerance
    from kiln.targets.base import BuildRequest, Route, Target

PROBE = "divergence_probe"  # the output name of a prefix build


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How the artifact was built and judged, which every prefix build repeats: the target and the route that built
    it (None: the default capture), the build request (precision, calibration data, I/O layout, ...), the graph
    passes and the gate's thresholds."""

    target: Target
    request: BuildRequest
    passes: PassOptions = field(default_factory=PassOptions)
    thresholds: Thresholds = field(default_factory=Thresholds)
    route: Route | None = None

    @classmethod
    def of(
        cls,
        target: Target,
        options: ExportOptions,
        calibration: CalibrationData | None = None,
        route: Route | None = None,
    ) -> Recipe:
        """The recipe of an export to `target` with `options`, less what applies to the whole model only:
        --dump-passes (it shows the export's graphs, not the prefixes') and --max-drop (a prefix is quantized as
        asked)."""
        request = replace(options.build_request(target, calibration), accuracy=None)
        if route is not None:
            request = replace(request, route=route.name)
        passes = replace(options.passes, dump=None)
        return cls(target=target, request=request, passes=passes, thresholds=options.thresholds, route=route)

    def tolerance(self) -> Tolerance:
        """What each boundary is judged with: the gate's tolerance at the artifact's precision."""
        return self.thresholds.tolerance(self.request.precision)


@dataclass
class Probe:
    """What every prefix build of one localization shares."""

    captured: CapturedModel
    recipe: Recipe
    samples: ParitySamples
    work: Path
    progress: Progress
    reference: Any  # the captured program as a module to run in PyTorch (kiln.compiler.diagnose.cut.reference_module)
    builds: int = 0
    bounds: list[Boundary] = field(default_factory=list)
    frontier: bool = (
        True  # a prefix also outputs the earlier boundaries still live at its cut (kiln.compiler.diagnose.cut.live_at)
    )

    @property
    def target(self) -> Target:
        return self.recipe.target

    @property
    def route(self) -> Route | None:
        """The route that produced the artifact: prefixes are built by it (None: the default capture)."""
        return self.recipe.route


class NotBuilt(Exception):
    """The prefix did not convert (as opposed to: it converted, then failed to run)."""

    def __init__(self, error: KilnError):
        super().__init__(error.one_line())
        self.error = error


def build_program(probe: Probe, program: CapturedModel, work: Path) -> tuple[Artifact, Path | None]:
    """`program` optimized and built as the export was, by the export's route (`probe.route`): the artifact and
    the ONNX graph it was built from (None: the route consumes the FX program)."""
    recipe, target, route = probe.recipe, probe.target, probe.route
    consumes = route.consumes if route is not None else target.consumes
    work.mkdir(parents=True)
    try:
        if consumes == "onnx":
            if route is None and program is not probe.captured:
                program = replace(program, eager=None)  # the default capture of a prefix: the dynamo exporter
            exporters = (route.exporter,) if route is not None and route.exporter else EXPORTERS
            program = lower(program, work, recipe.passes.level > 0, exporters)
        graph, _ = optimize(program, target, work, recipe.passes, {}, consumes)
        return build(target, graph, recipe.request, work / "artifact"), graph.onnx_path if consumes == "onnx" else None
    except KilnError as error:
        raise NotBuilt(error) from error
