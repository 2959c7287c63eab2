"""Each graph pass: the graph change it promises, and outputs unchanged (ONNX Runtime before and after)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from kiln.compiler.errors import UsageError
from kiln.passes import PASSES, PassAdjustments, pipeline_for, run_pipeline
from kiln.passes.base import FX, LEVELS, ONNX, Pass, PassResult
from kiln.passes.graphs import count_nodes
from kiln.targets.onnxrt import OnnxRuntimeRunner
from onnx import TensorProto, helper

# The onnx_ir cleanup passes, tested here on one redundant graph; the others in tests/test_fusion_passes.py.
ONNX_IR_CLEANUP = (
    "identity-elimination",
    "deduplicate-initializers",
    "common-subexpression-elimination",
    "dead-node-elimination",
)


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


@pytest.mark.parametrize("name", ONNX_IR_CLEANUP)
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
    model, records = run_pipeline(ir.load(str(redundant_model)), [PASSES[n] for n in ONNX_IR_CLEANUP])
    ir.save(model, str(destination))
    assert [r.name for r in records] == list(ONNX_IR_CLEANUP)
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
    for graph_pass in pipeline_for(ONNX, "onnx", level=3):
        model, changed = graph_pass(model)
        assert not changed, graph_pass.name


def test_passes_keep_zoo_outputs(zoo_exports):
    for model, results in zoo_exports.items():
        records = results["onnx"].manifest.passes
        assert [r.name for r in records] == [p.name for p in pipeline_for(ONNX, "onnx")], model
        assert results["onnx"].parity.passed


def test_levels_choose_nested_pipelines():
    """-O0 runs nothing; each level runs what the one below runs, plus its own passes."""
    names = {level: [p.name for p in pipeline_for(ONNX, "onnx", level)] for level in LEVELS}
    assert names[0] == []
    assert set(names[1]) <= set(names[2]) <= set(names[3])
    assert all(PASSES[n].level <= 1 for n in names[1])
    assert set(names[1]) == {p.name for p in PASSES.values() if p.ir == ONNX and p.level == 1}
    assert [p.name for p in pipeline_for(FX, "onnx", 3)] == [p.name for p in PASSES.values() if p.ir == FX]


def test_adjustments_add_and_remove_in_registry_order():
    adjust = PassAdjustments.parse("-identity-elimination, +dead-node-elimination")
    assert adjust.removed == ("identity-elimination",) and adjust.added == ("dead-node-elimination",)
    chosen = [p.name for p in pipeline_for(ONNX, "onnx", 0, adjust)]
    assert chosen == ["dead-node-elimination"]
    order = list(PASSES)
    default = [p.name for p in pipeline_for(ONNX, "onnx", 2, adjust)]
    assert "identity-elimination" not in default and default == sorted(default, key=order.index)


def test_unknown_pass_is_refused_with_a_suggestion():
    with pytest.raises(UsageError, match="unknown pass 'dead-node-elimnation'") as error:
        PassAdjustments.parse("-dead-node-elimnation")
    assert "did you mean dead-node-elimination" in error.value.one_line()


def test_a_pass_without_what_it_needs_is_refused(monkeypatch):
    needy = Pass(
        "needs-cse", "test", ONNX, 1, lambda g: PassResult(g, False), needs=("common-subexpression-elimination",)
    )
    monkeypatch.setitem(PASSES, needy.name, needy)
    assert needy in pipeline_for(ONNX, "onnx", 1)
    with pytest.raises(UsageError, match="needs common-subexpression-elimination"):
        pipeline_for(ONNX, "onnx", 1, PassAdjustments.parse("-common-subexpression-elimination"))


def test_target_specific_pass_runs_only_for_its_target(monkeypatch):
    only_ov = Pass("only-openvino", "test", ONNX, 3, lambda g: PassResult(g, False), targets=("openvino",))
    monkeypatch.setitem(PASSES, only_ov.name, only_ov)
    assert only_ov in pipeline_for(ONNX, "openvino", 3)
    assert only_ov not in pipeline_for(ONNX, "openvino", 2)
    assert only_ov not in pipeline_for(ONNX, "onnx", 3)


def test_cli_passes_lists_every_pass(capsys):
    from kiln.cli import main

    assert main(["passes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PASSES)
    assert all(r["ir"] in (ONNX, FX) and r["level"] in LEVELS and r["description"] for r in rows)
    assert main(["passes"]) == 0
    assert "dead-node-elimination" in capsys.readouterr().out


def test_cli_refuses_an_unknown_pass_and_level(tmp_path, capsys):
    from kiln.cli import main

    code = main(["export", "zoo:cnn", "-t", "onnx", "-o", str(tmp_path / "o"), "--passes", "+fold-everything"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown pass 'fold-everything'" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "zoo:cnn", "-t", "onnx", "-o", str(tmp_path / "o"), "-O", "7"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_dump_passes_writes_the_graph_after_each_pass(tmp_path):
    from kiln.compiler.capture.zoo import cnn
    from kiln.compiler.export.options import ExportOptions, PassOptions
    from kiln.compiler.export.pipeline import export_targets

    module, inputs = cnn()
    dump = tmp_path / "dump"
    options = ExportOptions(passes=PassOptions(level=1, dump=dump))
    (result,) = export_targets(module, "onnx", tmp_path / "o", options, example_inputs=inputs)
    names = [r.name for r in result.manifest.passes]
    assert names == [p.name for p in pipeline_for(ONNX, "onnx", 1)]
    files = sorted(p.name for p in (dump / "onnx").iterdir())
    assert files == ["00-captured.onnx"] + [f"{i:02d}-{n}.onnx" for i, n in enumerate(names, start=1)]
    last = ir.load(str(dump / "onnx" / files[-1]))
    assert count_nodes(last) == result.manifest.passes[-1].nodes_after
    assert all(r.ir == ONNX and r.seconds >= 0 for r in result.manifest.passes)
