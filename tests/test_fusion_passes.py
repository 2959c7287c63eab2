"""Fusion and cleanup passes (passes/fusion.py, passes/fx.py): the graph change each promises, outputs unchanged.

ONNX passes are checked on the zoo models as Kiln captures them and as the dynamo exporter lowers them
without its own optimizer (`raw`: a stand-in for an `.onnx` from elsewhere, where most of these passes
fire), and on small graphs built for the passes that neither fires on; outputs are compared with ONNX
Runtime. FX passes are checked on the captured programs, run with `ExportedProgram.module()`.
"""

from __future__ import annotations

import collections
import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from kiln.compiler.capture.program import CapturedModel, capture
from kiln.compiler.capture.sources import from_module, load_source
from kiln.compiler.export.options import export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.large_graphs import save_onnx
from kiln.passes import PASSES, fusion, fx, pipeline_for
from kiln.passes.base import FX, ONNX
from kiln.passes.graphs import count_nodes
from kiln.targets.onnxrt import OnnxRuntimeRunner
from onnx import TensorProto, helper
from torch import nn

MODELS = ("cnn", "mobilenet", "transformer", "unet")
ONNX_PIPELINE = [p.name for p in pipeline_for(ONNX, "onnx", level=3)]
FUSION_NAMES = [p.name for p in fusion.PASSES]
FX_NAMES = [p.name for p in fx.PASSES]


@dataclass
class Capture:
    """One model captured once for the whole session: the FX program, its ONNX lowerings, and inputs."""

    captured: CapturedModel
    raw_onnx: Path  # the dynamo exporter's output before its own optimizer
    example_inputs: tuple[torch.Tensor, ...]

    def feeds(self) -> dict[str, np.ndarray]:
        return {s.name: t.numpy() for s, t in zip(self.captured.inputs, self.example_inputs)}

    def onnx(self, variant: str) -> Path:
        assert self.captured.onnx_path is not None
        return self.captured.onnx_path if variant == "captured" else self.raw_onnx


class HandWrittenNorms(nn.Module):
    """LayerNorm and both GELUs spelled out in arithmetic, as many model zoos write them."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim))
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        y = self.fc(self.weight * ((x - mean) / torch.sqrt(variance + 1e-5)) + self.bias)
        erf_gelu = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        z = y + 1
        tanh_gelu = 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))
        return erf_gelu + tanh_gelu


def _capture(source: Any, directory: Path, raw_too: bool = True) -> Capture:
    captured = capture(source, None, directory, True)
    assert captured.exported is not None
    raw = directory / "raw.onnx"
    if not raw_too:
        return Capture(captured, raw, tuple(source.example_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(captured.exported, (), dynamo=True, optimize=False, verbose=False, opset_version=20).save(
            str(raw)
        )
    return Capture(captured, raw, tuple(source.example_inputs))


@pytest.fixture(scope="session")
def zoo_captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Capture]:
    """cnn, mobilenet, transformer and unet captured once (FX program, ONNX, raw ONNX)."""
    root = tmp_path_factory.mktemp("fusion-captures")
    return {name: _capture(load_source(f"zoo:{name}"), root / name) for name in MODELS}


@pytest.fixture(scope="session")
def hand_written(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    """HandWrittenNorms captured like a user's model."""
    torch.manual_seed(0)
    source = from_module(HandWrittenNorms().eval(), (torch.randn(2, 5, 16),))
    return _capture(source, tmp_path_factory.mktemp("fusion-hand") / "hand", raw_too=False)


