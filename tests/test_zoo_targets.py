"""Every zoo model through every CPU target, on the real runtimes."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from kiln import load
from kiln.compiler.capture.zoo import ZOO
from kiln.compiler.types import Manifest

from tests.conftest import ZOO_MODELS

TARGETS = ("onnx", "openvino", "pt2")


@pytest.mark.parametrize("model", ZOO_MODELS)
@pytest.mark.parametrize("target", TARGETS)
def test_zoo_model_passes_parity(zoo_exports, model, target):
    result = zoo_exports[model][target]
    assert result.published
    report = result.parity
    assert report is not None and report.passed, report.summary()
    assert report.samples == 4
    assert report.sample_origins[0] == "example"
    for output in report.outputs:
        assert output.max_abs_error < 1e-4
        assert output.min_cosine > 0.9999


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_manifest_describes_the_export(zoo_exports, model):
    result = zoo_exports[model]["openvino"]
    manifest = Manifest.read(result.directory)
    assert manifest.schema_version == 1
    assert manifest.target == "openvino" and manifest.precision == "fp32"
    assert {f.path for f in manifest.files} >= {"model.xml", "model.bin", "parity/inputs.npz", "parity/reference.npz"}
    for recorded in manifest.files:
        data = (result.directory / recorded.path).read_bytes()
        assert len(data) == recorded.size
        assert hashlib.sha256(data).hexdigest() == recorded.sha256
    assert manifest.versions["torch"].startswith("2.13")
    assert manifest.versions["openvino"] != "not installed"
    assert manifest.runtime_config == {"INFERENCE_PRECISION_HINT": "f32"}
    assert manifest.parity is not None
    assert manifest.parity.runtime["inference_precision"] == "f32"
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.source["state_hash"])
    assert manifest.host["cpu_flags"] is not None and manifest.host["cores"] >= 1
    assert {"load", "capture", "reference", "build openvino", "validate openvino"} <= set(manifest.timings)
    assert manifest.target_info["opset"] >= 18
    _, inputs = ZOO[model]()
    assert len(manifest.inputs) == len(inputs)
    for spec, tensor in zip(manifest.inputs, inputs):
        assert list(spec.shape) == list(tensor.shape)
        assert spec.dtype == str(tensor.dtype).removeprefix("torch.")


def test_openvino_fp32_keeps_fp32_weights(zoo_exports):
    xml = (zoo_exports["cnn"]["openvino"].directory / "model.xml").read_text()
    assert 'element_type="f16"' not in xml
    assert 'element_type="f32"' in xml


def test_output_names_follow_the_model(zoo_exports):
    lstm = zoo_exports["lstm"]["onnx"].manifest
    assert [o.name for o in lstm.outputs] == ["output_0", "output_1"]
    transformer = zoo_exports["transformer"]["onnx"].manifest
    assert [i.name for i in transformer.inputs] == ["input_ids", "attention_mask"]
    assert transformer.inputs[0].dtype == "int64"
    multimodal = zoo_exports["multimodal"]["onnx"].manifest
    assert [i.name for i in multimodal.inputs] == ["image", "frames"]
    assert [o.name for o in multimodal.outputs] == ["logits", "position", "embedding"]


def test_zoo_covers_the_architectures(zoo_exports):
    import onnx

    assert set(ZOO_MODELS) == set(ZOO) and len(ZOO) >= 8
    ops = {
        model: {node.op_type for node in onnx.load(str(by_target["onnx"].directory / "model.onnx")).graph.node}
        for model, by_target in zoo_exports.items()
    }
    assert {"Conv", "Add"} <= ops["cnn"]
    assert {"ConvTranspose", "Resize", "Concat", "MaxPool"} <= ops["unet"]
    assert {"GRU"} <= ops["multimodal"] and {"LSTM"} <= ops["lstm"]


def test_detector_decode_keeps_a_float_exponent(zoo_exports):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(zoo_exports["detector"]["onnx"].directory / "model.onnx")).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    exponents = [constants[n.input[1]] for n in graph.node if n.op_type == "Pow" and n.input[1] in constants]
    assert exponents and all(e.dtype == np.float32 and float(e) == 2.0 for e in exponents)


@pytest.mark.parametrize("target", TARGETS)
def test_loaded_export_matches_pytorch_on_new_input(zoo_exports, target):
    module, (image,) = ZOO["cnn"]()
    fresh = torch.randn_like(image)
    runner = load(zoo_exports["cnn"][target].directory)
    outputs = runner(fresh)
    with torch.no_grad():
        expected = module(fresh).numpy()
    np.testing.assert_allclose(outputs["output"], expected, atol=1e-4, rtol=1e-3)
    # numpy input and keyword input give the same answer
    np.testing.assert_array_equal(runner(image=fresh.numpy())["output"], outputs["output"])


def test_parity_inputs_stay_in_the_example_range(zoo_exports):
    from kiln.compiler.parity.gate import ParitySamples

    result = zoo_exports["transformer"]["onnx"]
    samples = ParitySamples.load(result.directory, result.parity.sample_origins)
    _, (ids, mask) = ZOO["transformer"]()
    example_rows = {tuple(row) for row in mask.numpy()}
    for feeds in samples.inputs:
        assert feeds["input_ids"].dtype == np.int64
        assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() <= ids.max().item()
        assert {tuple(row) for row in feeds["attention_mask"]} <= example_rows
    assert not np.array_equal(samples.inputs[0]["input_ids"], samples.inputs[1]["input_ids"])
