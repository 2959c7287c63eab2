"""What passes and pipelines do with a whole graph besides rewriting it: count its nodes, save or dump it, and
name new values without clashing with the names it has."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.large_graphs import save_onnx

if TYPE_CHECKING:
    import onnx_ir as ir


def count_nodes(graph: Any) -> int:
    """Number of nodes that compute something: ONNX nodes of the main graph, or FX call_function nodes."""
    if hasattr(graph, "graph_module"):
        return sum(1 for n in graph.graph.nodes if n.op == "call_function")
    return sum(1 for _ in graph.graph)


def dump_graph(graph: Any, stem: Path) -> Path:
    """Write a graph for reading: an ONNX model as `stem.onnx`, an FX program as `stem.txt`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(graph, "graph_module"):
        path = stem.with_suffix(".txt")
        path.write_text(str(graph))
        return path
    return save_onnx(graph, stem.with_suffix(".onnx"))


def permuted_shape(shape: Any, perm: tuple[int, ...]) -> Any:
    """`shape` with its dims in the order `perm`."""
    import onnx_ir as ir

    dims = list(shape)
    return ir.Shape([dims[i] for i in perm])


def names_in(model: ir.Model) -> set[str]:
    """Every value and node name of the model's main graph."""
    import onnx_ir as ir

    return set(ir.convenience.create_value_mapping(model.graph)) | {n.name for n in model.graph if n.name}


def fresh_name(stem: str, taken: set[str]) -> str:
    """A name not yet used in the graph, based on `stem`."""
    name, suffix = stem, 1
    while name in taken:
        name, suffix = f"{stem}_{suffix}", suffix + 1
    taken.add(name)
    return name
