"""Transpose sinking on the ONNX graph (`transpose-sinking`, -O2): outputs never change.

It folds Transposes of constants into the constants, merges consecutive Transposes (dropping those that
end up as the identity), and pushes a Transpose down through elementwise ops (unary ones, and binary ones
whose other operand is a constant or a scalar, which is permuted instead) when that brings it onto
another Transpose it then merges with. `kiln.passes.channels_last.to_nhwc` relies on it to cancel the Transposes it
puts at the graph's boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.passes.base import FUSION, ONNX, Pass, PassResult
from kiln.passes.graphs import fresh_name, names_in, permuted_shape

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

# Ops that compute each element from the same element of their first input alone (other inputs, if
# any, are scalars by the operator's definition, as Clip's min and max): a Transpose commutes with them.
UNARY_ELEMENTWISE = frozenset(
    {
        "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Clip", "Cos", "Cosh",
        "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
        "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
        "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
# Two-input ops with numpy broadcasting: a Transpose commutes with them when the other operand is permuted too.
BINARY_ELEMENTWISE = frozenset(
    {
        "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
        "LessOrEqual", "Max", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Xor",
    }
)  # fmt: skip


def sink_transposes(model: ir.Model) -> PassResult:
    """Fold, merge and cancel Transposes (through elementwise chains) until none can be; outputs stay identical."""
    graph = model.graph
    taken = names_in(model)
    changed = False
    progress = True
    while progress:
        progress = False
        for node in list(graph):
            if node.graph is None or not _is_transpose(node):
                continue
            if _fold_into_constant(node, taken) or _merge_with_producer(node, taken) or _sink(node, taken):
                progress = changed = True
    return PassResult(model, changed)


def _is_transpose(node: ir.Node) -> bool:
    return node.op_type == "Transpose" and node.domain in ("", "ai.onnx")


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    """A Transpose's permutation (None when its rank is unknown and it has none)."""
    attribute = node.attributes.get("perm")
    if attribute is not None:
        return tuple(attribute.as_ints())
    shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
    return tuple(reversed(range(len(shape)))) if shape is not None else None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant the graph owns (an initializer that is no input, or a Constant)."""
    import onnx_ir as ir

    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _new_initializer(graph: ir.Graph, array: np.ndarray, stem: str, taken: set[str]) -> ir.Value:
    import onnx_ir as ir

    value = ir.val(fresh_name(stem, taken), const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _fold_into_constant(node: ir.Node, taken: set[str]) -> bool:
    """Transpose(constant) -> the transposed constant."""
    import numpy as np

    array = _constant(node.inputs[0])
    perm = _perm(node)
    output = node.outputs[0]
    if array is None or perm is None or output.is_graph_output():
        return False
    graph = node.graph
    assert graph is not None
    folded = _new_initializer(graph, np.ascontiguousarray(np.transpose(array, perm)), f"{output.name}_folded", taken)
    output.replace_all_uses_with(folded)
    source = node.inputs[0]
    _remove_if_unused(node)
    _drop_if_unused(graph, source)
    return True


def _merge_with_producer(node: ir.Node, taken: set[str]) -> bool:
    """Transpose(Transpose(x, q), p) -> Transpose(x, q[p]), or x itself when that is the identity."""
    perm = _perm(node)
    if perm is None:
        return False
    if perm == tuple(range(len(perm))):
        return _drop_identity(node, taken)
    source = node.inputs[0]
    producer = source.producer() if source is not None else None
    inner = _perm(producer) if producer is not None and _is_transpose(producer) else None
    if producer is None or inner is None:
        return False
    node.replace_input_with(0, producer.inputs[0])
    _set_perm(node, tuple(inner[i] for i in perm))
    _remove_if_unused(producer)
    if _perm(node) == tuple(range(len(perm))):
        _drop_identity(node, taken)
    return True


def _drop_identity(node: ir.Node, taken: set[str]) -> bool:
    """Remove a Transpose whose permutation is the identity, wiring its input through."""
    source, output = node.inputs[0], node.outputs[0]
    assert source is not None
    if output.is_graph_output():
        # The graph output keeps its name: the value feeding it takes it over, if it can.
        if source.producer() is None or source.is_graph_output():
            return False
        name = output.name
        output.replace_all_uses_with(source, replace_graph_outputs=True)
        output.name = fresh_name(f"{name}_unused", taken)
        source.name = name
        source.type, source.shape = source.type or output.type, source.shape or output.shape
    else:
        output.replace_all_uses_with(source)
    _remove_if_unused(node)
    return True


def _sink(node: ir.Node, taken: set[str]) -> bool:
    """Push a Transpose down a chain of elementwise ops when the chain ends on another Transpose, and merge them."""
    perm = _perm(node)
    if perm is None:
        return False
    chain: list[ir.Node] = []
    current = node.outputs[0]
    while True:
        consumers = current.consumers()
        if current.is_graph_output() or len(consumers) != 1 or len(current.uses()) != 1:
            return False
        consumer = consumers[0]
        if _is_transpose(consumer):
            break
        if not _commutes(consumer, current, len(perm)):
            return False
        chain.append(consumer)
        current = consumer.outputs[0]
    if not chain:
        return False  # the consumer merges with this Transpose when it is visited
    inverse = tuple(perm.index(axis) for axis in range(len(perm)))
    graph = node.graph
    assert graph is not None and node.inputs[0] is not None
    flowing = node.outputs[0]  # the chain's data input, transposed until the chain is rewired
    for op in chain:
        for index, operand in enumerate(op.inputs):
            if operand is flowing and flowing is node.outputs[0]:
                op.replace_input_with(index, node.inputs[0])
            elif operand is not flowing and op.op_type in BINARY_ELEMENTWISE:
                array = _constant(operand)
                assert operand is not None and array is not None, "_commutes admits constant operands only"
                if array.size > 1:
                    permuted = _new_initializer(graph, _permute_operand(array, inverse), f"{operand.name}_perm", taken)
                    op.replace_input_with(index, permuted)
                    _drop_if_unused(graph, operand)
        flowing = op.outputs[0]
        if flowing.shape is not None:
            flowing.shape = permuted_shape(flowing.shape, inverse)
    _remove_if_unused(node)
    # The chain's last op now feeds the closing Transpose untransposed: it absorbs the permutation.
    closing = current.consumers()[0]
    closing_perm = _perm(closing) or tuple(reversed(range(len(perm))))
    _set_perm(closing, tuple(perm[i] for i in closing_perm))
    if _perm(closing) == tuple(range(len(perm))):
        _drop_identity(closing, taken)
    return True


def _commutes(op: ir.Node, transposed: ir.Value, rank: int) -> bool:
    """Whether `op` computes elementwise on `transposed` so that a Transpose can move past it."""
    if op.domain not in ("", "ai.onnx") or len(op.outputs) != 1 or op.inputs[0] is None:
        return False
    if op.op_type in UNARY_ELEMENTWISE:
        return op.inputs[0] is transposed
    if op.op_type not in BINARY_ELEMENTWISE or len(op.inputs) != 2:
        return False
    other = op.inputs[1] if op.inputs[0] is transposed else op.inputs[0]
    if other is transposed:
        return False
    array = _constant(other)
    return array is not None and array.ndim <= rank  # a higher rank would broadcast the chain to another rank


def _permute_operand(array: np.ndarray, inverse: tuple[int, ...]) -> np.ndarray:
    """A broadcast operand of a transposed tensor, rearranged for the untransposed one."""
    import numpy as np

    full = array.reshape((1,) * (len(inverse) - array.ndim) + array.shape)
    return np.ascontiguousarray(np.transpose(full, inverse))


def _set_perm(node: ir.Node, perm: tuple[int, ...]) -> None:
    import onnx_ir as ir

    node.attributes["perm"] = ir.AttrInt64s("perm", list(perm))


def _remove_if_unused(node: ir.Node) -> None:
    if node.graph is not None and not any(o.uses() or o.is_graph_output() for o in node.outputs):
        node.graph.remove(node, safe=True)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer nothing uses any more."""
    if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
        graph.initializers.pop(str(value.name))


PASSES = [
    Pass(
        "transpose-sinking",
        "fold Transposes into constants; merge them, also through elementwise ops, cancelling inverse pairs",
        ONNX,
        FUSION,
        sink_transposes,
    ),
]
