"""What an export returns for each target (`compiler.export`, `kiln.compiler.export.pipeline.export_targets`): where
the artifact
is, its manifest, whether it was published, or why nothing was built."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.compiler.types import Manifest, ParityReport, json_safe


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
