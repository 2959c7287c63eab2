"""LiteRT (TFLite) building blocks shared by the `tflite` and `edgetpu` targets.

Conversion: the `torch.export` program -> Kiln's TFLite decompositions -> `litert_torch.convert`
(named inputs and outputs, optional channels-last image I/O) -> a float32 `.tflite`, which
compiler/quantization/litert.py quantizes (fp16 weights, dynamic-range int8, calibrated full-integer int8).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.image_layout import NCHW_TO_NHWC, NHWC_TO_NCHW, is_image
from kiln.compiler.quantization.litert import SIGNATURE
from kiln.targets.base import Runner

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:
    import numpy as np
    import torch
    from kiln.compiler.types import Manifest, TensorSpec

MODEL_FILE = "model.tflite"
THREADS = 2


def to_tflite_signatures(
    programs: list[tuple[str, torch.export.ExportedProgram, list[TensorSpec], list[TensorSpec]]], nhwc: bool, path: Path
) -> list[str]:
    """Convert static programs to one float32 `.tflite` with one named-I/O signature each (`--buckets`: one per
    size); the ops Kiln decomposed first, in any of them."""
    import litert_torch

    converter: Any = litert_torch
    decomposed: list[str] = []
    for name, program, inputs, outputs in programs:
        wrapper, samples, applied = _named_io(program, inputs, outputs, nhwc)
        converter = converter.signature(name, wrapper, sample_kwargs=samples)
        decomposed += [op for op in applied if op not in decomposed]
    edge_model = converter.convert()
    edge_model.export(str(path))
    return decomposed


def _named_io(
    program: torch.export.ExportedProgram, inputs: list[TensorSpec], outputs: list[TensorSpec], nhwc: bool
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    """The program (decomposed for TFLite) wrapped to take keyword inputs and return a dict of outputs, so the
    TFLite signature carries Kiln's names; its sample inputs, and the ops decomposed."""
    import torch
    from kiln.compiler.capture.decompositions import (
        apply_decompositions,
        apply_legalizations,
        tflite_legalizations,
        tflite_table,
    )

    program, legalized = apply_legalizations(program, tflite_legalizations())
    program, decomposed = apply_decompositions(program, tflite_table())
    inner = program.module()
    image_inputs = {s.name for s in inputs if nhwc and is_image(s)}
    image_outputs = {s.name for s in outputs if nhwc and is_image(s)}
    names = [s.name for s in outputs]

    class NamedIO(torch.nn.Module):
        """Keyword inputs and a dict of outputs, so the TFLite signature carries Kiln's names."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
            args = [feeds[s.name].permute(*NHWC_TO_NCHW) if s.name in image_inputs else feeds[s.name] for s in inputs]
            leaves = torch.utils._pytree.tree_leaves(self.inner(*args))
            return {
                name: leaf.permute(*NCHW_TO_NHWC) if name in image_outputs else leaf
                for name, leaf in zip(names, leaves)
            }

    args, _ = program.example_inputs
    samples = {
        s.name: value.permute(*NCHW_TO_NHWC).contiguous() if s.name in image_inputs else value
        for s, value in zip(inputs, args)
    }
    wrapper = NamedIO()
    wrapper.training = False  # not .eval(): an exported module refuses train()/eval() calls
    return wrapper, samples, decomposed + legalized


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor of a TFLite graph as the audit sees it."""

    name: str
    dtype: str  # TFLite type name: FLOAT32, INT8, UINT8, INT32...
    shape: tuple[int, ...]
    signature_shape: tuple[int, ...]  # -1 marks a dynamic dim
    constant: bool
    values: tuple[int, ...] | None = None  # small int32 constants (axes, paddings), for the audit


@dataclass(frozen=True)
class TfliteOp:
    """One operator of a TFLite graph, in execution order."""

    index: int
    name: str  # builtin name, e.g. CONV_2D, or the custom op's code
    inputs: tuple[TfliteTensor, ...]
    outputs: tuple[TfliteTensor, ...]
    options: dict[str, Any]


