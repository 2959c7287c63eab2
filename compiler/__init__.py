"""Kiln: export PyTorch models to GPU, TPU, Edge TPU, mobile and CPU artifacts, with proven parity.

Library use::

    from compiler import export, load
    result = export(model, (example,), target="openvino", out="exports/model")
    runner = load("exports/model")
    outputs = runner(example)

Heavy modules (torch, onnx, runtimes) load on first use, so importing `compiler.errors`
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.errors import KilnError, MissingBackendError, ParityError, UnsupportedOpError, UsageError

if TYPE_CHECKING:
    import torch

    from compiler.runner import LoadedModel
    from compiler.types import ExportResult

__all__ = ["KilnError", "MissingBackendError", "ParityError", "UnsupportedOpError", "UsageError", "export", "load"]
__version__ = "0.1.0"


def export(
    model: torch.nn.Module | str,
    example_inputs: Any = None,
    target: str = "openvino",
    out: str | Path | None = None,
    *,
    precision: str | None = None,
    device: str | None = None,
    dynamic_batch: str | None = None,
    calib: str | Path | None = None,
    calib_samples: int = 100,
    calib_method: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool | None = None,
    max_drop: float | None = None,
    metric: str | None = None,
    io: str | None = None,
    inputs: list[str | Path] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    samples: int = 4,
    parity_gate: bool = True,
    force: bool = False,
    passes: list[Any] | None = None,
    opt_level: int = 2,
    adjust_passes: str | None = None,
    raise_on_parity_failure: bool = True,
    trust_pickle: bool = False,
) -> ExportResult:
    """Export `model` (a module with `example_inputs`, or a source string like `zoo:cnn`) to one target.

    `precision` defaults to the target's own (fp32; int8 for edgetpu); `calib` is calibration data
    for int8 (FILE.npz, a directory, or `file.py:loader`); `io` is e.g. "nhwc" for channels-last I/O.
    `calib_method` (minmax, percentile, entropy), `per_channel` and `symmetric_activations` say how int8
    is calibrated; `max_drop` (with an optional `metric`, "file.py:fn") makes int8 accuracy-aware.
    `opt_level` picks the pass pipeline (0 none .. 3 target-specific); `adjust_passes` is "+name,-name";
    `passes` replaces the pipeline with an explicit list of `passes.base.Pass`.
    The artifact is validated against the model; if it fails parity it is kept under
    `out/.rejected/` and `ParityError` is raised (unless `raise_on_parity_failure=False`).
    A `.pt2` model is read without running code from it; `trust_pickle=True` lets `torch.export.load`
    unpickle it (only for files you trust).
    """
    from compiler.options import export_options
    from compiler.pipeline import export_targets
    from compiler.pt2_archive import trusting_pickles

    if "," in target or target == "all":
        raise UsageError(f"export() takes one target, got '{target}'", "call it once per target")
    name = model if isinstance(model, str) else type(model).__name__.lower()
    options = export_options(
        precision=precision,
        device=device,
        dynamic_batch=dynamic_batch,
        inputs=inputs,
        atol=atol,
        rtol=rtol,
        samples=samples,
        parity_gate=parity_gate,
        force=force,
        passes=passes,
        opt_level=opt_level,
        adjust_passes=adjust_passes,
        calib=calib,
        calib_samples=calib_samples,
        calib_method=calib_method,
        per_channel=per_channel,
        symmetric_activations=symmetric_activations,
        max_drop=max_drop,
        metric=metric,
        io=io,
        trust_pickle=trust_pickle,
    )
    destination = Path(out) if out is not None else Path("exports") / Path(str(name).split(":")[-1]).stem / target
    with trusting_pickles(options.trust_pickle):
        (result,) = export_targets(model, target, destination, options, example_inputs=example_inputs)
    if raise_on_parity_failure and not result.published and result.parity is not None:
        failed = "; ".join(o.summary() for o in result.parity.failures())
        raise ParityError(
            f"{result.target} artifact failed parity: {failed}",
            f"inspect {result.directory}, or loosen atol/rtol if the error is acceptable",
        )
    return result


def load(path: str | Path, target: str | None = None, *, trust_pickle: bool = False) -> LoadedModel:
    """Load an export directory as a callable taking numpy arrays or torch tensors.

    `trust_pickle=True` lets a `pt2` export's archive run its pickles (only for exports you trust).
    """
    from compiler.runner import load as load_export

    return load_export(path, target, trust_pickle)
