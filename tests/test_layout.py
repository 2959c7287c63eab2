"""Layout: transpose sinking keeps outputs and removes transposes; `--io nhwc` on onnx and openvino."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from kiln.compiler.capture.program import capture
from kiln.compiler.capture.sources import load_source
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.image_layout import NCHW_TO_NHWC
from kiln.compiler.large_graphs import save_onnx
from kiln.compiler.parity.gate import in_reference_layout
from kiln.compiler.types import TensorSpec
from kiln.passes import PASSES
from kiln.passes.channels_last import NHWC_STEP, count_ops, to_nhwc
from kiln.targets.onnxrt import OnnxRuntimeRunner
from onnx import TensorProto, helper, numpy_helper

SINKING = PASSES["transpose-sinking"]
ZOO_GRAPHS = ("cnn", "mobilenet", "unet", "transformer")  # transformer: Transposes of its own


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "layout",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _transposing_graph() -> onnx.ModelProto:
    """Three outputs of x [1,3,4,5]: an elementwise chain between inverse Transposes (constants on either side,
    broadcast at lower rank, a scalar), a MatMul with a transposed constant, and two Transposes in a row."""
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [
        node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        node("Mul", ["t", "scale"], ["m"]),
        node("Sub", ["offset", "m"], ["s"]),
        node("Add", ["s", "half"], ["a"]),
        node("Relu", ["a"], ["r"]),
        node("Transpose", ["r"], ["chain"], perm=[0, 3, 1, 2]),
        node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        node("MatMul", ["x", "Wt"], ["folded"]),
        node("Transpose", ["x"], ["u"], perm=[0, 2, 3, 1]),
        node("Transpose", ["u"], ["merged"], perm=[0, 2, 3, 1]),
    ]
    initializers = [
        ("scale", rng.standard_normal(3).astype(np.float32)),
        ("offset", rng.standard_normal((4, 5, 3)).astype(np.float32)),
        ("half", np.array(0.5, np.float32)),
        ("W", rng.standard_normal((6, 5)).astype(np.float32)),
    ]
    outputs = [("chain", [1, 3, 4, 5]), ("folded", [1, 3, 4, 6]), ("merged", [1, 5, 3, 4])]
    return _model(nodes, [("x", [1, 3, 4, 5])], outputs, initializers)


def _run(model: ir.Model | onnx.ModelProto, path, feeds):
    if isinstance(model, onnx.ModelProto):
        onnx.save(model, str(path))
    else:
        save_onnx(model, path)
        onnx.checker.check_model(str(path), full_check=True)
    return OnnxRuntimeRunner(path).run(feeds)


def _assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_sinking_cancels_pairs_folds_constants_merges_and_keeps_outputs(tmp_path):
    proto = _transposing_graph()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 4, 5)).astype(np.float32)}
    expected = _run(proto, tmp_path / "before.onnx", feeds)
    model = ir.from_proto(proto)
    assert count_ops(model, {"Transpose"}) == 5
    model, changed = SINKING(model)
    assert changed
    transposes = [n for n in model.graph if n.op_type == "Transpose"]
    # the chain's pair cancelled, W's folded into a constant, the two in a row merged into one
    assert len(transposes) == 1 and list(transposes[0].attributes["perm"].as_ints()) == [0, 3, 1, 2]
    assert [n.op_type for n in model.graph if n.op_type != "Transpose"] == ["Mul", "Sub", "Add", "Relu", "MatMul"]
    assert model.graph.initializers["scale_perm"].const_value.shape == (1, 3, 1, 1)
    assert "W" not in model.graph.initializers and "scale" not in model.graph.initializers
    _assert_same(_run(model, tmp_path / "after.onnx", feeds), expected)
    assert not SINKING(model)[1]  # nothing left to do


def test_sinking_changes_nothing_without_transposes():
    conv = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        [("x", [1, 2, 5, 5])],
        [("y", [1, 2, 3, 3])],
        [("w", np.ones((2, 2, 3, 3), np.float32))],
    )
    model = ir.from_proto(conv)
    nodes = [n.op_type for n in model.graph]
    assert not SINKING(model)[1]
    assert [n.op_type for n in model.graph] == nodes


def _used_twice() -> onnx.ModelProto:
    """The Relu output is also a graph output: moving the Transpose past it would change that output."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Relu", ["t"], ["seen"]),
            helper.make_node("Transpose", ["seen"], ["y"], perm=[0, 3, 1, 2]),
        ],
        [("x", [1, 3, 4, 5])],
        [("seen", [1, 4, 5, 3]), ("y", [1, 3, 4, 5])],
    )


