"""An artifact and the steps every command takes with one: build it, load it, hash its files.

`build(target, graph, request, directory)` is the one way a graph becomes an artifact: the pipeline, and
anything else that needs a build of a graph (a prefix of a model, a tuning candidate), call it. An artifact
read back from disk (`Artifact.read`) is the same type, so `kiln.compiler.parity.gate.validate` and
`kiln.compiler.perf.timing.bench` take either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.compiler.backend_errors import backend_failures
from kiln.compiler.export.manifest import ManifestParts, assemble_manifest
from kiln.compiler.large_graphs import snapshot
from kiln.compiler.memory import pages_released
from kiln.compiler.progress import Progress, converter_output_captured
from kiln.compiler.safe_fs import regular_files
from kiln.compiler.types import MANIFEST_NAME, ArtifactFile, Manifest

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.targets.base import BuildRequest, Runner, RuntimeSettings, Target


@dataclass
class Artifact:
    """One built artifact: its directory and the manifest that says how to load it. `parts` are what the
    manifest was assembled from (None for an artifact read from disk)."""

    directory: Path
    manifest: Manifest
    parts: ManifestParts | None = None

    @property
    def target(self) -> str:
        """The name of the target that built it."""
        return self.manifest.target

    @classmethod
    def read(cls, directory: str | Path) -> Artifact:
        """An export directory on disk."""
        return cls(Path(directory), Manifest.read(Path(directory)))


def build(
    target: Target, graph: CapturedModel, request: BuildRequest, directory: Path, progress: Progress | None = None
) -> Artifact:
    """Build `graph` for `target` as `request` asks, into the new directory `directory`. A backend's own failure
    becomes an UnsupportedOpError naming the target and, where it says, the operation. `graph` is left as it
    was: the target builds from a copy of its FX program."""
    progress = progress or Progress(quiet=True)
    directory.mkdir(parents=True)
    if graph.exported is not None:
        # Converters change the program they are given (litert-torch's StableHLO lowering decomposes it in
        # place): each build gets its own copy, the weights shared, so the next target sees the capture intact.
        graph = replace(graph, exported=snapshot(graph.exported))
    mapped = [directory] + ([graph.onnx_path.parent] if graph.onnx_path is not None else [])
    with (
        progress.stage(f"build {target.name}", target.stage_detail(graph, request)),
        backend_failures(target.name, "convert"),
        converter_output_captured(),
        pages_released(mapped),  # a converter's read of the mapped ONNX weights (OpenVINO's copies them transposed)
    ):
        built = target.build(graph, directory, request)
    for note in built.notes:
        progress.say(f"note: {note}")
    parts = ManifestParts(target, request, graph, built)
    return Artifact(directory, assemble_manifest(parts), parts)


def load_runner(artifact: Artifact, threads: int | None = None, settings: RuntimeSettings | None = None) -> Runner:
    """A runner for the artifact, from its target in the registry (`threads`: the runtime's thread count, where
    it has one; None: its default; `settings`: runtime settings applied over the manifest's, e.g. by `kiln tune`)."""
    from kiln.targets import get_target

    target = get_target(artifact.target)
    manifest = artifact.manifest
    if settings is not None and not settings.is_default:
        manifest = target.with_runtime_settings(manifest, settings)
    # OpenVINO's mapped .bin is read once, as the model is compiled: its pages are handed back after.
    with backend_failures(target.name, "run"), pages_released([artifact.directory]):
        return target.load(artifact.directory, manifest, threads=threads)


def hash_files(directory: Path) -> list[ArtifactFile]:
    """Every file of an artifact directory (but its own manifest) with size and sha256; a link or a special file
    in it (which no export holds) is a UsageError."""
    files = []
    for path in regular_files(directory):
        if path.parent == directory and path.name == MANIFEST_NAME:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        files.append(ArtifactFile(str(path.relative_to(directory)), path.stat().st_size, digest.hexdigest()))
    return files
