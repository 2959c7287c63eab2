"""Loading, running and re-verifying existing exports."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from kiln.compiler.capture.inputs import check_feed
from kiln.compiler.capture.pt2_archive import trusting_pickles
from kiln.compiler.errors import KilnError, MissingBackendError, UsageError, error_text
from kiln.compiler.export.artifacts import Artifact, hash_files, load_runner
from kiln.compiler.export.staging import REJECTED, STAGING_OWNER, staging_root_of
from kiln.compiler.parity.gate import ParitySamples, validate
from kiln.compiler.safe_fs import check_tree
from kiln.compiler.types import BENCH_FILE, MANIFEST_NAME, Manifest, ParityReport, TensorSpec, Tolerance


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
    """The export directories under `path`: itself if it holds a manifest, else its target subdirectories.
    Nothing inside a staging directory counts (an export being built, or one whose build was killed), and an
    export holding a link that leads outside `path` (or a FIFO, a device...) is refused (`safe_fs.check_tree`)."""
    path = Path(path)
    staging = staging_root_of(path)
    if staging is not None:
        raise UsageError(
            f"{path} is inside the staging directory of an unfinished export ({staging} holds {STAGING_OWNER})",
            "export again: it is removed by the next export to the same --out; only the --out directory is an export",
        )
    if (path / MANIFEST_NAME).is_file():
        found = [path]
    elif not path.is_dir():
        raise UsageError(f"{path} does not exist", "pass the directory written by `kiln export --out`")
    else:
        found = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
    if not found:
        rejected = path / REJECTED
        extra = f" (only rejected builds under {rejected})" if rejected.is_dir() else ""
        raise UsageError(f"{path} holds no Kiln export{extra}", "pass the directory written by `kiln export --out`")
    for directory in found:
        check_tree(directory, path)  # nothing read from an export may come from outside it
    return found


def load(path: str | Path, target: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load an export directory (or one target of a multi-target export) as a callable model.

    `trust_pickle`: a `pt2` export's archive may run its pickles (see `kiln.compiler.capture.pt2_archive`).
    """
    from kiln.targets import get_target

    directories = export_dirs(path)
    if target is not None:
        wanted = get_target(target).name
        directories = [d for d in directories if Manifest.read(d).target == wanted]
        if not directories:
            raise UsageError(f"{path} has no export for target {wanted}", "check the targets it was exported to")
    if len(directories) > 1:
        names = ", ".join(d.name for d in directories)
        raise UsageError(f"{path} holds several exports ({names})", "pass target=NAME, or the subdirectory itself")
    artifact = Artifact.read(directories[0])
    _check_runnable(artifact.manifest)
    with trusting_pickles(trust_pickle):
        runner = load_runner(artifact)
    return LoadedModel(artifact.directory, artifact.manifest, runner)


