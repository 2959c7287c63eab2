"""`QuantizeSummary`: what one quantization did, the result every per-toolchain quantizer returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.compiler.types import PassRecord


@dataclass(frozen=True)
class QuantizeSummary:
    """What one quantization did, whichever tool did it: the precision, the tool and calibration method, the
    settings used, which weighted nodes were converted or kept float, graph sizes before and after, time."""

    precision: str
    tool: str  # e.g. "onnxruntime quantize_static (QDQ)", "nncf 3.4.0"
    method: str  # calibration method (minmax, percentile, entropy), or "weights-only", "float16"
    settings: dict[str, Any] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    quantized: int = 0  # weighted nodes now computed at the reduced precision
    kept_float: tuple[str, ...] = ()  # weighted nodes left in float32 (excluded, or not supported)
    excluded: tuple[str, ...] = ()  # nodes the caller asked to keep in float32
    seconds: float = 0.0
    notes: tuple[str, ...] = ()  # what differs from what was asked (e.g. a calibration method the tool lacks)
    ir: str = "onnx"  # the graph it ran on: onnx, or the runtime's own (openvino, tflite)

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-able data for the manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def pass_record(self) -> PassRecord:
        """The manifest's record of this quantization as a pass over the graph."""
        return PassRecord(
            f"quantize-{self.precision}", True, self.nodes_before, self.nodes_after, round(self.seconds, 4), self.ir
        )
