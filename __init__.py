"""Kiln: export PyTorch models to GPU, TPU, Edge TPU, mobile and CPU artifacts, with proven parity.

Library use::

    from kiln import export, load
    result = export(model, (example,), target="openvino", out="exports/model")
    runner = load("exports/model")
    outputs = runner(example)

The same export as composable stages, each carrying its own state (kiln.compiler.export.stages; docs/library.md)::

    import kiln
    captured = kiln.capture(model, (example,))               # Captured: the graphs, the reference outputs
    optimized = captured.optimize("onnx")                    # Optimized: the target's graph after its passes
    built = optimized.build(precision="fp32")                # Built: the artifact
    validated = built.validate()                             # Validated: its parity report
    validated.save("exports/model")                          # published as kiln.export publishes
    timing = kiln.bench(validated)                           # its latency here

`kiln.optimize`, `kiln.build`, `kiln.validate` and `kiln.bench` are those steps as functions of the stage
before (`kiln.build(optimized, precision="int8")`); the option groups (`kiln.PassOptions`, `kiln.Thresholds`,
...) are the keywords they take.

Heavy modules (torch, onnx, runtimes) load on first use, so importing `kiln.compiler.errors`
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import (
    KilnError,
    MissingBackendError,
    ParityError,
    UnsupportedOpError,
    UsageError,
    kiln_errors_only,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from kiln.compiler.export.loading import LoadedModel
    from kiln.compiler.export.result import ExportResult
    from kiln.compiler.export.stages import Built
    from kiln.compiler.perf.timing import BenchSettings, Timing

__all__ = [
    "Artifact",
    "Calibration",
    "ExportOptions",
    "KilnError",
    "MissingBackendError",
    "OutputOptions",
    "ParityError",
    "ParityOptions",
    "PassOptions",
    "Shapes",
    "SourceOptions",
    "Thresholds",
    "UnsupportedOpError",
    "UsageError",
    "bench",
    "build",
    "capture",
    "export",
    "load",
    "optimize",
    "validate",
]
_STAGES = "kiln.compiler.export.stages"
_OPTIONS = "kiln.compiler.export.options"
# Loaded on first use: name -> (module, attribute path)
_LAZY = {
    "Artifact": ("kiln.compiler.export.artifacts", "Artifact"),
    "capture": (_STAGES, "capture_model"),
    "optimize": (_STAGES, "Captured.optimize"),
    "build": (_STAGES, "Optimized.build"),
    "validate": (_STAGES, "Built.validate"),
}
_LAZY |= {name: (_OPTIONS, name) for name in ("Calibration", "ExportOptions", "OutputOptions", "ParityOptions")}
_LAZY |= {name: (_OPTIONS, name) for name in ("PassOptions", "Shapes", "SourceOptions", "Thresholds")}
__version__ = "0.1.0"


@kiln_errors_only
def export(
    model: torch.nn.Module | str,
    example_inputs: Any = None,
    target: str = "openvino",
    out: str | Path | None = None,
    *,
    raise_on_parity_failure: bool = True,
    **options: Any,
) -> ExportResult:
    """Export `model` (a module with `example_inputs`, or a source string like `zoo:cnn`) to one target.

    `options` are the CLI's export options as keywords: `precision` (default: the target's own, fp32; int8
    for edgetpu), `device`, `dynamic_batch` ("MIN:MAX"), `dynamic` (["input_ids:1=8:128:64", ...]), `buckets`
    ("seq=32,64"), `inputs` (extra parity .npz files), `atol`, `rtol`,
    `min_cosine`, `min_snr_db`, `min_top1`, `samples`, `parity_gate`, `force`, `wait` (wait for another export
    to the same `out` instead of failing), `trust_pickle`; int8 calibration: `calib` (FILE.npz, a directory, or
    `file.py:loader`), `calib_samples`, `calib_method` (minmax, percentile, entropy), `per_channel`,
    `symmetric_activations`, and `max_drop` with an optional `metric` ("file.py:fn") for accuracy-aware int8;
    `io` (e.g. "nhwc" for channels-last I/O); `opt_level` (0 none .. 3 target-specific), `adjust_passes`
    ("+name,-name"), `passes` (an explicit list of `kiln.passes.base.Pass`), `dump_passes`, `all_or_nothing`;
    `task` ("text-generation": a causal LM with its KV cache, the default for a transformers *ForCausalLM;
    "forward": one full-sequence forward; see kiln.compiler.generation.export); `cache_size` (the static KV
    cache's length
    of a tflite/tpu text-generation export, default 64; see kiln.compiler.generation.static_kv_cache).
    An unknown keyword is a UsageError. The artifact is validated against the model; if it fails parity it is
    kept under `out/.rejected/` and `ParityError` is raised (unless `raise_on_parity_failure=False`).
    A `.pt2` model is read without running code from it; `trust_pickle=True` lets `torch.export.load`
    unpickle it (only for files you trust). Only Kiln's exceptions are raised (`KilnError` and its
    subclasses), with the CLI's messages.
    """
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets

    if not isinstance(target, str) or not target.strip() or "," in target or target.strip() == "all":
        raise UsageError(f"export() takes one target name, got {target!r}", "e.g. target='onnx'; call it per target")
    if out is not None and not isinstance(out, (str, Path)):
        raise UsageError(f"out must be a path, got {type(out).__name__}", "e.g. out='exports/model'")
    name = model if isinstance(model, str) else type(model).__name__.lower()
    destination = Path(out) if out is not None else Path("exports") / Path(str(name).split(":")[-1]).stem / target
    (result,) = export_targets(model, target, destination, export_options(**options), example_inputs=example_inputs)
    if raise_on_parity_failure and not result.published and result.parity is not None:
        failed = "; ".join(o.summary() for o in result.parity.failures())
        raise ParityError(
            f"{result.target} artifact failed parity: {failed}",
            f"inspect {result.directory}, or loosen atol/rtol if the error is acceptable",
        )
    return result


@kiln_errors_only
def load(path: str | Path, target: str | None = None, *, trust_pickle: bool = False) -> LoadedModel:
    """Load an export directory as a callable taking numpy arrays or torch tensors.

    `trust_pickle=True` lets a `pt2` export's archive run its pickles (only for exports you trust).
    """
    from kiln.compiler.export.loading import load as load_export

    if not isinstance(path, (str, Path)):
        raise UsageError(
            f"load() takes the path of an export directory, got {type(path).__name__}", "e.g. 'exports/cnn'"
        )
    return load_export(path, target, trust_pickle)


@kiln_errors_only
def bench(
    built: Built, settings: BenchSettings | None = None, feeds: dict[str, np.ndarray] | None = None
) -> Timing:
    """Time a built artifact (a `Built` or `Validated` stage) with its target's runtime on `feeds` (None: its
    first parity input set), in this process (`kiln bench` times exports in separate processes, interleaved)."""
    from kiln.compiler.perf.timing import bench as time_artifact

    return time_artifact(built.artifact, feeds if feeds is not None else built.first_inputs(), settings)


def __getattr__(name: str) -> Any:
    """The composable path's steps (`capture`, `optimize`, `build`, `validate`, `bench`), the option groups and
    `Artifact`, imported on first use."""
    if name in _LAZY:
        import functools
        import importlib

        module, path = _LAZY[name]
        return functools.reduce(getattr, path.split("."), importlib.import_module(module))
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
