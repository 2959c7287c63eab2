"""What the per-layer quantization report (compiler/quantization/report.py) and the int8 recipe
(compiler/quantization/onnxrt.py) read of ONNX graphs: producers and consumers of a Q/DQ graph, the calibrated
scales of its tensors, its float tensors, copies of it with more outputs or with fp32 feeds for each
layer, un-optimized ONNX Runtime sessions that emulate Q/DQ exactly as written, and the PyTorch module a
node of the dynamo exporter comes from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.onnx_metadata import class_hierarchy, name_scopes
from kiln.compiler.ort_session import ort_session

if TYPE_CHECKING:
    import onnx

FP32_FEED_SUFFIX = "::fp32"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QdqGraph:
    """Producers, consumers and initializers of one ONNX graph, by tensor name."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    constants: set[str]  # initializers and Constant outputs
    inputs: set[str]
    float_weights: set[str]  # float initializers (weights left unquantized)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> QdqGraph:
        """The graph of `model`, indexed."""
        producer: dict[str, Any] = {}
        consumers: dict[str, list[Any]] = {}
        constants = {i.name for i in model.graph.initializer}
        for node in model.graph.node:
            for name in node.output:
                producer[name] = node
                if node.op_type == "Constant":
                    constants.add(name)
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        inputs = {i.name for i in model.graph.input} - constants
        float_types = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
        weights = {i.name for i in model.graph.initializer if i.data_type in float_types and len(i.dims) > 1}
        return cls(model, producer, consumers, constants, inputs, weights)

    def visible(self, tensor: str) -> str:
        """The tensor as the next layers see it: the output of its Quantize -> Dequantize pair, if it has one."""
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "DequantizeLinear":
            return tensor
        for q in self.consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in self.consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return str(dq.output[0])
        return tensor

    def compute_producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node that computes `tensor`, looking through Quantize/Dequantize nodes."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in QDQ_OPS:
            node = self.producer.get(node.input[0])
        return node

    def scale_of(self, tensor: str) -> float | None:
        """The step of the DequantizeLinear that computes `tensor` (the largest, if per channel), from its constant
        scale; None when `tensor` is not dequantized there."""
        from onnx import numpy_helper

        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            return None
        scale = next((i for i in self.model.graph.initializer if i.name == node.input[1]), None)
        return float(numpy_helper.to_array(scale).max()) if scale is not None else None

    def mixed_range_concats(self, ratio: float) -> list[str]:
        """The Concat nodes whose quantized inputs' calibrated ranges (their scales: a range is its scale times
        the levels of its type) differ by more than `ratio`. Quantized as one tensor, the concatenation takes the
        widest input's range, and an input `ratio` times narrower keeps fewer than 256 / `ratio` of its levels."""
        found = []
        for node in self.model.graph.node:
            if node.op_type != "Concat":
                continue
            scales = [s for s in (self.scale_of(name) for name in node.input) if s is not None and s > 0]
            if len(scales) >= 2 and max(scales) > ratio * min(scales):
                found.append(str(node.name))
        return found

    def is_quantized(self, node: onnx.NodeProto) -> bool:
        """Whether `node` computes on int8 values: an input comes through a DequantizeLinear and no weight of it
        is a float initializer."""
        dequantized = any(
            (p := self.producer.get(name)) is not None and p.op_type == "DequantizeLinear" for name in node.input
        )
        return dequantized and not any(name in self.float_weights for name in node.input)


