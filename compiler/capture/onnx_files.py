"""ONNX files as Kiln receives them: copied with their external data, every node named."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from kiln.compiler.capture.sources import check_onnx_external_data
from kiln.compiler.types import TensorSpec


def copy_onnx(source: Path, destination: Path) -> None:
    """Copy an ONNX file and its external data files (already checked to stay in its directory)."""
    import onnx

    check_onnx_external_data(source)
    shutil.copy2(source, destination)
    proto = onnx.load(str(source), load_external_data=False)
    if name_unnamed_nodes(proto):
        onnx.save(proto, str(destination))  # external data stays in its files (not loaded, so not rewritten)
    locations = {
        e.value
        for t in onnx.external_data_helper._get_all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    for location in locations:
        (destination.parent / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.parent / location, destination.parent / location)


def name_unnamed_nodes(proto: Any) -> int:
    """Give every unnamed node of an ONNX model (subgraphs included) a name, `<op_type>_<index in its graph>`
    (`<parent node>/...` inside a subgraph), unique among the model's names; returns how many were named.

    Quantization names layers by node: its summary, the per-layer report and --max-drop's layers kept in float
    (`nodes_to_exclude`) cannot tell unnamed nodes apart. Names depend only on the graph, so the same source
    gets the same names in every export."""
    used = {node.name for node in _all_nodes(proto.graph) if node.name}
    pending: list[tuple[str, Any]] = [("", proto.graph)]
    named = 0
    while pending:
        prefix, graph = pending.pop()
        for index, node in enumerate(graph.node):
            if not node.name:
                base = name = f"{prefix}{node.op_type}_{index}"
                suffix = 1
                while name in used:
                    name, suffix = f"{base}_{suffix}", suffix + 1
                node.name = name
                used.add(name)
                named += 1
            pending += [(f"{node.name}/", sub) for sub in _node_subgraphs(node)]
    return named


def _node_subgraphs(node: Any) -> list[Any]:
    """The graphs held by a node's attributes (If branches, Loop/Scan bodies)."""
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node of `graph` and of the graphs nested in its nodes."""
    for node in graph.node:
        yield node
        for sub in _node_subgraphs(node):
            yield from _all_nodes(sub)


def has_external_data(path: Path) -> bool:
    """Whether an ONNX file keeps tensors in external data files (a model with large weights, see
    `kiln.compiler.large_graphs.save_onnx`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(proto))


def onnx_signature(path: Path, torch_layout: bool) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Input and output specs (named dynamic dims) and the default-domain opset of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}

    def spec(value: Any, is_input: bool) -> TensorSpec:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            shape.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or f"{value.name}_dim{axis}"))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        layout = "NCHW" if torch_layout and is_input and len(shape) == 4 and dtype.startswith("float") else None
        return TensorSpec(value.name, tuple(shape), dtype, layout)

    inputs = [spec(v, True) for v in proto.graph.input if v.name not in initializers]
    outputs = [spec(v, False) for v in proto.graph.output]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return inputs, outputs, opset
