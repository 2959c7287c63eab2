"""The manifest of an export directory, assembled from its typed parts in one function.

`assemble_manifest(parts)` is the only place a Manifest is made for a new build: `build()` calls it with what
loading the artifact needs (target, precision, I/O, runtime config), and the pipeline calls it again with the
same parts plus provenance, pass records, the parity report and the stage times.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kiln.compiler.host import host_info, versions
from kiln.compiler.image_layout import NCHW_TO_NHWC, NHWC
from kiln.compiler.types import ArtifactFile, Manifest, ParityReport, PassRecord, TensorSpec

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.capture.sources import ModelSource
    from kiln.targets.base import BuildOutput, BuildRequest, Target


@dataclass
class ManifestParts:
    """What a manifest is made of: the build (target, request, graph, what the target's build returned), and,
    once known, where the model came from, the graph passes, notes, the parity verdict and the stage times."""

    target: Target
    request: BuildRequest
    model: CapturedModel
    built: BuildOutput
    source: dict[str, Any] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)  # graph passes before the build
    notes: list[str] = field(default_factory=list)  # notes of the pipeline (the build's own come from `built`)
    parity: ParityReport | None = None
    parity_gate: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    files: list[ArtifactFile] = field(default_factory=list)


def source_record(source: ModelSource) -> dict[str, Any]:
    """What the manifest says about the model an artifact came from."""
    record: dict[str, Any] = {
        "description": source.description,
        "kind": source.kind,
        "state_hash": source.state_hash,
        "reference": source.reference_name,
    }
    record |= {"decoder": source.decoder.to_dict()} if source.decoder is not None else {}
    return record | ({"checkpoint": source.origin} if source.origin else {})


def assemble_manifest(parts: ManifestParts) -> Manifest:
    """The manifest of one artifact. It is published when it passed parity, or when the gate is off."""
    built, model = parts.built, parts.model
    passed = parts.parity is not None and parts.parity.passed
    notes = list(built.notes) + parts.notes
    if parts.parity is not None and not parts.parity_gate and not passed:
        notes.append("published without passing parity (--no-parity-gate)")
    return Manifest(
        target=parts.target.name,
        precision=parts.request.precision,
        source=parts.source,
        files=parts.files,
        inputs=built.inputs or model.inputs,
        outputs=built.outputs or model.outputs,
        parity=parts.parity,
        published=parts.parity is not None and (passed or not parts.parity_gate),
        parity_gate=parts.parity_gate,
        runtime_config=built.runtime_config,
        timings=parts.timings,
        versions=versions(*parts.target.requires.values()),
        host=host_info(),
        passes=parts.passes + built.passes,
        target_info={
            "opset": model.opset,
            "dynamic_batch": str(model.dynamic) if model.dynamic and model.dynamic.batch else None,
            "dynamic": model.dynamic.records() if model.dynamic else [],
            **(model.lowering if parts.target.consumes == "onnx" else {}),
            **built.info,
        },
        notes=notes,
    )


def observed_outputs(specs: list[TensorSpec], report: ParityReport) -> list[TensorSpec]:
    """The output specs with each static dimension as the artifact really produced it (a declared shape can be
    wrong: an ONNX file may declare [1, 0] for an output of [1, 10]); named dynamic dimensions stay named."""
    produced = {o.name: o.shape for o in report.outputs if o.shape is not None}
    fixed = []
    for spec in specs:
        shape = produced.get(spec.name)
        if shape is not None and spec.layout == NHWC and len(shape) == 4:
            shape = [shape[i] for i in NCHW_TO_NHWC]  # the report's shapes are in the reference's layout
        if shape is not None and len(shape) == len(spec.shape):
            spec = replace(spec, shape=tuple(d if isinstance(d, str) else n for d, n in zip(spec.shape, shape)))
        elif shape is not None:
            spec = replace(spec, shape=tuple(shape))
        fixed.append(spec)
    return fixed


def manifest_figures(manifest: Manifest) -> dict[str, Any]:
    """What a manifest says of its artifact, as the matrix and tune report it: the worst error and cosine over
    the float outputs of its parity report (None without one) and the artifact's bytes (its files, the parity
    samples left out)."""
    size = sum(f.size for f in manifest.files if not f.path.startswith("parity/"))
    figures: dict[str, Any] = {"artifact_bytes": size}
    if manifest.parity is None:
        return figures | dict.fromkeys(("max_abs_error", "max_rel_error", "min_cosine"))
    floats = [o for o in manifest.parity.outputs if o.kind == "float"]
    return figures | {
        "max_abs_error": max((o.max_abs_error for o in floats), default=0.0),
        "max_rel_error": max((o.max_rel_error for o in floats), default=0.0),
        "min_cosine": min((o.min_cosine for o in floats), default=1.0),
    }