def check_files(directory: Path, manifest: Manifest) -> None:
    """Raise if an artifact file is missing, differs from what the manifest recorded, or is not in the manifest
    (the target's own `later_files` and `kiln bench`'s BENCH_FILE excepted)."""
    from kiln.targets import get_target

    actual = {f.path: f for f in hash_files(directory)}
    recorded_paths = {f.path for f in manifest.files} | set(get_target(manifest.target).later_files) | {BENCH_FILE}
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
        if found.sha256 != recorded.sha256 or found.size != recorded.size:
            what = "sha256 differs" if found.sha256 != recorded.sha256 else f"{found.size} bytes, not {recorded.size}"
            raise UsageError(
                f"{directory}: {recorded.path} changed since export ({what})",
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

    `trust_pickle`: a `.pt2` model or `pt2` export may run its pickles (see `kiln.compiler.capture.pt2_archive`).
    """
    for directory in export_dirs(path):
        artifact = Artifact.read(directory)
        manifest = artifact.manifest
        check_files(directory, manifest)
        samples = ParitySamples.load(directory, manifest.parity.sample_origins if manifest.parity else [])
        notes: list[str] = []
        generation = manifest.parity is not None and manifest.parity.generation is not None
        if generation:
            yield _verify_generation(artifact, model, trust_pickle, samples, notes)
            continue
        if model is not None:
            with trusting_pickles(trust_pickle):
                samples, reference_name = _model_reference(model, manifest, samples, notes, directory)
        elif samples is None:
            raise UsageError(f"{directory} stored no reference outputs", "pass --model SOURCE to recompute them")
        else:
            reference_name = f"stored reference ({manifest.source.get('reference', 'unknown')})"
        _check_runnable(manifest)
        with trusting_pickles(trust_pickle):
            report = validate(artifact, samples, _tolerance(manifest), reference_name)
        yield Verification(directory, manifest, report, notes)


def _tolerance(manifest: Manifest) -> Tolerance:
    """The tolerance an export was judged at."""
    return manifest.parity.tolerance if manifest.parity else Tolerance.for_precision(manifest.precision)


def _verify_generation(
    artifact: Artifact, model: str | None, trust_pickle: bool, stored: ParitySamples | None, notes: list[str]
) -> Verification:
    """`kiln verify` of a text-generation export. With `--model` (a causal LM), the whole gate again against that
    model: decoding states it makes, and greedy decoding judged on its logits. Without, the stored decoding states
    and reference outputs, and the stored prompts decoded again to the stored reference tokens."""
    from kiln.compiler.capture.sources import load_source
    from kiln.compiler.generation.causal_lm import decoder_spec, is_causal_lm
    from kiln.compiler.generation.decoding import DecoderSpec, layout_of
    from kiln.compiler.generation.gate import (
        CausalLMReference,
        capacity_of,
        decoding_samples,
        gate_prompts,
        generation_parity,
        replay_generation,
    )

    manifest = artifact.manifest
    assert manifest.parity is not None
    spec, layout, tolerance = (
        DecoderSpec.from_dict(manifest.source.get("decoder")),
        layout_of(manifest.inputs),
        _tolerance(manifest),
    )
    _check_runnable(manifest)
    if model is None:
        if stored is None:
            raise UsageError(
                f"{artifact.directory} stored no reference outputs", "pass --model SOURCE to recompute them"
            )
        report = validate(artifact, stored, tolerance, f"stored reference ({manifest.source.get('reference')})")
        report = replay_generation(report, artifact, spec, manifest.parity.generation or {})
        return Verification(artifact.directory, manifest, report, notes)
    with trusting_pickles(trust_pickle):
        source = load_source(model)
    if source.kind != "torch" or not is_causal_lm(source.module):
        raise UsageError(
            f"{source.description} is not a transformers causal LM, but the export is a text-generation export",
            "pass the *ForCausalLM model it was exported from",
        )
    assert source.module is not None
    if decoder_spec(source.module) != spec:
        raise UsageError(
            f"{source.description} is not the decoder exported: vocabulary, positions or attention layers differ "
            f"({decoder_spec(source.module).to_dict()} vs {spec.to_dict()})",
            "pass the *ForCausalLM model it was exported from",
        )
    if source.state_hash != manifest.source.get("state_hash"):
        notes.append(f"{model} has different weights from the model exported (state hash differs)")
    reference = CausalLMReference(source.module)
    samples = decoding_samples(reference, layout, spec, len(manifest.parity.sample_origins))
    report = validate(artifact, samples, tolerance, reference.name)
    plan = gate_prompts(spec, capacity_of(spec, layout))
    record = generation_parity(load_runner(artifact).run, layout, reference, plan, tolerance)
    report = replace(report, passed=report.passed and record["passed"], generation=record)
    return Verification(artifact.directory, manifest, report, notes)


def _model_reference(
    model: str, manifest: Manifest, samples: ParitySamples | None, notes: list[str], directory: Path
) -> tuple[ParitySamples, str]:
    """The stored parity inputs with reference outputs recomputed from `model`; a note when its weights differ."""
    from kiln.compiler.capture.sources import load_source
    from kiln.compiler.parity.reference import check_model_inputs, reference_runner

    source = load_source(model)
    if source.state_hash != manifest.source.get("state_hash"):
        notes.append(f"{model} has different weights from the model exported (state hash differs)")
    if samples is None:
        raise UsageError(f"{directory} stored no parity inputs", "re-export to store them")
    examples = [TensorSpec(str(i), tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for i, t in enumerate(source.example_inputs)]  # fmt: skip
    check_model_inputs(model, examples, manifest.inputs)
    reference = reference_runner(source, manifest.inputs, manifest.outputs)
    try:
        samples.reference = [reference(feeds) for feeds in samples.inputs]
    except KilnError:
        raise
    except Exception as exc:  # the user's model failing on the export's own inputs: not this export's fault
        raise UsageError(
            f"{model} fails on the parity inputs stored in {directory} ({error_text(exc, 200)})",
            "pass the model the export was made from",
        ) from None
    missing = [s.name for s in manifest.outputs if any(s.name not in outputs for outputs in samples.reference)]
    if missing:
        raise UsageError(
            f"{model} returns fewer outputs than the export in {directory} (none for {', '.join(missing)})",
            "pass the model the export was made from",
        )
    return samples, source.reference_name


def _check_runnable(manifest: Manifest) -> None:
    """A one-line error when this machine lacks what the export's target needs."""
    from kiln.targets import get_target

    backend = get_target(manifest.target)
    reason = backend.unavailable_reason()
    if reason:
        raise MissingBackendError(f"cannot run the {backend.name} export here: {reason}", "install what it needs")
