"""Graph passes and subgraphs (`Loop`, `If`, `Scan` bodies): what keeps a rewrite of them valid.

A subgraph may read values of the graphs around it, but ONNX Runtime refuses one that returns such a
value directly ("Subgraph output ... is an outer scope value being returned directly"), and a value is
the output of one graph only. Rewrites that replace a value by its input (Identity removal, `x + 0`,
`x * 1`) must therefore keep a node between an outer value and a subgraph output:
- `eliminate_identities` removes Identity nodes in every graph but those;
- `repair_subgraph_outputs` puts an Identity back where a rewrite (onnxscript's rules, its constant
  folder) left a subgraph returning a value it does not compute itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.passes.graphs import fresh_name

if TYPE_CHECKING:
    import onnx_ir as ir

SMALL_CONSTANT = 4096  # bytes: constants up to this size are compared by value in `structure`


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, then every subgraph (at any depth), then each function's graph."""
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.subgraphs()


def eliminate_identities(model: ir.Model) -> int:
    """Remove `y = Identity(x)` nodes, wiring x through, in every graph; how many were removed.

    Where y is an output of its graph, x takes over y's name, so the node stays unless x is computed by
    a node of the same graph and is no graph's output already (an input, an initializer or an outer
    value returned as is would change the signature or make an invalid subgraph).
    """
    removed = 0
    for graph in list(all_graphs(model)):
        for node in list(graph):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
                continue
            removed += _remove_identity(graph, node)
    return removed


@dataclass
class Pinning:
    """What `pinned_subgraph_outputs` found: whether the model had subgraphs, and whether the rewrite
    changed it beyond the pins (`changed`, known on exit; the rewriters also count a pin they touched)."""

    pins: int = 0
    changed: bool = False

    def judge(self, reported: bool) -> bool:
        """Whether the pass changed the model: what it reported, unless pins made it say so wrongly."""
        return reported and (self.pins == 0 or self.changed)


@contextlib.contextmanager
def pinned_subgraph_outputs(model: ir.Model) -> Iterator[Pinning]:
    """Run a rewrite with every subgraph output behind an Identity ("pin") that the rewrite cannot remove.

    onnxscript's rewriter and constant folder replace a value by another one, graph outputs included,
    renaming the new value: in a subgraph that can return an outer value, or make one value the output of
    two branches. Behind a pin, a subgraph output is never what they replace. Afterwards each pin is
    removed again where its input is still computed in its own graph (the graph as it was); the others stay.
    """
    import onnx_ir as ir

    subgraphs = [g for g in all_graphs(model) if g is not model.graph]
    pinning = Pinning()
    if not subgraphs:
        yield pinning
        return
    before = structure(model)
    pins: list[tuple[ir.Graph, ir.Node]] = []
    for graph in subgraphs:
        for index, value in enumerate(list(graph.outputs)):
            pin = ir.node("Identity", [value])
            result = pin.outputs[0]
            result.name, result.type, result.shape = value.name, value.type, value.shape
            value.name = _fresh_name(model, f"{value.name}_pinned")
            graph.append(pin)
            graph.outputs[index] = result
            pins.append((graph, pin))
    pinning.pins = len(pins)
    try:
        yield pinning
    finally:
        for graph, pin in pins:
            if pin.graph is graph:
                _remove_identity(graph, pin)
        pinning.changed = structure(model) != before


def structure(model: ir.Model) -> list[Any]:
    """What every graph of the model is made of (nodes, their wiring by name and attributes, initializers,
    I/O), to tell whether a rewrite changed anything; small constants compare by value, large by identity."""
    import onnx_ir as ir

    def attribute(attr: Any) -> Any:
        if attr.type == ir.AttributeType.GRAPH:
            return id(attr.value)
        if attr.type == ir.AttributeType.GRAPHS:
            return tuple(id(g) for g in attr.value)
        return (attr.name, repr(attr.value))

    def constant(value: Any) -> Any:
        tensor = value.const_value
        if tensor is None or tensor.nbytes > SMALL_CONSTANT:
            return id(tensor)
        return (str(tensor.dtype), tuple(tensor.shape), tensor.tobytes())

    def name(value: Any) -> str | None:
        return None if value is None else str(value.name)

    shape = []
    for graph in all_graphs(model):
        nodes = [
            (n.op_type, n.domain, tuple(map(name, n.inputs)), tuple(map(name, n.outputs)),
             tuple(attribute(a) for a in n.attributes.values()))
            for n in graph
        ]  # fmt: skip
        values = [name(v) for v in [*graph.inputs, *graph.outputs]]
        initializers = [(key, constant(v)) for key, v in graph.initializers.items()]
        shape.append((nodes, values, initializers))
    return shape


def _remove_identity(graph: ir.Graph, node: ir.Node) -> bool:
    """Remove one Identity node of `graph` if that is safe (see `eliminate_identities`); whether it did."""
    import onnx_ir as ir

    source, output = node.inputs[0], node.outputs[0]
    if source is None:
        return False
    if output.is_graph_output():
        producer = source.producer()
        if producer is None or producer.graph is not graph or source.is_graph_output():
            return False
        name = output.name
        source.shape = source.shape if source.shape is not None else output.shape
        source.type = source.type if source.type is not None else output.type
        output.replace_all_uses_with(source, replace_graph_outputs=True)
        output.name = None
        source.name = name
    else:
        if source.type is None:
            source.type = output.type
        ir.convenience.replace_all_uses_with(output, source)
    graph.remove(node, safe=True)
    return True


def _fresh_name(model: ir.Model, stem: str) -> str:
    """A value name no graph of the model uses yet."""
    return fresh_name(stem, {str(v.name) for g in all_graphs(model) for v in _values(g)})


def _values(graph: ir.Graph) -> Iterator[Any]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
