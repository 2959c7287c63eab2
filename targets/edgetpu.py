"""`edgetpu` (alias `coral`): a fully-int8, batch-1 TFLite model for the Coral Edge TPU, with an audit.

The audit checks every op against the Edge TPU's published supported-operation list and its
constraints (coral.ai/docs/edgetpu/models-intro, "Supported operations"; compiler 16): static
shapes, 8-bit quantized tensors, at most 3 dimensions larger than 1, and per-op limits. The
compiler maps ops to the Edge TPU until the first op it cannot map; that op and every op after it
run on the CPU. The audit needs no compiler. When `edgetpu_compiler` is on PATH it is run too.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target
from kiln.targets.litert import MODEL_FILE, LiteRtRunner, TfliteOp, read_ops

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest

COMPILER = "edgetpu_compiler"
COMPILED_FILE = "model_edgetpu.tflite"
COMPILER_LOG = "model_edgetpu.log"
COMPILER_TIMEOUT_S = 600
QUANTIZED_TYPES = ("INT8", "UINT8")


def _no_fused_activation(op: TfliteOp) -> str | None:
    if op.options.get("fusedActivationFunction", 0):
        return "fused activation function not supported"
    return None


def _spatial_axes_only(axes: tuple[int, ...] | None, rank: int) -> bool:
    """Only the x/y (H, W) axes of an NHWC tensor."""
    return axes is not None and all(a % rank in (1, 2) for a in axes)


def _mean(op: TfliteOp) -> str | None:
    axes = op.inputs[1].values if len(op.inputs) > 1 else None
    if not _spatial_axes_only(axes, len(op.inputs[0].shape)):
        return f"reduces along axes {list(axes or [])}: only x/y (axes 1, 2 of NHWC) are supported"
    return None


def _pad(op: TfliteOp) -> str | None:
    paddings = op.inputs[1].values if len(op.inputs) > 1 else None
    if paddings is None:
        return "paddings are not a constant"
    padded = [axis for axis in range(len(paddings) // 2) if paddings[2 * axis] or paddings[2 * axis + 1]]
    if not _spatial_axes_only(tuple(padded), len(op.inputs[0].shape)) and padded:
        return f"pads axes {padded}: only x/y (axes 1, 2 of NHWC) are supported"
    return None


def _concatenation(op: TfliteOp) -> str | None:
    constants = [t for t in op.inputs if t.constant]
    if constants and len(op.inputs) != 2:
        return "a constant input is only allowed with exactly 2 inputs (zero padding)"
    return _no_fused_activation(op)


# TFLite builtin -> extra check (None: no documented limit Kiln can check).
SUPPORTED_OPS: dict[str, Callable[[TfliteOp], str | None] | None] = {
    "ADD": None,
    "AVERAGE_POOL_2D": _no_fused_activation,
    "CONCATENATION": _concatenation,
    "CONV_2D": None,
    "DEPTHWISE_CONV_2D": None,
    "EXPAND_DIMS": None,
    "FULLY_CONNECTED": None,
    "L2_NORMALIZATION": None,
    "LOGISTIC": None,
    "UNIDIRECTIONAL_SEQUENCE_LSTM": None,
    "MAXIMUM": None,
    "MAX_POOL_2D": _no_fused_activation,
    "MEAN": _mean,
    "MINIMUM": None,
    "MUL": None,
    "PACK": None,
    "PAD": _pad,
    "PRELU": None,
    "QUANTIZE": None,
    "REDUCE_MAX": None,
    "REDUCE_MIN": None,
    "RELU": None,
    "RELU6": None,
    "RELU_N1_TO_1": None,
    "RESHAPE": None,
    "RESIZE_BILINEAR": None,
    "RESIZE_NEAREST_NEIGHBOR": None,
    "RSQRT": None,
    "SLICE": None,
    "SOFTMAX": None,
    "SPACE_TO_DEPTH": None,
    "SPLIT": None,
    "SQUEEZE": None,
    "STRIDED_SLICE": None,
    "SUB": None,
    "SUM": None,
    "SQUARED_DIFFERENCE": None,
    "TANH": None,
    "TRANSPOSE": None,
    "TRANSPOSE_CONV": None,
}


@dataclass(frozen=True)
class OpVerdict:
    """Where one op will run, and why not on the Edge TPU if not."""

    index: int
    op: str
    placement: str  # "edgetpu", "cpu (unsupported)", "cpu (after first fallback)"
    reason: str = ""


def check_op(op: TfliteOp) -> str:
    """Why the Edge TPU cannot run this op ('' when it can)."""
    if op.name not in SUPPORTED_OPS:
        return f"{op.name} is not in the Edge TPU's supported operations"
    for tensor in [*op.inputs, *op.outputs]:
        if -1 in tensor.signature_shape:
            return f"tensor {tensor.name} has a dynamic shape {list(tensor.signature_shape)}"
    activations = [t for t in op.inputs if not t.constant] + list(op.outputs)
    wide = [t for t in activations if t.dtype not in QUANTIZED_TYPES and not (t.dtype == "INT32" and t.constant)]
    if wide and op.name != "QUANTIZE":
        return f"tensor {wide[0].name} is {wide[0].dtype}, not 8-bit quantized"
    for tensor in activations:
        if len(tensor.shape) > 3 and any(d > 1 for d in tensor.shape[:-3]):
            return f"tensor {tensor.name} {list(tensor.shape)} has more than 3 dimensions larger than 1"
    extra = SUPPORTED_OPS[op.name]
    return (extra(op) or "") if extra else ""


def audit(ops: list[TfliteOp]) -> dict[str, Any]:
    """Per-op placement on the Edge TPU or the CPU, and where the first fallback splits the graph."""
    verdicts = []
    first_fallback: OpVerdict | None = None
    for op in ops:
        reason = check_op(op)
        if reason:
            verdict = OpVerdict(op.index, op.name, "cpu (unsupported)", reason)
            first_fallback = first_fallback or verdict
        elif first_fallback is not None:
            verdict = OpVerdict(op.index, op.name, "cpu (after first fallback)")
        else:
            verdict = OpVerdict(op.index, op.name, "edgetpu")
        verdicts.append(verdict)
    mapped = sum(1 for v in verdicts if v.placement == "edgetpu")
    unsupported = sorted({v.op for v in verdicts if v.placement == "cpu (unsupported)"})
    return {
        "ops_total": len(verdicts),
        "ops_on_edgetpu": mapped,
        "all_mapped": mapped == len(verdicts),
        "unsupported_ops": unsupported,
        "first_fallback": asdict(first_fallback) if first_fallback else None,
        "ops": [asdict(v) for v in verdicts],
        "source": "coral.ai/docs/edgetpu/models-intro supported operations (compiler 16)",
    }


def run_compiler(directory: Path) -> dict[str, Any]:
    """Run `edgetpu_compiler` on the int8 model when it is on PATH; its log and result."""
    from kiln.compiler.errors import UnsupportedOpError

    executable = shutil.which(COMPILER)
    if executable is None:
        return {"ran": False, "reason": f"{COMPILER} is not on PATH"}
    try:
        completed = subprocess.run(
            [executable, "-s", "-o", str(directory), str(directory / MODEL_FILE)],
            capture_output=True,
            text=True,
            timeout=COMPILER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnsupportedOpError(
            f"{COMPILER} did not finish in {COMPILER_TIMEOUT_S} s", "compile model.tflite by hand"
        ) from None
    log = (completed.stdout + completed.stderr).strip()
    if completed.returncode != 0 or not (directory / COMPILED_FILE).is_file():
        last = log.splitlines()[-1] if log else "no output"
        raise UnsupportedOpError(
            f"{COMPILER} failed (exit {completed.returncode}): {last[:200]}",
            "read the compiler's message; without edgetpu_compiler on PATH the export keeps the int8 model and audit",
        )
    (directory / COMPILER_LOG).write_text(log + "\n")
    return {"ran": True, "executable": executable, "exit_code": 0, "output": COMPILED_FILE, "log": log}


class EdgeTpuTarget(Target):
    """Full-integer int8 TFLite at batch 1 for the Coral Edge TPU, audited op by op."""

    name = "edgetpu"
    aliases = ("coral",)
    description = "fully-int8 batch-1 TFLite for the Coral Edge TPU, with an op audit; runs edgetpu_compiler if present"
    requires: ClassVar[dict[str, str]] = {
        "litert_torch": "litert-torch",
        "ai_edge_litert": "ai-edge-litert",
        "ai_edge_quantizer": "ai-edge-quantizer",
    }
    precisions = ("int8",)
    consumes = "torch"
    static_shapes = True
    fixed_batch = 1
    io_options = ("nhwc",)

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Quantize to int8 with calibration, audit the ops, and compile when the compiler is here."""
        from kiln.targets.tflite import add_nhwc_layout, calibration_notes, convert, describe_graph

        nhwc = request.io_layout == "nhwc"
        info = describe_graph(directory, convert(model, directory, request, "int8"), nhwc)
        report = audit(read_ops(directory / MODEL_FILE))
        compiled = run_compiler(directory)
        notes = calibration_notes(info)
        if not report["all_mapped"]:
            first = report["first_fallback"]
            notes.append(
                f"Edge TPU audit: {report['ops_on_edgetpu']}/{report['ops_total']} ops map to the Edge TPU; "
                f"op {first['index']} ({first['op']}: {first['reason']}) and everything after it run on the CPU"
            )
        if not compiled["ran"]:
            notes.append(f"{COMPILER} is not on PATH: kept the int8 model; compile it with: {COMPILER} -s model.tflite")
        built = BuildOutput(
            runtime_config={"signature": "serving_default", "batch": 1},
            info={**info, "edgetpu_audit": report, "edgetpu_compiler": compiled},
            notes=notes,
        )
        if nhwc:
            add_nhwc_layout(model, directory, built)
        return built

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """The int8 model in the LiteRT interpreter on the CPU (an Edge TPU is not needed for parity)."""
        return LiteRtRunner(directory / MODEL_FILE, manifest, threads=threads)