def _broadcast_to_higher_rank() -> onnx.ModelProto:
    """A rank-5 constant broadcasts the rank-4 Transpose's output to rank 5: the two Transposes cannot merge."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Add", ["t", "c"], ["a"]),
            helper.make_node("Transpose", ["a"], ["y"], perm=[0, 1, 4, 2, 3]),
        ],
        [("x", [1, 3, 4, 5])],
        [("y", [1, 1, 3, 4, 5])],
        [("c", np.ones((1, 1, 1, 1, 1)))],  # one element, still rank 5
    )


@pytest.mark.parametrize("make", [_used_twice, _broadcast_to_higher_rank])
def test_sinking_leaves_transposes_it_cannot_move(make):
    model = ir.from_proto(make())
    assert not SINKING(model)[1]
    assert count_ops(model, {"Transpose"}) == 2


def test_nhwc_input_cancels_a_models_own_channels_last_permute(tmp_path):
    # x * scale, then permuted to channels-last for a MatMul over channels: NHWC input leaves no Transpose.
    rng = np.random.default_rng(2)
    proto = _model(
        [
            helper.make_node("Mul", ["x", "scale"], ["m"]),
            helper.make_node("Transpose", ["m"], ["t"], perm=list(NCHW_TO_NHWC)),
            helper.make_node("MatMul", ["t", "W"], ["y"]),
        ],
        [("x", [1, 3, 4, 5])],
        [("y", [1, 4, 5, 8])],
        [("scale", rng.standard_normal((1, 3, 1, 1))), ("W", rng.standard_normal((3, 8)))],
    )
    x = rng.standard_normal((1, 3, 4, 5)).astype(np.float32)
    expected = _run(proto, tmp_path / "nchw.onnx", {"x": x})
    model = ir.from_proto(proto)
    result = to_nhwc(model, inputs=["x"], outputs=[])
    assert result.changed and count_ops(model, {"Transpose"}) == 0
    assert list(model.graph.inputs[0].shape) == [1, 4, 5, 3]
    _assert_same(_run(model, tmp_path / "nhwc.onnx", {"x": x.transpose(NCHW_TO_NHWC)}), expected)


@pytest.fixture(scope="session")
def zoo_graphs(tmp_path_factory):
    """The captured (unoptimized) ONNX graphs of some zoo models, and feeds for them: name -> (path, feeds)."""
    graphs = {}
    for name in ZOO_GRAPHS:
        source = load_source(f"zoo:{name}")
        path = capture(source, None, tmp_path_factory.mktemp(name)).onnx_path
        graphs[name] = (
            path,
            {
                spec.name: example.numpy()
                for spec, example in zip(OnnxRuntimeRunner(path).inputs, source.example_inputs)
            },
        )
    return graphs


@pytest.mark.parametrize("name", ZOO_GRAPHS)
def test_sinking_keeps_zoo_outputs(zoo_graphs, name, tmp_path):
    path, feeds = zoo_graphs[name]
    model, _ = SINKING(ir.load(str(path)))
    _assert_same(_run(model, tmp_path / "sunk.onnx", feeds), OnnxRuntimeRunner(path).run(feeds))


@pytest.mark.parametrize("name", ZOO_GRAPHS)
def test_nhwc_zoo_graphs_compute_the_same_in_channels_last(zoo_graphs, name, tmp_path):
    path, feeds = zoo_graphs[name]
    model = ir.load(str(path))
    transposes = count_ops(model, {"Transpose"})
    converted = to_nhwc(model)
    runner = OnnxRuntimeRunner(save_onnx(converted.graph, tmp_path / "nhwc.onnx"))
    images = [s for s in runner.inputs + runner.outputs if len(s.shape) == 4]
    assert converted.changed == bool(images)
    specs = [TensorSpec(s.name, s.shape, s.dtype, "NHWC" if len(s.shape) == 4 else None) for s in runner.inputs]
    outputs = [TensorSpec(s.name, s.shape, s.dtype, "NHWC" if len(s.shape) == 4 else None) for s in runner.outputs]
    _assert_same(in_reference_layout(runner.run, specs, outputs)(feeds), OnnxRuntimeRunner(path).run(feeds))
    # standard ONNX convolutions are NCHW: one Transpose stays per image input and output, none is added
    assert count_ops(converted.graph, {"Transpose"}) == transposes + len(images)


@pytest.fixture(scope="session")
def nhwc_exports(tmp_path_factory):
    """cnn (NHWC image in, logits out) and unet (NHWC image in and out) for onnx and openvino with --io nhwc."""
    root = tmp_path_factory.mktemp("nhwc")
    exports = {}
    for name in ("cnn", "unet"):
        results = export_targets(f"zoo:{name}", "onnx,openvino", root / name, ExportOptions(io=("nhwc",)))
        exports.update({(name, r.target): r for r in results})
    return exports


@pytest.mark.parametrize("target", ["onnx", "openvino"])
@pytest.mark.parametrize("name", ["cnn", "unet"])
def test_nhwc_io_passes_parity_and_counts_transposes(nhwc_exports, name, target):
    result = nhwc_exports[name, target]
    assert result.published and result.parity.passed, result.parity.summary()
    assert max(o.max_abs_error for o in result.parity.outputs) < 1e-4
    (image,) = result.manifest.inputs
    assert image.layout == "NHWC" and list(image.shape) == [1, 32, 32, 3]
    (output,) = result.manifest.outputs
    images_out = 1 if name == "unet" else 0
    assert output.layout == ("NHWC" if images_out else None)
    if images_out:
        assert list(output.shape) == [1, 32, 32, 4]
    layout = result.manifest.target_info["layout"]
    assert layout["io"] == "nhwc" and layout["boundary_transposes"] == 1 + images_out
    assert layout["transposes_after"] == 1 + images_out  # the NCHW-only Conv keeps one at each image boundary
    assert layout["transposes_before"] > layout["transposes_after"]
    (record,) = [r for r in result.manifest.passes if r.name == NHWC_STEP]
    assert record.changed and record.ir == ("onnx" if target == "onnx" else "openvino")


def test_nhwc_onnx_artifact_takes_channels_last_images(nhwc_exports):
    from kiln import load

    result = nhwc_exports["unet", "onnx"]
    session = OnnxRuntimeRunner(result.directory / "model.onnx")
    (image,) = session.inputs
    (output,) = session.outputs
    assert list(image.shape) == [1, 32, 32, 3] and list(output.shape) == [1, 32, 32, 4]
    assert load(result.directory)(np.zeros((1, 32, 32, 3), np.float32))["output"].shape == (1, 32, 32, 4)