def read_ops(path: Path) -> list[TfliteOp]:
    """The operators of the main subgraph of a `.tflite` file, read from its flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = model.subgraphs[0]

    def tensor(index: int) -> TfliteTensor:
        import numpy as np

        t = graph.tensors[index]
        buffer = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
        data = buffer.data if buffer is not None and buffer.data is not None and len(buffer.data) else None
        has_data = data is not None or bool(buffer is not None and buffer.size)
        values = None
        if data is not None and t.type == schema.TensorType.INT32 and len(data) <= 64:
            values = tuple(int(v) for v in np.frombuffer(bytes(bytearray(data)), dtype=np.int32))
        return TfliteTensor(
            name=t.name.decode() if isinstance(t.name, bytes) else str(t.name),
            dtype=type_names.get(t.type, str(t.type)),
            shape=tuple(int(d) for d in (t.shape if t.shape is not None else [])),
            signature_shape=tuple(int(d) for d in (t.shape if t.shapeSignature is None else t.shapeSignature)),
            constant=has_data,
            values=values,
        )

    ops = []
    for index, op in enumerate(graph.operators):
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = op_names.get(builtin, str(builtin))
        if name == "CUSTOM":
            name = f"CUSTOM:{code.customCode.decode() if code.customCode else '?'}"
        options = {k: v for k, v in vars(op.builtinOptions).items()} if op.builtinOptions is not None else {}
        ops.append(
            TfliteOp(
                index=index,
                name=name,
                inputs=tuple(tensor(i) for i in op.inputs if i >= 0),
                outputs=tuple(tensor(i) for i in op.outputs),
                options=options,
            )
        )
    return ops


def op_counts(ops: list[TfliteOp]) -> dict[str, int]:
    """Operator name -> count, most frequent first."""
    return dict(Counter(op.name for op in ops).most_common())


class LiteRtRunner(Runner):
    """Runs a `.tflite` with the LiteRT interpreter (XNNPACK), quantizing inputs and dequantizing outputs."""

    thread_control = "litert num_threads"

    def __init__(self, path: Path, manifest: Manifest, threads: int | None = None):
        threads = threads or THREADS
        from ai_edge_litert.interpreter import Interpreter
        from kiln.compiler.progress import native_stderr_silenced

        with native_stderr_silenced():  # LiteRT logs "INFO: Created ... XNNPACK delegate" from C++
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
            # `--buckets`: one signature per bucket, picked by the inputs' shapes
            self.buckets: dict[str, dict[str, list[int]]] = manifest.runtime_config.get("buckets", {})
            names = list(self.buckets) or [SIGNATURE]
            self.signatures = {name: self.interpreter.get_signature_runner(name) for name in names}
        self.signature = self.signatures[names[0]]
        self.input_details = self.signature.get_input_details()
        self.output_details = self.signature.get_output_details()
        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.precision = manifest.precision
        self.threads = threads

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name, dequantized to float where the model's outputs are quantized."""
        import numpy as np

        signature, inputs, outputs = self.signature, self.input_details, self.output_details
        if self.buckets:
            from kiln.targets.buckets import bucket_for

            signature = self.signatures[bucket_for("tflite", self.buckets, feeds)]
            inputs, outputs = signature.get_input_details(), signature.get_output_details()
        args = {name: _quantize(np.asarray(feeds[name]), detail) for name, detail in inputs.items()}
        results = signature(**args)
        return {spec.name: _dequantize(results[spec.name], outputs[spec.name]) for spec in self.outputs}

    def io_quantization(self) -> dict[str, dict[str, Any]]:
        """Per quantized input/output: dtype, scale and zero point the model itself declares."""
        found = {}
        for name, detail in [*self.input_details.items(), *self.output_details.items()]:
            scale, zero_point = detail["quantization"]
            if scale:
                found[name] = {"dtype": detail["dtype"].__name__, "scale": float(scale), "zero_point": int(zero_point)}
        return found

    def runtime_info(self) -> dict[str, Any]:
        """Runtime, threads, the compute precision and how I/O is (de)quantized."""
        from importlib.metadata import version

        compute = {"int8": "int8", "int8-dynamic": "int8 weights, dynamic int8/f32 activations"}
        return {
            "runtime": f"ai-edge-litert {version('ai-edge-litert')} interpreter (XNNPACK)",
            "threads": self.threads,
            "inference_precision": compute.get(self.precision, "f32"),
            "io_quantization": self.io_quantization(),
        }


def _quantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A float input quantized with the model's own scale and zero point, or cast to the model's dtype."""
    import numpy as np

    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if scale and value.dtype.kind == "f":
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale) + zero_point, info.min, info.max).astype(dtype)
    return value.astype(dtype, copy=False)


def _dequantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    import numpy as np

    scale, zero_point = detail["quantization"]
    if scale:
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value


def converter_error_op(text: str) -> str | None:
    """The op a LiteRT conversion failure names (`aten.x`, `tfl.x`, `stablehlo.x`), if any."""
    match = re.search(r"\b((?:aten|tfl|stablehlo|chlo)[.:]+[A-Za-z_][\w.]*)", text)
    return match[1] if match else None
