"""Hugging Face `transformers` architectures (small configs, random weights, nothing downloaded) through the
ONNX targets: what the dynamo exporter choked on is legalized, or converted by the TorchScript route."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="these tests build models with transformers")

from kiln.compiler.export.pipeline import export_targets

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

HF_MODELS = ROOT / "tests" / "models" / "hf_models.py"
SDPA = "aten.scaled_dot_product_attention.default (contiguous output)"


def _export(tmp_path_factory: pytest.TempPathFactory, factory: str, targets: str) -> dict:
    out = tmp_path_factory.mktemp(factory) / "out"
    return {r.target: r for r in export_targets(f"{HF_MODELS}:{factory}", targets, out)}


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    return _export(tmp_path_factory, "swin", "onnx,openvino")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return _export(tmp_path_factory, "t5_encoder", "onnx,openvino,tflite")


def _passed(result) -> dict:
    assert result.failure is None, result.failure
    assert result.published and result.manifest.parity.passed
    return result.manifest.target_info


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_swin_converts_with_the_attention_legalized(swin, target):
    info = _passed(swin[target])
    assert info["decompositions_applied"] == [SDPA]
    assert info["onnx_route"] == {"route": "dynamo", "failed": {}}
    assert info["route"] == "onnx(dynamo)" and info["routes_tried"] == []


@pytest.mark.parametrize("target", ["onnx", "openvino", "tflite"])
def test_t5_encoder_converts_with_the_attention_legalized(t5, target):
    info = _passed(t5[target])
    assert SDPA in info["decompositions_applied"]


def test_an_architecture_that_converted_before_is_unchanged(tmp_path_factory):
    results = _export(tmp_path_factory, "convnext", "onnx,openvino")
    for target in ("onnx", "openvino"):
        info = _passed(results[target])
        assert info["decompositions_applied"] == []  # no attention: nothing rewritten
        assert info["onnx_route"] == {"route": "dynamo", "failed": {}}


def test_what_the_dynamo_exporter_cannot_lower_goes_the_torchscript_route(tmp_path_factory):
    results = _export(tmp_path_factory, "cdist_head", "onnx,openvino")
    for target in ("onnx", "openvino"):
        info = _passed(results[target])
        route = info["onnx_route"]
        assert route["route"] == "torchscript"
        assert set(route["failed"]) == {"dynamo"} and "cdist" in route["failed"]["dynamo"]
        assert info["route"] == "onnx(torchscript)"
        ((tried, step, reason),) = [tuple(t.values()) for t in info["routes_tried"]]
        assert (tried, step) == ("onnx(dynamo)", "capture") and "cdist" in reason


def test_llama_with_grouped_query_attention_passes_parity_on_tflite(tmp_path_factory):
    info = _passed(_export(tmp_path_factory, "llama", "tflite")["tflite"])
    assert "aten.expand.default (repeat as concatenation)" in info["decompositions_applied"]


def test_the_torchscript_route_keeps_a_dynamic_batch(tmp_path):
    from kiln.compiler.capture.dynamic import DynamicBatch
    from kiln.compiler.export.options import ExportOptions, Shapes

    options = ExportOptions(shapes=Shapes(DynamicBatch(1, 8)))
    (result,) = export_targets(f"{HF_MODELS}:cdist_head", "onnx", tmp_path / "o", options)
    info = _passed(result)
    assert info["onnx_route"]["route"] == "torchscript" and info["dynamic_batch"] == "1:8"
    assert result.manifest.inputs[0].shape[0] == "batch"
    assert {"random batch=1", "random batch=8"} <= set(result.manifest.parity.sample_origins)
