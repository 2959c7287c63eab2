"""Reduced-precision ONNX graphs for ONNX Runtime: calibrated int8 (Q/DQ), weights-only int8 and fp16 (the
weight-only int8/int4 of text-generation exports, MatMulNBits, is `kiln.compiler.quantization.matmul_nbits`).

The settings were chosen by measurement on ONNX Runtime's x86 CPU kernels (MLAS):
- int8 activations are uint8 (asymmetric) by default, int8 weights, and weights use 7 bits
  (`reduce_range`): on AVX2 without VNNI the u8*s8 kernels sum pairs of products into int16
  (`vpmaddubsw`) and saturate with 8-bit weights. Measured on this AVX2 machine, the zoo CNN with
  int8 symmetric activations and 8-bit weights agreed with fp32 on 2% of top-1 predictions
  (output 24% off ORT's own un-fused Q/DQ emulation); uint8 activations and 8-bit weights were 2%
  off; with 7-bit weights both were within 0.8%, and the uint8 graph ran about 2x faster than the
  int8 one. VNNI CPUs do not saturate, so 7-bit weights are correct on every x86 CPU, at the cost of
  one bit of weight precision. The same holds for `int8-dynamic` (the zoo LSTM's cosine was 0.948
  with 8-bit weights, 0.99996 with 7 bits).
- `quant_pre_process` (symbolic shape inference + ORT graph optimization before quantizing) is not
  run: Kiln's graph already carries shapes, it changed no accuracy figure on the zoo CNNs, and on
  the zoo mobilenet it added nodes.
- a Softmax that computes a graph output keeps that output in float (no Quantize/Dequantize pair after it):
  the quantizer gives a Softmax output the fixed uint8 range [0, 1], a step of 1/255, and rounds every
  probability under 0.002 to 0, all of them for a near-uniform 1000-class output (ONNX's light squeezenet
  came out all zeros). Nothing after a graph output computes in int8, so the pair only loses precision.
- a Concat of inputs whose calibrated ranges differ by more than MIXED_RANGE_RATIO stays in float (no
  Quantize/Dequantize pair after it, nor after the data movement that follows: Reshape and its kind only quantize
  a quantized input), while each input keeps the Q/DQ pair of its own range. Quantized as one tensor, it takes
  the widest input's range: a YOLO-style head concatenating box coordinates in pixels (0..640, steps of 2.5) with
  class scores in [0, 1] rounded every score to 0 (the argmax class agreed with PyTorch on chance anchors), where
  OpenVINO's int8 was right. The ranges are read from the first calibrated graph (its scales), which is then
  calibrated again with those Concats left out.
- fp16 keeps float32 inputs and outputs and leaves `FP16_BLOCKED_OPS` in float32. ONNX Runtime's
  CPU provider runs the result, inserting casts to float32 around ops it has no fp16 kernel for.
- bf16 is not offered: ONNX Runtime's CPU provider has no bf16 kernels for MatMul, Add or Relu
  (and ONNX's Conv takes no bf16).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.quantization.qdq_graph import QdqGraph, load_onnx
from kiln.compiler.quantization.summary import QuantizeSummary

if TYPE_CHECKING:
    import onnx
    from kiln.compiler.quantization.calibration import CalibrationData, CalibrationSpec

ONNX_PRECISIONS = ("int8", "int8-dynamic", "fp16")
# Ops that carry weights: what quantization is about, and what the summary counts.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "Attention", "Gather")
# int8-dynamic: the ops ONNX Runtime has integer kernels for with float activations quantized on the fly
# (MatMulInteger / DynamicQuantizeMatMul, DynamicQuantizeLSTM, QAttention). Conv is left out: ConvInteger
# is slower than the float Conv on the CPU.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "LSTM", "Attention")
# fp16: ops left in float32 because fp16 (10-bit mantissa, max 65504) breaks them: exponentials and
# logarithms overflow or lose their small arguments; reductions and normalizations accumulate sums and
# squares over many elements (mean/variance of a LayerNorm, softmax denominators) that overflow or round
# away; Pow/Sqrt/Reciprocal/Div amplify relative error near 0; Range and CumSum build indices and running
# sums that fp16 cannot count exactly past 2048. ORT's own list (non-numeric ops, ops without fp16
# kernels) is added to it.
FRAGILE_FP16_OPS = (
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Erf",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "CumSum",
    "Range",
)
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# A Concat whose inputs' calibrated ranges differ by more than this is kept in float over its inputs, each quantized
# with its own range (see the module's docstring): one uint8 range would leave the narrow input under 16 levels.
MIXED_RANGE_RATIO = 16.0


def quantize_onnx(
    fp32: Path,
    destination: Path,
    precision: str,
    calibration: CalibrationData | None,
    exclude: Sequence[str] = (),
) -> QuantizeSummary:
    """Write `fp32` at `precision` (int8, int8-dynamic or fp16) to `destination`, keeping the nodes named in
    `exclude` in float32; int8 is calibrated on `calibration` as its spec says."""
    import onnx

    if precision not in ONNX_PRECISIONS:
        raise UsageError(f"ONNX quantization has no precision {precision}", f"use one of {', '.join(ONNX_PRECISIONS)}")
    source = onnx.load(str(fp32), load_external_data=False)
    names = {n.name for n in source.graph.node}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise UsageError(
            f"cannot keep {', '.join(unknown[:3])} in float: no such node in the ONNX graph",
            "give node names of the optimized graph (see --dump-passes)",
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if precision == "int8":
        if calibration is None:
            raise UsageError("int8 needs calibration data", "pass --calib FILE.npz|DIR|file.py:loader")
        tool, settings = _static_int8(fp32, destination, calibration, exclude)
        method = calibration.spec.method
    elif precision == "int8-dynamic":
        (tool, settings), method = _dynamic_int8(fp32, destination, exclude), "weights-only"
    else:
        (tool, settings), method = _fp16(fp32, destination, exclude), "float16"
    seconds = time.perf_counter() - start
    result = onnx.load(str(destination), load_external_data=False)
    converted = _converted_nodes(source, result, precision, set(exclude))
    weighted = [n.name for n in source.graph.node if n.op_type in WEIGHTED_OPS]
    return QuantizeSummary(
        precision=precision,
        tool=tool,
        method=method,
        settings=settings,
        nodes_before=len(source.graph.node),
        nodes_after=len(result.graph.node),
        quantized=sum(name in converted for name in weighted),
        kept_float=tuple(name for name in weighted if name not in converted),
        excluded=tuple(exclude),
        seconds=seconds,
    )


def _static_int8(
    fp32: Path, destination: Path, calibration: CalibrationData, exclude: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """Calibrated Q/DQ int8 with ONNX Runtime's quantize_static; the settings used."""
    from kiln.compiler.capture.onnx_files import onnx_signature

    spec = calibration.spec
    inputs, _, _ = onnx_signature(fp32, torch_layout=False)
    batches = calibration.batches(inputs)
    full = [b for b in batches if all(len(v) == len(next(iter(batches[0].values()))) for v in b.values())]
    symmetric = bool(spec.symmetric_activations)
    settings = {
        "format": "QDQ",
        "calibration_method": spec.method,
        "calibration_batches": len(full),
        "per_channel": spec.per_channel,
        "activations": f"{'int8 symmetric' if symmetric else 'uint8 asymmetric'}"
        + (" (ONNX Runtime x86 default)" if spec.symmetric_activations is None else ""),
        "weights": "int8 symmetric, 7-bit range (reduce_range: no int16 saturation on AVX2 without VNNI)",
        "reduce_range": True,
    }
    _quantize_static(fp32, destination, full, spec, list(exclude))
    mixed = QdqGraph.of(load_onnx(destination)).mixed_range_concats(MIXED_RANGE_RATIO)
    concats = [name for name in mixed if name not in exclude]
    if concats:  # calibrated again, with those concatenations in float: each input keeps its own range
        _quantize_static(fp32, destination, full, spec, [*exclude, *concats])
    settings["float_concats"] = concats
    settings["float_softmax_outputs"] = float_softmax_outputs(destination)
    keep_in_float(destination, exclude, fp32)
    return "onnxruntime quantize_static (QDQ)", settings


