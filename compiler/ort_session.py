"""ONNX Runtime sessions, made one way: the CPU provider, its log quiet, and when asked a thread count and a graph
optimization level. The `onnx` target runs its artifacts with them, and so do the checks that run an ONNX graph
on the way (a pass's contract, a QDQ model's per-layer report, an .onnx source's reference, localization's taps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")  # ONNX Runtime's, by the names Kiln records


def graph_optimization_level(name: str) -> Any:
    """ONNX Runtime's GraphOptimizationLevel for "disable", "basic", "extended" or "all"; a UsageError otherwise."""
    import onnxruntime as ort

    if name not in GRAPH_OPTIMIZATION_LEVELS:
        raise UsageError(
            f"ONNX Runtime graph optimization level {name!r} is unknown", f"use {', '.join(GRAPH_OPTIMIZATION_LEVELS)}"
        )
    return getattr(ort.GraphOptimizationLevel, "ORT_DISABLE_ALL" if name == "disable" else f"ORT_ENABLE_{name.upper()}")


def ort_session(model: Path | str | bytes, threads: int = 0, optimization: str | None = None) -> Any:
    """An `onnxruntime.InferenceSession` on the CPU provider for `model` (a file, or a serialized ModelProto):
    `threads` intra-op threads (0: ONNX Runtime's default), `optimization` one of GRAPH_OPTIMIZATION_LEVELS (None:
    ONNX Runtime's default, all); warnings are not logged."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if optimization is not None:
        options.graph_optimization_level = graph_optimization_level(optimization)
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )
