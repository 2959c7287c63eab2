"""`onnx`: the ONNX file itself (fp32, or quantized by compiler/quantize.py), validated with ONNX Runtime's CPU
provider."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from targets.base import BuildOutput, BuildRequest, Runner, Target

if TYPE_CHECKING:
    import numpy as np

    from compiler.capture import CapturedModel
    from compiler.types import Manifest

MODEL_FILE = "model.onnx"
INFERENCE_PRECISION = {
    "int8": "int8 (Q/DQ fused into ONNX Runtime's integer kernels; uint8 activations)",
    "int8-dynamic": "int8 weights, activations quantized at run time; other ops f32",
    "fp16": "fp16 weights and activations; f32 where ONNX Runtime's CPU provider has no fp16 kernel (it casts)",
}


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file with ONNX Runtime (CPU provider)."""

    def __init__(self, path: Path, manifest: Manifest | None = None, threads: int = 0):
        import onnxruntime as ort

        from compiler.types import TensorSpec

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.precision = manifest.precision if manifest is not None else "fp32"
        if manifest is not None:
            self.inputs, self.outputs = manifest.inputs, manifest.outputs
        else:
            self.inputs = [TensorSpec(i.name, tuple(i.shape), _ort_dtype(i.type)) for i in self.session.get_inputs()]
            self.outputs = [TensorSpec(o.name, tuple(o.shape), _ort_dtype(o.type)) for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def runtime_info(self) -> dict[str, Any]:
        """Provider and ONNX Runtime version."""
        import onnxruntime as ort

        return {
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": self.session.get_providers(),
            "inference_precision": INFERENCE_PRECISION.get(self.precision, self.precision),
        }


def _ort_dtype(type_string: str) -> str:
    """`tensor(float)` -> `float32`."""
    import numpy as np

    inner = type_string.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64", "float16": "float16"}.get(inner, inner)).name


class OnnxRuntimeTarget(Target):
    """The optimized ONNX graph, for ONNX Runtime or any ONNX consumer."""

    name = "onnx"
    aliases = ("onnxruntime", "ort")
    description = "ONNX file (opset >= 18), validated with ONNX Runtime on the CPU"
    requires: ClassVar[dict[str, str]] = {"onnx": "onnx", "onnxruntime": "onnxruntime"}
    precisions = ("fp32", "int8", "int8-dynamic", "fp16")  # bf16: ORT's CPU provider has no bf16 kernels

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Copy the optimized ONNX file (and any external data) into the artifact directory, or write it
        quantized at the requested precision."""
        assert model.onnx_path is not None, "an ONNX target needs the lowered graph"
        runtime_config = {"providers": ["CPUExecutionProvider"]}
        if request.precision == "fp32":
            for file in model.onnx_path.parent.iterdir():
                shutil.copy2(file, directory / (MODEL_FILE if file == model.onnx_path else file.name))
            return BuildOutput(runtime_config=runtime_config)
        from compiler.quantize import quantize_onnx

        calibration = request.calibration
        summary = quantize_onnx(model.onnx_path, directory / MODEL_FILE, request.precision, calibration)
        info = {**summary.to_dict(), "calibration": calibration.summary() if calibration is not None else None}
        notes = [
            f"{request.precision}: {summary.quantized} weighted nodes converted"
            + (f", {len(summary.kept_float)} kept in float32" if summary.kept_float else "")
        ]
        return BuildOutput(
            runtime_config=runtime_config,
            info={"quantization": info},
            notes=notes,
            passes=[summary.pass_record()],
        )

    def load(self, directory: Path, manifest: Manifest) -> Runner:
        """An ONNX Runtime session on the artifact."""
        return OnnxRuntimeRunner(directory / MODEL_FILE, manifest)