def _quantize_static(
    fp32: Path, destination: Path, feeds: list[dict[str, Any]], spec: CalibrationSpec, exclude: list[str]
) -> None:
    """One call of ONNX Runtime's quantize_static with Kiln's settings (see the module's docstring), calibrated on
    `feeds`, leaving the nodes named in `exclude` unquantized."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.feeds: Iterator[dict[str, Any]] = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    symmetric = bool(spec.symmetric_activations)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        quantize_static(
            str(fp32),
            str(destination),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=spec.per_channel,
            reduce_range=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[spec.method]),
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )


def _dynamic_int8(fp32: Path, destination: Path, exclude: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Weights-only int8 (activations quantized at run time) for the ops ORT has integer kernels for."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(destination),
        op_types_to_quantize=list(DYNAMIC_OP_TYPES),
        per_channel=False,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
    )
    settings = {
        "op_types": list(DYNAMIC_OP_TYPES),
        "weights": "int8 per-tensor, 7-bit range (reduce_range)",
        "activations": "uint8, quantized at run time",
    }
    return "onnxruntime quantize_dynamic", settings


def _fp16(fp32: Path, destination: Path, exclude: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """float16 weights and compute, float32 inputs and outputs, fragile ops kept in float32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted({*FRAGILE_FP16_OPS, *DEFAULT_OP_BLOCK_LIST})
    converted = convert_float_to_float16(
        onnx.load(str(fp32)), keep_io_types=True, op_block_list=blocked, node_block_list=list(exclude)
    )
    onnx.save(converted, str(destination))
    settings = {"io": "float32", "blocked_op_types": sorted(FRAGILE_FP16_OPS)}
    return "onnxruntime.transformers convert_float_to_float16", settings


def _converted_nodes(source: onnx.ModelProto, result: onnx.ModelProto, precision: str, exclude: set[str]) -> set[str]:
    """Names of the source's nodes that compute at the reduced precision in `result`."""
    if precision == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

        blocked = {*FRAGILE_FP16_OPS, *DEFAULT_OP_BLOCK_LIST}
        return {n.name for n in source.graph.node if n.op_type not in blocked and n.name not in exclude}
    if precision == "int8-dynamic":  # quantized nodes are replaced by integer ones under new names
        kept = {(n.name, n.op_type) for n in result.graph.node}
        return {n.name for n in source.graph.node if (n.name, n.op_type) not in kept}
    # Q/DQ: a node is quantized when its weights are int8 (dequantized from an initializer), or, without
    # weights (MatMul of two activations), when every input is dequantized.
    constants = {i.name for i in result.graph.initializer}
    dequantize = [n for n in result.graph.node if n.op_type == "DequantizeLinear"]
    weights = {n.output[0] for n in dequantize if n.input[0] in constants}
    dequantized = {n.output[0] for n in dequantize}
    return {
        n.name
        for n in result.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and (set(n.input) & weights or (n.input and all(i in dequantized for i in n.input if i)))
    }


def float_softmax_outputs(quantized: Path) -> list[str]:
    """Take the Quantize -> Dequantize pair off each graph output of a Q/DQ graph that a Softmax computes,
    rewriting the file in place; the names of those outputs. The Softmax then computes in float from its
    dequantized input (see the module's docstring for why)."""
    import onnx

    model = onnx.load(str(quantized))
    nodes = list(model.graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def made_by(name: str, op_type: str) -> int | None:
        index = producer.get(name)
        return index if index is not None and nodes[index].op_type == op_type else None

    dropped: set[int] = set()
    names = []
    for output in model.graph.output:
        dq = made_by(output.name, "DequantizeLinear")
        q = made_by(nodes[dq].input[0], "QuantizeLinear") if dq is not None else None
        softmax = made_by(nodes[q].input[0], "Softmax") if q is not None else None
        if dq is None or q is None or softmax is None:
            continue
        if uses.get(nodes[q].input[0]) != 1 or uses.get(nodes[q].output[0]) != 1:
            continue  # the probabilities are read elsewhere too: leave the graph as the quantizer made it
        nodes[softmax].output[0] = output.name
        dropped |= {q, dq}
        names.append(output.name)
    if dropped:
        kept = [node for index, node in enumerate(nodes) if index not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        read = {name for node in kept for name in node.input}
        params = {name for index in dropped for name in nodes[index].input[1:]} - read  # scales, zero points
        unused = [i for i in model.graph.initializer if i.name in params]
        for initializer in unused:
            model.graph.initializer.remove(initializer)
        onnx.save(model, str(quantized))
    return names


def keep_in_float(quantized: Path, exclude: Sequence[str], fp32: Path) -> int:
    """Make the excluded nodes of a Q/DQ graph read their activations in float, rewriting the file in place;
    returns the number of inputs rewired.

    `nodes_to_exclude` leaves a node's weights in float, but when its input still comes through a
    DequantizeLinear, ONNX Runtime's WeightBiasQuantization optimizer (session level 1) quantizes those
    weights again, per tensor, when the session is created: the layer is not in float at all. So an
    excluded node is fed the tensor before its Quantize/Dequantize pair; when the quantizer folded a
    Relu/Clip into that pair (the tensor is then the pre-activation value), a copy of the activation
    from the fp32 graph computes it in float.
    """
    import onnx

    if not exclude:
        return 0
    model, original = onnx.load(str(quantized)), onnx.load(str(fp32), load_external_data=False)
    producer = {name: node for node in model.graph.node for name in node.output}
    fp32_producer = {name: node for node in original.graph.node for name in node.output}
    initializers = {i.name for i in model.graph.initializer}
    fp32_initializers = {i.name: i for i in original.graph.initializer}
    wanted, rewired, added = set(exclude), 0, []
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = q.input[0]
            computed, meant = producer.get(source), fp32_producer.get(source)
            if computed is not None and meant is not None and computed.op_type != meant.op_type:
                if meant.op_type not in ("Relu", "Clip"):
                    continue  # cannot rebuild what the quantizer merged: leave this input quantized
                activation = onnx.NodeProto()
                activation.CopyFrom(meant)
                activation.name = f"{meant.name}/float"
                activation.input[0], activation.output[0] = source, f"{source}/float"
                for extra in meant.input[1:]:
                    if extra and extra not in initializers and extra in fp32_initializers:
                        model.graph.initializer.append(fp32_initializers[extra])
                        initializers.add(extra)
                added.append(activation)
                source = activation.output[0]
            node.input[index] = source
            rewired += 1
    if rewired:
        model.graph.node.extend(added)
        sorted_nodes = _topological(model.graph)
        del model.graph.node[:]
        model.graph.node.extend(sorted_nodes)
        onnx.save(model, str(quantized))
    return rewired


def _topological(graph: Any) -> list[Any]:
    """The graph's nodes in an order where each comes after the producers of its inputs."""
    produced = {name for node in graph.node for name in node.output}
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready or name not in produced for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            return ordered + remaining  # a cycle: leave the rest as it was (the checker will say)
        pending = remaining
    return ordered
