"""What every prefix build of one localization shares (`Probe`), and how a prefix is built: optimized and built
as the export was, by the export's route (`build_program`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.program import EXPORTERS, CapturedModel, lower
from kiln.compiler.errors import KilnError
from kiln.compiler.export.artifacts import Artifact, build
from kiln.compiler.export.optimize import optimize
from kiln.compiler.parity.gate import ParitySamples
from kiln.compiler.progress import Progress

if TYPE_CHECKING:
    from kiln.compiler.diagnose.cut import Boundary
    from kiln.compiler.export.options import ExportOptions
    from kiln.compiler.quantization.calibration import CalibrationData
    from kiln.targets.base import Route, Target

PROBE = "divergence_probe"  # the output name of a prefix build


@dataclass
class Probe:
    """What every prefix build of one localization shares."""

    captured: CapturedModel
    target: Target
    options: ExportOptions
    samples: ParitySamples
    calibration: CalibrationData | None
    work: Path
    progress: Progress
    reference: Any  # the captured program as a module to run in PyTorch (kiln.compiler.diagnose.cut.reference_module)
    builds: int = 0
    bounds: list[Boundary] = field(default_factory=list)
    route: Route | None = None  # the route that produced the artifact: prefixes are built by it (None: default)
    frontier: bool = (
        True  # a prefix also outputs the earlier boundaries still live at its cut (kiln.compiler.diagnose.cut.live_at)
    )


class NotBuilt(Exception):
    """The prefix did not convert (as opposed to: it converted, then failed to run)."""

    def __init__(self, error: KilnError):
        super().__init__(error.one_line())
        self.error = error


def build_program(probe: Probe, program: CapturedModel, work: Path) -> tuple[Artifact, Path | None]:
    """`program` optimized and built as the export was, by the export's route (`probe.route`): the artifact and
    the ONNX graph it was built from (None: the route consumes the FX program)."""
    options, target, route = probe.options, probe.target, probe.route
    consumes = route.consumes if route is not None else target.consumes
    work.mkdir(parents=True)
    try:
        if consumes == "onnx":
            if route is None and program is not probe.captured:
                program = replace(program, eager=None)  # the default capture of a prefix: the dynamo exporter
            exporters = (route.exporter,) if route is not None and route.exporter else EXPORTERS
            program = lower(program, work, options.opt_level > 0, exporters)
        graph, _ = optimize(program, target, work, options, {}, consumes)
        request = replace(options.build_request(target, probe.calibration), accuracy=None)
        if route is not None:
            request = replace(request, route=route.name)
        return build(target, graph, request, work / "artifact"), graph.onnx_path if consumes == "onnx" else None
    except KilnError as error:
        raise NotBuilt(error) from error
