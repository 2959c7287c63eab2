"""Loading, running and re-verifying existing exports."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import MissingBackendError, UsageError
from compiler.parity import ParitySamples, check_feed, in_reference_layout, validate
from compiler.staging import REJECTED
from compiler.types import MANIFEST_NAME, Manifest, ParityReport, TensorSpec


class LoadedModel:
    """A runnable export: call it with numpy arrays or torch tensors, get outputs by name."""

    def __init__(self, directory: Path, manifest: Manifest, runner: Any):
        self.directory = directory
        self.manifest = manifest
        self.runner = runner

    @property
    def inputs(self) -> list[TensorSpec]:
        """The input signature."""
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """The output signature."""
        return self.manifest.outputs

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run on inputs given in order or by name; outputs as a name -> array dict."""
        if len(args) > len(self.inputs):
            raise UsageError(
                f"got {len(args)} inputs, the model takes {len(self.inputs)}",
                f"inputs: {', '.join(s.describe() for s in self.inputs)}",
            )
        given = dict(zip((s.name for s in self.inputs), args)) | kwargs
        missing = [s.name for s in self.inputs if s.name not in given]
        unknown = [n for n in given if n not in {s.name for s in self.inputs}]
        if missing or unknown:
            raise UsageError(
                f"inputs missing: {missing or 'none'}, unknown: {unknown or 'none'}",
                f"inputs: {', '.join(s.describe() for s in self.inputs)}",
            )
        notes: list[str] = []
        feeds = {s.name: check_feed(s, _to_numpy(given[s.name]), "input", notes) for s in self.inputs}
        for note in notes:  # casts done, NaN/Inf inputs
            warnings.warn(note, stacklevel=2)
        return self.run(feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on already-checked named numpy inputs."""
        outputs = self.runner.run(feeds)
        return {s.name: outputs[s.name] for s in self.outputs}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def export_dirs(path: str | Path) -> list[Path]:
    """The export directories under `path`: itself if it holds a manifest, else its target subdirectories."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"{path} does not exist", "pass the directory written by `kiln export --out`")
    found = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
    if not found:
        rejected = path / REJECTED
        extra = f" (only rejected builds under {rejected})" if rejected.is_dir() else ""
        raise UsageError(f"{path} holds no Kiln export{extra}", "pass the directory written by `kiln export --out`")
    return found


def load(path: str | Path, target: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load an export directory (or one target of a multi-target export) as a callable model.

    `trust_pickle`: a `pt2` export's archive may run its pickles (see `compiler.pt2_archive`).
    """
    from compiler.pt2_archive import trusting_pickles
    from targets import get_target

    directories = export_dirs(path)
    if target is not None:
        wanted = get_target(target).name
        directories = [d for d in directories if Manifest.read(d).target == wanted]
        if not directories:
            raise UsageError(f"{path} has no export for target {wanted}", "check the targets it was exported to")
    if len(directories) > 1:
        names = ", ".join(d.name for d in directories)
        raise UsageError(f"{path} holds several exports ({names})", "pass target=NAME, or the subdirectory itself")
    directory = directories[0]
    manifest = Manifest.read(directory)
    backend = get_target(manifest.target)
    reason = backend.unavailable_reason()
    if reason:
        raise MissingBackendError(f"cannot run the {backend.name} export here: {reason}", "install what it needs")
    with trusting_pickles(trust_pickle):
        runner = backend.load(directory, manifest)
    return LoadedModel(directory, manifest, runner)


def check_files(directory: Path, manifest: Manifest) -> None:
    """Raise if an artifact file is missing, differs from what the manifest recorded, or is not in the manifest."""
    from compiler.pipeline import hash_files

    actual = {f.path: f for f in hash_files(directory)}
    recorded_paths = {f.path for f in manifest.files}
    unlisted = sorted(path for path in actual if path not in recorded_paths)
    if unlisted:
        more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
        raise UsageError(
            f"{directory}: file {unlisted[0]}{more} is not in the manifest (not written by the export)",
            "remove it, or re-export the model",
        )
    for recorded in manifest.files:
        found = actual.get(recorded.path)
        if found is None:
            raise UsageError(f"{directory}: artifact file {recorded.path} is missing", "re-export the model")
        if found.sha256 != recorded.sha256:
            raise UsageError(
                f"{directory}: {recorded.path} changed since export (sha256 differs)",
                "re-export the model, or restore the file",
            )


@dataclass
class Verification:
    """The outcome of re-running parity on one export directory."""

    directory: Path
    manifest: Manifest
    report: ParityReport
    notes: list[str]


def verify(path: str | Path, model: str | None = None, trust_pickle: bool = False) -> Iterator[Verification]:
    """Re-run parity on each export under `path`: against `model` if given, else the stored reference.

    `trust_pickle`: a `.pt2` model or `pt2` export may run its pickles (see `compiler.pt2_archive`).
    """
    from compiler.capture import CapturedModel
    from compiler.pipeline import reference_runner
    from compiler.sources import load_source

    for directory in export_dirs(path):
        manifest = Manifest.read(directory)
        check_files(directory, manifest)
        origins = manifest.parity.sample_origins if manifest.parity else []
        samples = ParitySamples.load(directory, origins)
        notes = []
        if model is not None:
            source = load_source(model, trust_pickle=trust_pickle)
            if source.state_hash != manifest.source.get("state_hash"):
                notes.append(f"{model} has different weights from the model exported (state hash differs)")
            if samples is None:
                raise UsageError(f"{directory} stored no parity inputs", "re-export to store them")
            signature = CapturedModel(None, Path(), manifest.inputs, manifest.outputs, 0, None)
            reference = reference_runner(source, signature)
            samples.reference = [reference(feeds) for feeds in samples.inputs]
            reference_name = source.reference_name
        elif samples is None:
            raise UsageError(f"{directory} stored no reference outputs", "pass --model SOURCE to recompute them")
        else:
            reference_name = f"stored reference ({manifest.source.get('reference', 'unknown')})"
        loaded = load(directory, trust_pickle=trust_pickle)
        tolerance = manifest.parity.tolerance if manifest.parity else None
        if tolerance is None:
            from compiler.types import Tolerance

            tolerance = Tolerance.for_precision(manifest.precision)
        run = in_reference_layout(loaded.run, manifest.inputs, manifest.outputs)
        report = validate(run, samples, tolerance, reference_name, loaded.runner.runtime_info())
        yield Verification(directory, manifest, report, notes)
