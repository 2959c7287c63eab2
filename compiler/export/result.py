"""What an export returns for each target (`kiln.export`, `kiln.compiler.export.pipeline.export_targets`): where
the artifact is, its manifest, whether it was published, or why nothing was built; and `publish`, which lays the
finished builds out in the output directory and returns those results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.export.staging import REJECTED, install_tree
from kiln.compiler.types import Manifest, ParityReport, json_safe

if TYPE_CHECKING:
    from kiln.targets.base import Target


@dataclass(frozen=True)
class TargetFailure:
    """Why one target of a multi-target export built nothing: the failed step, its one-line error, exit code."""

    step: str
    message: str
    exit_code: int


@dataclass
class ExportResult:
    """What `export()` returns for one target: where the artifact is and how it fared (`failure` when it could
    not be built or run at all; then there is no manifest)."""

    target: str
    directory: Path
    manifest: Manifest | None
    published: bool
    failure: TargetFailure | None = None

    @property
    def parity(self) -> ParityReport | None:
        """The parity report of this artifact."""
        return self.manifest.parity if self.manifest is not None else None

    @property
    def artifact_paths(self) -> list[Path]:
        """Absolute paths of the artifact's files."""
        return [self.directory / f.path for f in self.manifest.files] if self.manifest is not None else []

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable summary for `--json`."""
        return json_safe(
            {
                "target": self.target,
                "directory": str(self.directory),
                "published": self.published,
                "parity": asdict(self.parity) if self.parity else None,
                "files": [asdict(f) for f in self.manifest.files] if self.manifest is not None else [],
                "timings": self.manifest.timings if self.manifest is not None else {},
                "peak_rss": self.manifest.host.get("peak_rss") if self.manifest is not None else None,
                "notes": self.manifest.notes if self.manifest is not None else [],
                "failure": asdict(self.failure) if self.failure is not None else None,
            }
        )


@dataclass
class Outcome:
    """One target's end before it is published: its finished build (directory and manifest), or how it failed."""

    target: Target
    directory: Path | None = None
    manifest: Manifest | None = None
    failure: TargetFailure | None = None
    relative: Path = field(default_factory=Path)  # where the build ends up inside the output directory


def publish(staging: Path, outcomes: list[Outcome], out: Path) -> list[ExportResult]:
    """Move the finished builds (in `staging`) into `out` (passed ones in place, failed ones under `.rejected/`), in
    one step."""
    built = [o for o in outcomes if o.directory is not None]
    if built:
        install_tree(_assemble(staging, built, single=len(outcomes) == 1), out)
    return [
        ExportResult(
            o.target.name, out / o.relative, o.manifest, o.manifest is not None and o.manifest.published, o.failure
        )
        for o in outcomes
    ]


def _assemble(staging: Path, builds: list[Outcome], single: bool) -> Path:
    """Lay out the final tree: passed builds in place, failed ones under `.rejected/`."""
    tree = staging / "tree"
    first = builds[0]
    if single and first.manifest is not None and first.manifest.published and first.directory is not None:
        first.directory.rename(tree)
        return tree
    tree.mkdir()
    for build_ in builds:
        assert build_.manifest is not None and build_.directory is not None
        build_.relative = Path(build_.target.name) if build_.manifest.published else Path(REJECTED, build_.target.name)
        (tree / build_.relative).parent.mkdir(exist_ok=True)
        build_.directory.rename(tree / build_.relative)
    return tree
