"""Small ONNX models with subgraphs (Loop, If, Scan) that set the traps graph passes fall into.

Each body returns values computed outside it (through an Identity, `x + 0`, `x * 1`), holds Identity nodes
between its own inputs and outputs, and a Transpose pair: what identity elimination, no-op elimination and
transpose cancellation rewrite. ONNX Runtime refuses a subgraph that returns an outer-scope value
directly ("Subgraph output ... is an outer scope value"), so a pass that wires one through breaks the model.
Also `EmbeddingBagModel`, which the dynamo exporter lowers to a Loop over the bags.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import ModelProto, TensorProto, ValueInfoProto, helper
from torch import nn

OPSET = 20


def _info(name: str, shape: list[int] | None, dtype: int = TensorProto.FLOAT) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _scalar(name: str, value: float) -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _model(nodes: list, name: str, inputs: list, outputs: list, initializers: list) -> ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def loop_model() -> ModelProto:
    """Three iterations accumulating relu(x); each returns x itself (via Identity) and x * 1 as scan outputs."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),  # body input to body output: must stay
            helper.make_node("Identity", ["outer"], ["outer_id"]),  # outer value returned as is: must stay
            helper.make_node("Mul", ["outer", "one"], ["outer_times_one"]),  # x * 1 of an outer value, returned
            helper.make_node("Transpose", ["acc_in"], ["t1"], perm=[1, 0]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
            helper.make_node("Identity", ["t2"], ["t2_id"]),
            helper.make_node("Add", ["t2_id", "outer"], ["acc_out"]),
        ],
        "loop_body",
        [_info("i", [], TensorProto.INT64), _info("cond_in", [], TensorProto.BOOL), _info("acc_in", [3, 4])],
        [_info("cond_out", [], TensorProto.BOOL), _info("acc_out", [3, 4]), _info("outer_id", [3, 4]),
         _info("outer_times_one", [3, 4])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Relu", ["x"], ["outer"]),
        helper.make_node("Loop", ["trips", "cond", "zeros"], ["acc", "copies", "copies_times_one"], body=body),
        helper.make_node("Identity", ["acc"], ["acc_id"]),
        helper.make_node("Add", ["acc_id", "zero"], ["total"]),
    ]
    initializers = [
        helper.make_tensor("trips", TensorProto.INT64, [], [3]),
        helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        helper.make_tensor("zeros", TensorProto.FLOAT, [3, 4], np.zeros(12, np.float32)),
        _scalar("one", 1.0),
        _scalar("zero", 0.0),
    ]
    outputs = [_info("total", [3, 4]), _info("copies", [3, 3, 4]), _info("copies_times_one", [3, 3, 4])]
    return _model(nodes, "loop", [_info("x", [3, 4])], outputs, initializers)


def if_model() -> ModelProto:
    """Either branch returns a value computed outside it: through an Identity, or as `(y * 1) + 0`."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["then_out"])], "then", [], [_info("then_out", [3, 4])]
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Mul", ["outer", "one"], ["scaled"]),
            helper.make_node("Add", ["scaled", "zero"], ["else_out"]),
        ],
        "else",
        [],
        [_info("else_out", [3, 4])],
    )
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["outer"]),
        helper.make_node("If", ["flag"], ["chosen"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Identity", ["chosen"], ["y"]),
    ]
    inputs = [_info("x", [3, 4]), _info("flag", [], TensorProto.BOOL)]
    return _model(nodes, "if", inputs, [_info("y", [3, 4])], [_scalar("one", 1.0), _scalar("zero", 0.0)])


def scan_model() -> ModelProto:
    """A running sum over the rows of x; every step also returns an outer value (Identity) and `tanh(b) + 0`."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["state_in", "row"], ["summed"]),
            helper.make_node("Identity", ["summed"], ["state_out"]),
            helper.make_node("Identity", ["outer"], ["outer_id"]),
            helper.make_node("Add", ["outer", "zero"], ["outer_plus_zero"]),
        ],
        "scan_body",
        [_info("state_in", [4]), _info("row", [4])],
        [_info("state_out", [4]), _info("outer_id", [4]), _info("outer_plus_zero", [4])],
    )
    nodes = [
        helper.make_node("Tanh", ["b"], ["outer"]),
        helper.make_node("Scan", ["init", "x"], ["state", "copies", "copies_plus_zero"], body=body, num_scan_inputs=1),
    ]
    initializers = [
        helper.make_tensor("init", TensorProto.FLOAT, [4], np.zeros(4, np.float32)),
        helper.make_tensor("b", TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32) / 4),
        _scalar("zero", 0.0),
    ]
    outputs = [_info("state", [4]), _info("copies", [3, 4]), _info("copies_plus_zero", [3, 4])]
    return _model(nodes, "scan", [_info("x", [3, 4])], outputs, initializers)


def feeds(model: ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for the hand-built models (`flag` both ways is up to the caller)."""
    rng = np.random.default_rng(seed)
    result: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.BOOL:
            result[value.name] = np.array(seed % 2 == 0)
        else:
            result[value.name] = rng.standard_normal(shape).astype(np.float32)
    return result


class EmbeddingBagModel(nn.Module):
    """Two inputs (`input` indices and bag `offsets`): the exporter lowers the bags to a Loop."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 8, mode="sum")
        self.fc = nn.Linear(8, 4)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bag(input, offsets))


def embedding_bag() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model and its example inputs (10 indices in 3 bags)."""
    torch.manual_seed(0)
    return EmbeddingBagModel().eval(), (torch.randint(0, 20, (10,)), torch.tensor([0, 3, 7]))