def load_onnx(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise UsageError(f"cannot read ONNX file {path}: {exc}", "pass the model.onnx of an export") from None


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """Name -> ONNX element type of every float node output of the graph (types from shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
        if v.type.HasField("tensor_type")
    }
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return {
        name: types[name]
        for node in model.graph.node
        if node.op_type != "Constant"
        for name in node.output
        if types.get(name) in floats
    }


def with_outputs(model: onnx.ModelProto, names: dict[str, int]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include `names` (name -> element type)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    copy.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, elem, None) for name, elem in names.items() if name not in existing
    )
    return copy


def local_model(q: QdqGraph, fp32_names: dict[str, int], outputs: dict[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the quantized graph in which each compute node reads its activations from fp32 feeds.

    An input that reaches a node through Quantize -> Dequantize gets a private copy of that pair reading the
    fp32 feed, so the node still sees its own input quantization. Returns the model and the fp32 tensors
    it takes as extra inputs (as `NAME::fp32`).
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(q.model)
    graph = model.graph
    fed: dict[str, int] = {}
    copies: list[onnx.NodeProto] = []

    def fp32_feed(name: str) -> str | None:
        if name in fp32_names and name not in q.constants:
            fed[name] = fp32_names[name]
            return name + FP32_FEED_SUFFIX
        return None

    for node in graph.node:
        if node.op_type in QDQ_OPS:
            continue
        for index, name in enumerate(node.input):
            dq = q.producer.get(name)
            quant = q.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if dq is not None and quant is not None and quant.op_type == "QuantizeLinear":
                source = fp32_feed(quant.input[0])
                if source is None:
                    continue
                private = f"{node.name}/{index}{FP32_FEED_SUFFIX}"
                q_copy, dq_copy = onnx.NodeProto(), onnx.NodeProto()
                q_copy.CopyFrom(quant)
                dq_copy.CopyFrom(dq)
                q_copy.name, dq_copy.name = private + "/Q", private + "/DQ"
                q_copy.input[0], q_copy.output[0] = source, private + "/q"
                dq_copy.input[0], dq_copy.output[0] = private + "/q", private
                copies += [q_copy, dq_copy]
                node.input[index] = private
            elif dq is None or dq.op_type not in QDQ_OPS:
                node.input[index] = fp32_feed(name) or name
    graph.node.extend(copies)  # after their users: ONNX Runtime sorts nodes itself, and the checker is not run
    graph.input.extend(onnx.helper.make_tensor_value_info(n + FP32_FEED_SUFFIX, e, None) for n, e in fed.items())
    return with_outputs(model, outputs), list(fed)


def session(model: onnx.ModelProto, work: Path, name: str) -> Any:
    """An ONNX Runtime session without graph optimizations: Q/DQ are emulated exactly as written."""
    import onnx

    path = work / f"{name}.onnx"
    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_500_000_000)
    return ort_session(path, optimization="disable")


def module_of(node: onnx.NodeProto, initializers: set[str], classes: dict[str, str]) -> tuple[str, str, list[str]]:
    """(module path, class name, other modules merged into the node) of an ONNX node from the dynamo exporter.

    The exporter writes `pkg.torch.onnx.name_scopes` (e.g. ['', 'features', 'features.1', 'op']) and
    `pkg.torch.onnx.class_hierarchy` on each node. A node that owns a parameter (`features.0.weight`) is
    named after the parameter's module: after Conv+BatchNorm folding the Conv carries the BatchNorm's
    scope, which is then listed as merged. '?' when the node has no metadata (an ONNX source).
    """
    scopes, hierarchy = name_scopes(node), class_hierarchy(node)
    scoped = scopes[-2] if len(scopes) >= 2 else ("?" if not scopes else "")
    scoped_class = hierarchy[-2].rsplit(".", 1)[-1] if len(hierarchy) >= 2 and len(scopes) >= 2 else ""
    if not scopes and not hierarchy:
        scoped, scoped_class = "?", ""
    owner = next(
        (name.rsplit(".", 1)[0] for name in node.input if name in initializers and name.endswith((".weight", ".bias"))),
        None,
    )
    if owner is None or owner == scoped:
        return scoped, classes.get(scoped, scoped_class), []
    merged = [scoped] if scoped not in ("", "?") else []
    return owner, classes.get(owner, ""), merged
