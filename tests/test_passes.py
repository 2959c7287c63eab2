"""Each graph pass: the graph change it promises, and outputs unchanged (ONNX Runtime before and after)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from passes import ONNX, PASSES, count_nodes, pipeline_for, run_pipeline
from targets.onnxrt import OnnxRuntimeRunner

CLEANUP_PIPELINE = tuple(p.name for p in pipeline_for(ONNX, "onnx", level=1))


def _redundant_graph() -> onnx.ModelProto:
    """relu(x @ W + b) twice (via a duplicated weight), x*x twice, an Identity and a dead branch."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    initializers = [
        helper.make_tensor("W", TensorProto.FLOAT, [4, 4], weight.ravel()),
        helper.make_tensor("W_copy", TensorProto.FLOAT, [4, 4], weight.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, [4], bias),
    ]
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("MatMul", ["x_id", "W"], ["m1"]),
        helper.make_node("MatMul", ["x_id", "W_copy"], ["m2"]),
        helper.make_node("Add", ["m1", "b"], ["a1"]),
        helper.make_node("Add", ["m2", "b"], ["a2"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Mul", ["x_id", "x_id"], ["sq1"]),
        helper.make_node("Mul", ["x_id", "x_id"], ["sq2"]),
        helper.make_node("Sub", ["sq1", "sq2"], ["zero"]),
        helper.make_node("Add", ["r1", "r2"], ["sum"]),
        helper.make_node("Add", ["sum", "zero"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["unused"]),
    ]
    graph = helper.make_graph(
        nodes,
        "redundant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def redundant_model(tmp_path):
    path = tmp_path / "redundant.onnx"
    onnx.save(_redundant_graph(), str(path))
    return path


def _outputs(path, x):
    return OnnxRuntimeRunner(path).run({"x": x})["y"]


EXPECTED_CHANGE = {
    "identity-elimination": lambda m: not any(n.op_type == "Identity" for n in m.graph),
    "deduplicate-initializers": lambda m: len(m.graph.initializers) == 2,
    "common-subexpression-elimination": lambda m: sum(n.op_type == "Mul" for n in m.graph) == 1,
    "dead-node-elimination": lambda m: not any(n.op_type == "Sigmoid" for n in m.graph),
}


@pytest.mark.parametrize("name", CLEANUP_PIPELINE)
def test_pass_changes_the_graph_and_keeps_outputs(name, redundant_model, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    before = ir.load(str(redundant_model))
    nodes_before = count_nodes(before)
    after, changed = PASSES[name](before)
    assert changed
    assert EXPECTED_CHANGE[name](after)
    assert count_nodes(after) <= nodes_before
    optimized = tmp_path / "after.onnx"
    ir.save(after, str(optimized))
    onnx.checker.check_model(str(optimized))
    np.testing.assert_allclose(_outputs(optimized, x), _outputs(redundant_model, x), rtol=1e-6, atol=1e-6)


def test_pipeline_records_every_pass(redundant_model, tmp_path):
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    destination = tmp_path / "optimized.onnx"
    model, records = run_pipeline(ir.load(str(redundant_model)), [PASSES[n] for n in CLEANUP_PIPELINE])
    ir.save(model, str(destination))
    assert [r.name for r in records] == list(CLEANUP_PIPELINE)
    # MatMul, Add, Relu, Mul, Sub, Add, Add remain
    assert records[0].nodes_before == 13 and records[-1].nodes_after == 7
    np.testing.assert_allclose(_outputs(destination, x), _outputs(redundant_model, x), rtol=1e-6, atol=1e-6)


def test_pass_reports_no_change_on_a_clean_graph(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "clean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    for name in CLEANUP_PIPELINE:
        model, changed = PASSES[name](model)
        assert not changed, name


def test_passes_keep_zoo_outputs(zoo_exports):
    for model, results in zoo_exports.items():
        records = results["onnx"].manifest.passes
        assert [r.name for r in records] == [p.name for p in pipeline_for(ONNX, "onnx")], model
        assert results["onnx"].parity.passed
