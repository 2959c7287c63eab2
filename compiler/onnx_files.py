"""ONNX files as Kiln receives them: copied with their external data, every node named."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiler.sources import check_onnx_external_data


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


def name_batch_dim(proto: Any, name: str) -> None:
    """Rename the exporter's symbol for dim 0 (e.g. `s43`) to `name` everywhere in the graph."""
    symbols = {
        i.type.tensor_type.shape.dim[0].dim_param
        for i in proto.graph.input
        if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param
    }
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = name
