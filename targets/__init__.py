"""The target registry: every backend Kiln can emit, looked up by name or alias."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.targets.aoti import AotiTarget
from kiln.targets.base import Target
from kiln.targets.edgetpu import EdgeTpuTarget
from kiln.targets.onnxrt import OnnxRuntimeTarget
from kiln.targets.openvino_ir import OpenVinoTarget
from kiln.targets.pt2 import ExportedProgramTarget
from kiln.targets.tensorrt import TensorRtTarget
from kiln.targets.tflite import TfliteTarget
from kiln.targets.tpu import XlaTarget

TARGETS: list[Target] = [
    OnnxRuntimeTarget(),
    OpenVinoTarget(),
    ExportedProgramTarget(),
    XlaTarget(),
    TfliteTarget(),
    EdgeTpuTarget(),
    AotiTarget(),
    TensorRtTarget(),
]


def _by_name() -> dict[str, Target]:
    names: dict[str, Target] = {}
    for target in TARGETS:
        for name in (target.name, *target.aliases):
            names[name] = target
    return names


def get_target(name: str) -> Target:
    """The target called `name` (or one of its aliases); a suggestion when there is none."""
    names = _by_name()
    key = name.strip().lower()
    if key in names:
        return names[key]
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f"did you mean {close[0]}?" if close else "run `kiln targets` to list them"
    raise UsageError(f"unknown target '{name}'", hint)


def resolve_targets(spec: str | list[str]) -> list[Target]:
    """Targets from a comma list (or list) of names; `all` means every target fully built and validated here
    (available, with no limitation: e.g. `aoti` without a CUDA GPU, or `tensorrt` without TensorRT, must be named)."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise UsageError("no target given", "pass --target NAME, a comma list, or all")
    if "all" in names:
        chosen = [t for t in TARGETS if t.unavailable_reason() is None and t.limitation() is None]
        if not chosen:
            raise UsageError("no target is available on this machine", "run `kiln targets` to see what is missing")
        return chosen
    chosen = []
    for name in names:
        target = get_target(name)
        if target not in chosen:
            chosen.append(target)
    return chosen


def onnx_reference_runner(path: Path, threads: int | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The reference of an `.onnx` source: the file itself under ONNX Runtime (CPU provider)."""
    from kiln.targets.onnxrt import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, threads=threads or 0).run