def _model(graph: onnx.GraphProto) -> ir.Model:
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def _no_op_graph() -> ir.Model:
    """relu(cast_to_float(dropout(x) + 0) * 1)"""
    nodes = [
        helper.make_node("Dropout", ["x"], ["d"]),
        helper.make_node("Add", ["d", "zero"], ["a"]),
        helper.make_node("Cast", ["a"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["c", "one"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    constants = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(nodes, "no_op", [_info("x", [3, 4])], [_info("y", [3, 4])], constants)
    graph.value_info.append(_info("a", [3, 4]))  # a Cast is a no-op only where its input's type is known
    return _model(graph)


def _matmul_add_graph() -> ir.Model:
    """x @ W + b on 2-d x."""
    rng = np.random.default_rng(0)
    constants = [
        helper.make_tensor("W", TensorProto.FLOAT, [4, 5], rng.standard_normal(20).astype(np.float32)),
        helper.make_tensor("b", TensorProto.FLOAT, [5], rng.standard_normal(5).astype(np.float32)),
    ]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    return _model(helper.make_graph(nodes, "gemm", [_info("x", [3, 4])], [_info("y", [3, 5])], constants))


def _transpose_reshape_graph() -> ir.Model:
    """A transpose undone by its inverse, then two reshapes in a row."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t2", "s1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "s2"], ["y"]),
    ]
    constants = [
        helper.make_tensor("s1", TensorProto.INT64, [2], [6, 4]),
        helper.make_tensor("s2", TensorProto.INT64, [3], [3, 2, 4]),
    ]
    return _model(helper.make_graph(nodes, "tr", [_info("x", [3, 2, 4])], [_info("y", [3, 2, 4])], constants))


def _info(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph)


def _ort(model: ir.Model | Path, path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs (in graph order) of the model under ONNX Runtime."""
    if not isinstance(model, Path):
        model = save_onnx(model, path)
    runner = OnnxRuntimeRunner(model)
    outputs = runner.run(feeds)
    return [outputs[name] for name in runner.output_names]


def _assert_close(actual: list[Any], expected: list[Any]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def _before(name: str, model: ir.Model) -> ir.Model:
    """The model as the -O3 onnx pipeline hands it to pass `name` (every earlier pass run)."""
    for earlier in ONNX_PIPELINE[: ONNX_PIPELINE.index(name)]:
        model, _ = PASSES[earlier](model)
    return model


# pass -> (the graph it is shown on, the change promised: op-count checks on the graph after it)
SMALL_GRAPHS = {"no-op-elimination": _no_op_graph, "matmul-add-to-gemm": _matmul_add_graph}
SMALL_GRAPHS["transpose-reshape-cancellation"] = _transpose_reshape_graph
ON_ZOO = {
    "constant-folding": (("cnn", "raw"), lambda ops: ops["Expand"] == ops["Shape"] == ops["CastLike"] == 0),
    "conv-batchnorm-folding": (("mobilenet", "raw"), lambda ops: ops["BatchNormalization"] == 0 and ops["Conv"] == 12),
    "ort-transformer-fusion": (
        ("transformer", "captured"),
        lambda ops: ops["MultiHeadAttention"] == 2 and ops["Softmax"] == 0 and ops["SkipLayerNormalization"] > 0,
    ),
}
ON_HAND_WRITTEN = {
    "layer-norm-fusion": lambda ops: ops["LayerNormalization"] == 1 and ops["ReduceMean"] == 0,
    "gelu-fusion": lambda ops: ops["Gelu"] == 2 and ops["Erf"] == ops["Tanh"] == 0,
}
SMALL_GRAPH_CHANGE = {
    "no-op-elimination": lambda ops: ops == {"Relu": 1},
    "matmul-add-to-gemm": lambda ops: ops == {"Gemm": 1},
    "transpose-reshape-cancellation": lambda ops: ops["Transpose"] == 0 and ops["Reshape"] == 1,
}


def test_every_fusion_pass_has_a_case():
    assert set(FUSION_NAMES) == set(SMALL_GRAPHS) | set(ON_ZOO) | set(ON_HAND_WRITTEN)


@pytest.mark.parametrize("name", sorted(SMALL_GRAPHS))
def test_pass_on_a_graph_built_for_it(name, tmp_path):
    shape = tuple(int(d) for d in SMALL_GRAPHS[name]().graph.inputs[0].shape)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    expected = _ort(SMALL_GRAPHS[name](), tmp_path / "before.onnx", {"x": x})
    model, changed = PASSES[name](SMALL_GRAPHS[name]())
    model, _ = PASSES["dead-node-elimination"](model)
    assert changed
    assert SMALL_GRAPH_CHANGE[name](_ops(model)), _ops(model)
    _assert_close(_ort(model, tmp_path / "after.onnx", {"x": x}), expected)
    _, again = PASSES[name](model)
    assert not again, "a second run must find nothing left to do"


@pytest.mark.parametrize("name", sorted(ON_ZOO))
def test_pass_on_the_zoo_model_it_fires_on(name, zoo_captures, tmp_path):
    (model_name, variant), promised = ON_ZOO[name]
    capture_ = zoo_captures[model_name]
    model = _before(name, ir.load(str(capture_.onnx(variant))))
    nodes_before = count_nodes(model)
    model, changed = PASSES[name](model)
    model, _ = PASSES["dead-node-elimination"](model)
    assert changed
    assert promised(_ops(model)), _ops(model)
    assert count_nodes(model) < nodes_before
    feeds = capture_.feeds()
    _assert_close(_ort(model, tmp_path / "after.onnx", feeds), _ort(capture_.onnx(variant), tmp_path, feeds))


@pytest.mark.parametrize("name", sorted(ON_HAND_WRITTEN))
def test_pass_on_hand_written_layer_norm_and_gelu(name, hand_written, tmp_path):
    model = _before(name, ir.load(str(hand_written.onnx("captured"))))
    model, changed = PASSES[name](model)
    model, _ = PASSES["dead-node-elimination"](model)
    assert changed
    assert ON_HAND_WRITTEN[name](_ops(model)), _ops(model)
    feeds = hand_written.feeds()
    _assert_close(_ort(model, tmp_path / "after.onnx", feeds), _ort(hand_written.onnx("captured"), tmp_path, feeds))


def test_fusions_wait_for_the_opset_that_has_their_op():
    model = _model(helper.make_graph([], "empty", [], []))
    model.opset_imports[""] = 17
    for name in ("gelu-fusion", "layer-norm-fusion"):
        assert not PASSES[name](model)[1]


@pytest.mark.parametrize("variant", ["captured", "raw"])
@pytest.mark.parametrize("model_name", MODELS)
def test_onnx_pipeline_keeps_outputs_pass_by_pass(model_name, variant, zoo_captures, tmp_path):
    """Every pass of the -O3 onnx pipeline in turn: ORT outputs unchanged after each one that changed the graph,
    and a pass that says it changed nothing left the graph as it was."""
    capture_ = zoo_captures[model_name]
    feeds = capture_.feeds()
    expected = _ort(capture_.onnx(variant), tmp_path, feeds)
    model = ir.load(str(capture_.onnx(variant)))
    fired = []
    for index, name in enumerate(ONNX_PIPELINE):
        before = [(n.domain, n.op_type, tuple(v.name if v else "" for v in n.inputs)) for n in model.graph]
        model, changed = PASSES[name](model)
        after = [(n.domain, n.op_type, tuple(v.name if v else "" for v in n.inputs)) for n in model.graph]
        if not changed:
            assert after == before, f"{name} changed the graph but said it did not"
            continue
        fired.append(name)
        _assert_close(_ort(model, tmp_path / f"{index:02d}.onnx", feeds), expected)
    if variant == "captured" and model_name in ("cnn", "mobilenet", "unet"):
        # the exporter's own optimizer did the -O1/-O2 work already: nothing is left for them to find
        assert not set(fired) - {"dead-node-elimination"}, fired
    if variant == "raw":
        assert "constant-folding" in fired, fired
        assert ("conv-batchnorm-folding" in fired) == (model_name != "transformer"), fired


# ---------------------------------------------------------------------------------------------------- FX


def _batch_norms(program: Any) -> int:
    names = {"batch_norm", "_native_batch_norm_legit_no_training"}
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and getattr(n.target, "_opname", "") in names)


def _run_program(program: Any, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(torch.utils._pytree.tree_leaves(program.module()(*inputs)))


@pytest.mark.parametrize("model_name", MODELS)
def test_fx_conv_batchnorm_folding(model_name, zoo_captures, tmp_path):
    capture_ = zoo_captures[model_name]
    original = capture_.captured.exported
    assert original is not None
    program = copy.deepcopy(original)
    batch_norms, nodes = _batch_norms(program), count_nodes(program)
    program, changed = PASSES["fx-conv-batchnorm-folding"](program)
    assert changed == (batch_norms > 0)
    assert _batch_norms(program) == 0
    assert count_nodes(program) == nodes - batch_norms
    if changed:
        assert not any(".running_mean" in key or ".running_var" in key for key in program.state_dict)
        specs = {s.arg.name for s in program.graph_signature.input_specs}
        assert specs == {n.name for n in program.graph.nodes if n.op == "placeholder"}
    expected = _run_program(original, capture_.example_inputs)
    _assert_close([t.numpy() for t in _run_program(program, capture_.example_inputs)], [t.numpy() for t in expected])
    # the program is still a valid ExportedProgram: it saves, loads and runs
    torch.export.save(program, str(tmp_path / "folded.pt2"))
    reloaded = torch.export.load(str(tmp_path / "folded.pt2"))
    _assert_close([t.numpy() for t in _run_program(reloaded, capture_.example_inputs)], [t.numpy() for t in expected])


def test_fx_dead_code_elimination(zoo_captures):
    capture_ = zoo_captures["cnn"]
    assert capture_.captured.exported is not None
    program = copy.deepcopy(capture_.captured.exported)
    image = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
    with program.graph.inserting_after(image):
        program.graph.call_function(torch.ops.aten.relu.default, (image,))  # computes something nobody reads
    program.graph_module.recompile()
    nodes = count_nodes(program)
    program, changed = PASSES["fx-dead-code-elimination"](program)
    assert changed and count_nodes(program) == nodes - 1
    assert not any("num_batches_tracked" in key for key in program.state_dict)  # buffers no node reads
    expected = _run_program(capture_.captured.exported, capture_.example_inputs)
    _assert_close([t.numpy() for t in _run_program(program, capture_.example_inputs)], [t.numpy() for t in expected])
    program, again = PASSES["fx-dead-code-elimination"](program)
    assert not again


def test_fx_passes_leave_a_program_without_batch_norm_untouched(zoo_captures):
    program = zoo_captures["transformer"].captured.exported
    assert program is not None
    program = copy.deepcopy(program)
    keys = set(program.state_dict)
    for name in FX_NAMES:
        program, changed = PASSES[name](program)
        assert not changed, name
    assert set(program.state_dict) == keys


def test_fx_batchnorm_with_shared_conv_weight_is_left_alone():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x)

    module = Shared().eval()
    program = torch.export.export(module, (torch.randn(1, 3, 8, 8),))
    program, changed = PASSES["fx-conv-batchnorm-folding"](program)
    assert not changed and _batch_norms(program) == 1


# ------------------------------------------------------------------------------------------- end to end


def test_levels_and_adjustments_change_what_the_manifest_lists(tmp_path):
    def passes_run(out: str, **options: Any) -> dict[str, list[Any]]:
        results = export_targets("zoo:cnn", "onnx,pt2", tmp_path / out, export_options(**options))
        assert all(r.published for r in results)
        return {r.target: r.manifest.passes for r in results}

    o0 = passes_run("o0", opt_level=0)
    o1 = passes_run("o1", opt_level=1)
    o2 = passes_run("o2", opt_level=2)
    adjusted = passes_run("adjusted", adjust_passes="-fx-conv-batchnorm-folding,-conv-batchnorm-folding")
    assert o0 == {"onnx": [], "pt2": []}
    # -O0 is the exporter's raw graph (its own optimizer off too): BatchNorm still there, more nodes
    raw, optimized = (onnx.load(str(tmp_path / out / "onnx" / "model.onnx")) for out in ("o0", "o2"))
    assert "BatchNormalization" in {n.op_type for n in raw.graph.node}
    assert len(raw.graph.node) > len(optimized.graph.node)
    assert [r.name for r in o1["onnx"]] == [p.name for p in pipeline_for(ONNX, "onnx", 1)]
    assert "constant-folding" in [r.name for r in o1["onnx"]]
    assert [r.name for r in o1["pt2"]] == ["fx-dead-code-elimination"]
    assert [r.name for r in o2["onnx"]] == [p.name for p in pipeline_for(ONNX, "onnx", 2)]
    assert [r.name for r in o2["pt2"]] == [p.name for p in pipeline_for(FX, "pt2", 2)]
    folding = next(r for r in o2["pt2"] if r.name == "fx-conv-batchnorm-folding")
    assert folding.changed and folding.nodes_after == folding.nodes_before - 4  # the cnn's 4 batch norms
    assert [r.name for r in adjusted["onnx"]] == [r.name for r in o2["onnx"] if r.name != "conv-batchnorm-folding"]
    assert [r.name for r in adjusted["pt2"]] == ["fx-dead-code-elimination"]
