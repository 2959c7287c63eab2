"""`kiln debug`: localize where an existing export (published or rejected) diverges from its PyTorch model.

The export's manifest says the target, the route, the precision, the passes that ran and the tolerance; the model
source is captured again (a `kiln.compiler.export.stages.Captured`) and
`kiln.compiler.diagnose.divergence.localize` builds its prefixes the same way (`Recipe`) on the stored parity inputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.compiler.capture.program import capture
from kiln.compiler.capture.pt2_archive import trusting_pickles
from kiln.compiler.diagnose.divergence import Search, localize, route_named
from kiln.compiler.diagnose.divergence_record import Divergence
from kiln.compiler.diagnose.probe import Recipe
from kiln.compiler.errors import UsageError
from kiln.compiler.export.loading import export_dirs
from kiln.compiler.export.options import ExportOptions, export_options
from kiln.compiler.parity.gate import ParitySamples
from kiln.compiler.parity.reference import check_model_inputs, reference_samples
from kiln.compiler.progress import Progress
from kiln.compiler.types import Manifest


@dataclass
class Diagnosis:
    """One export directory and where it diverges."""

    directory: Path
    divergence: Divergence


def debug(
    path: str | Path,
    model: str,
    every: bool = False,
    calib: str | None = None,
    progress: Progress | None = None,
    trust_pickle: bool = False,
    method: str = "auto",
) -> Iterator[Diagnosis]:
    """Localize each export under `path` (a published or a `.rejected/<target>` directory) against `model`;
    `every`: build every module boundary (a per-module error profile) instead of bisecting; `method`: `auto`
    (the runtime's fast path where it has one) or `bisection`."""
    from kiln.compiler.capture.sources import load_model
    from kiln.compiler.export.stages import Captured
    from kiln.targets import get_target

    progress = progress or Progress(quiet=True)
    for directory in export_dirs(path):
        manifest = Manifest.read(directory)
        target = get_target(manifest.target)
        options = _options(manifest, calib)
        with trusting_pickles(trust_pickle), tempfile.TemporaryDirectory(prefix="kiln-debug-") as work:
            source = load_model(model, None, options.parity.inputs_files)
            if source.kind != "torch":
                raise UsageError(f"{model} is not a PyTorch model", "localization cuts the PyTorch program: pass one")
            graph = capture(source, None, Path(work) / "capture", to_onnx=False)
            captured = Captured(source, graph, options, Path(work) / "capture", progress)
            check_model_inputs(model, captured.graph.inputs, manifest.inputs, by_name=True)
            origins = manifest.parity.sample_origins if manifest.parity else []
            samples = ParitySamples.load(directory, origins) or reference_samples(source, captured.graph, options)
            route = route_named(target, manifest.target_info.get("route"))
            recipe = Recipe.of(target, options, captured.calibrate([target]), route)
            failed = manifest.parity is not None and not manifest.parity.passed
            search = Search(method=method, every=every, output_failed=failed and not every)
            found = localize(
                captured.graph, recipe, samples, search, workdir=Path(work) / "localize", progress=progress
            )
        yield Diagnosis(directory, found)


def _options(manifest: Manifest, calib: str | None) -> ExportOptions:
    """The export's settings as its manifest recorded them: precision, the passes that ran, the tolerance."""
    from kiln.passes import PASSES

    tolerance = manifest.parity.tolerance if manifest.parity else None
    return export_options(
        precision=manifest.precision,
        calib=calib,
        passes=[PASSES[p.name] for p in manifest.passes if p.name in PASSES and not p.rolled_back],
        atol=tolerance.atol if tolerance else None,
        rtol=tolerance.rtol if tolerance else None,
        min_cosine=tolerance.min_cosine if tolerance else None,
        min_snr_db=tolerance.min_snr_db if tolerance else None,
        min_top1=tolerance.min_top1 if tolerance else None,
    )


def profile_table(divergence: Divergence) -> str:
    """Every boundary built, in execution order, one line each, the first diverging one marked."""
    lines = [divergence.summary()]
    first = divergence.first.index if divergence.first else None
    for error in divergence.measured:
        mark = "->" if error.index == first else "  "
        verdict = "ok  " if error.passed else "FAIL"
        lines.append(f"{mark} {error.index + 1:>4} {verdict} {error.label():<40} {error.figures()}")
        if error.source and error.index == first:
            lines.append(f"          at {error.source}")
    for error in divergence.following:
        if not error.measured:
            lines.append(f"   {error.index + 1:>4} next {error.label()}")
    return "\n".join(lines)
