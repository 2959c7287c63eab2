"""What a pass promises (`preserves`) is checked, not only declared (issue 13), and a pass that breaks the
graph is rolled back instead of failing the export (issue 14)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch
from kiln.compiler.capture.program import CapturedModel, capture
from kiln.compiler.capture.sources import load_source
from kiln.compiler.export.options import ExportOptions, PassOptions
from kiln.compiler.export.pipeline import export_targets
from kiln.passes import PASSES, run_pipeline
from kiln.passes.base import CLEANUP, FX, ONNX, Pass, PassResult
from kiln.passes.contract import check_preserves, module_paths

MODELS = ("cnn", "transformer")


@dataclass
class Graphs:
    captured: CapturedModel
    raw: Path  # the exporter's graph without its optimizer: where most ONNX passes fire
    example_inputs: tuple[torch.Tensor, ...]

    def feeds(self) -> dict[str, np.ndarray]:
        return {s.name: t.numpy() for s, t in zip(self.captured.inputs, self.example_inputs)}


@pytest.fixture(scope="module")
def zoo_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Graphs]:
    root = tmp_path_factory.mktemp("contract")
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODELS:
            source = load_source(f"zoo:{name}")
            captured = capture(source, None, root / name, True)
            raw = capture(source, None, root / f"{name}-raw", True, optimize=False).onnx_path
            assert raw is not None
            found[name] = Graphs(captured, raw, tuple(source.example_inputs))
    return found


@pytest.mark.parametrize("model", MODELS)
def test_every_onnx_pass_keeps_its_promises_on_the_zoo(zoo_graphs, model):
    graphs = zoo_graphs[model]
    assert graphs.captured.onnx_path is not None
    changed = set()
    for path in (graphs.captured.onnx_path, graphs.raw):
        for graph_pass in (p for p in PASSES.values() if p.ir == ONNX):
            after, did = graph_pass(ir.load(str(path)))
            changed |= {graph_pass.name} if did else set()
            assert check_preserves(graph_pass, ir.load(str(path)), after, graphs.feeds()) == [], graph_pass.name
    assert len(changed) >= 3  # the check saw real rewrites, not only passes that found nothing


@pytest.mark.parametrize("model", MODELS)
def test_every_fx_pass_keeps_its_promises_on_the_zoo(zoo_graphs, model):
    program = zoo_graphs[model].captured.exported
    assert program is not None
    for graph_pass in (p for p in PASSES.values() if p.ir == FX):
        before = copy_program(program)
        after, _ = graph_pass(copy_program(program))
        assert check_preserves(graph_pass, before, after) == [], graph_pass.name


def copy_program(program: Any) -> Any:
    import copy

    return copy.deepcopy(program)


# Passes that break what they promise, for the checker and the rollback to catch.
def _rename_output(model: Any) -> PassResult:
    model.graph.outputs[0].name = "renamed"
    return PassResult(model, True)


def _forget_module_names(model: Any) -> PassResult:
    for node in model.graph:
        node.metadata_props.clear()
        node.name = f"{node.name}_new"
    return PassResult(model, True)


def _double_first_output(model: Any) -> PassResult:
    output = model.graph.outputs[0]
    doubled = ir.node("Add", [output, output])
    model.graph.append(doubled)
    result = doubled.outputs[0]
    result.name, result.dtype, result.shape = output.name, output.dtype, output.shape
    output.name = "undoubled"
    model.graph.outputs[0] = doubled.outputs[0]
    return PassResult(model, True)


def _drop_first_node(model: Any) -> PassResult:
    model.graph.remove(next(iter(model.graph)), safe=False)  # leaves its consumers reading nothing
    return PassResult(model, True)


def _raise(model: Any) -> PassResult:
    raise RuntimeError("a bug in this pass")


def _fx_scale_outputs(program: Any) -> PassResult:
    import operator

    graph = program.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    first = output.args[0][0]
    with graph.inserting_before(output):
        scaled = graph.call_function(operator.mul, (first, 2.0))
    output.args = ((scaled, *output.args[0][1:]),)
    program.graph_module.recompile()
    return PassResult(program, True)


def _bad(name: str, run: Any, ir_name: str = ONNX) -> Pass:
    return Pass(name, "breaks a promise on purpose", ir_name, CLEANUP, run)


def test_the_checker_reports_each_broken_promise(zoo_graphs):
    graphs = zoo_graphs["cnn"]
    path = graphs.captured.onnx_path
    assert path is not None and any(p for p in module_paths(ir.load(str(path))).values())
    cases = {"signature": _rename_output, "module-names": _forget_module_names, "outputs": _double_first_output}
    for promise, run in cases.items():
        after, _ = _bad(promise, run)(ir.load(str(path)))
        violations = check_preserves(_bad(promise, run), ir.load(str(path)), after, graphs.feeds())
        assert promise in {v.split(":")[0] for v in violations}, (promise, violations)
    program = graphs.captured.exported
    assert program is not None
    after = _fx_scale_outputs(copy_program(program)).graph
    violations = check_preserves(_bad("fx-scale", _fx_scale_outputs, FX), copy_program(program), after)
    assert any(v.startswith("outputs: output 0 differs") for v in violations), violations


def test_a_pass_that_breaks_the_graph_is_rolled_back(zoo_graphs):
    path = zoo_graphs["cnn"].captured.onnx_path
    assert path is not None
    pipeline = [_bad("drop-first-node", _drop_first_node), _bad("raise", _raise), _bad("rename", _rename_output)]
    graph, records = run_pipeline(ir.load(str(path)), [*pipeline, PASSES["dead-node-elimination"]])
    assert [r.name for r in records] == [p.name for p in pipeline] + ["dead-node-elimination"]
    assert "onnx.checker" in str(records[0].rolled_back) and "onnxruntime" in str(records[0].rolled_back)
    assert records[1].rolled_back == "the pass raised RuntimeError: a bug in this pass"
    assert "inputs or outputs" in str(records[2].rolled_back)
    assert records[3].rolled_back is None
    assert not any(r.changed for r in records[:3]) and count(graph) == count(ir.load(str(path)))


def count(model: Any) -> int:
    return sum(1 for _ in model.graph)


def test_an_export_survives_a_broken_pass(tmp_path):
    """The broken pass costs its optimization: the export succeeds, parity passes, the manifest says why."""
    broken = [_bad("drop-first-node", _drop_first_node), _bad("fx-scale-outputs", _fx_scale_outputs, FX)]
    options = ExportOptions(
        passes=PassOptions(pipeline=(*broken, PASSES["dead-node-elimination"], PASSES["fx-dead-code-elimination"]))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = export_targets("zoo:cnn", "onnx,pt2", tmp_path / "out", options)
    for result in results:
        assert result.published and result.parity is not None and result.parity.passed, result.target
        (record,) = [r for r in result.manifest.passes if r.name in ("drop-first-node", "fx-scale-outputs")]
        assert record.rolled_back and record.rolled_back.startswith("it broke the graph"), record
        assert not record.changed
    fx_record = next(r for r in results if r.target == "pt2").manifest.passes[0]
    assert "runs: output 0 differs" in str(fx_record.rolled_back)
