"""OpenVINO int8 through NNCF: accuracy on a trained CNN, parity on the zoo, calibration methods, exclusions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kiln import export, load
from kiln.compiler.capture.inputs import random_like
from kiln.compiler.capture.zoo import ZOO
from kiln.compiler.errors import UsageError
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.export.result import ExportResult
from kiln.compiler.quantization.calibration import CALIBRATION_METHODS, CalibrationData, CalibrationSpec
from kiln.compiler.quantization.openvino import quantize_openvino, weighted_op_states

from tests.models.digits import accuracy, trained_digits_cnn

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")


class Digits:
    """The trained digits CNN, its data, its fp32 ONNX export and its int8 OpenVINO export."""

    def __init__(self, root: Path):
        self.model, self.train_x, _, self.test_x, self.test_y = trained_digits_cnn()
        with torch.no_grad():
            self.float_accuracy = accuracy(lambda x: self.model(torch.from_numpy(x)).numpy(), self.test_x, self.test_y)
        np.savez(root / "train.npz", image=self.train_x)
        example = (torch.from_numpy(self.test_x[:1]),)
        self.onnx = export(self.model, example, "onnx", root / "onnx")
        self.int8 = export(self.model, example, "openvino", root / "int8", precision="int8", calib=root / "train.npz")

    def calibration(self, method: str) -> CalibrationData:
        """The first 100 training images as calibration data, ranges chosen by `method`."""
        return CalibrationData({"image": self.train_x[:100]}, "digits train", True, CalibrationSpec(method=method))

    def ov_model(self) -> ov.Model:
        """The fp32 ONNX export read by OpenVINO."""
        return ov.convert_model(str(self.onnx.directory / "model.onnx"))

    def accuracy_of(self, model: ov.Model) -> float:
        """Held-out accuracy of an OpenVINO model run in f32 (int8 where quantized)."""
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return accuracy(lambda x: compiled(x)[0], self.test_x, self.test_y)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """The digits CNN trained and exported once for the session."""
    return Digits(tmp_path_factory.mktemp("ov-digits"))


@pytest.fixture(scope="session")
def zoo_quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], ExportResult]:
    """Zoo models exported to OpenVINO at int8 (cnn, mobilenet) or int8-dynamic (lstm, transformer)."""
    root = tmp_path_factory.mktemp("ov-zoo-int8")
    wanted = [("cnn", "int8"), ("mobilenet", "int8"), ("lstm", "int8-dynamic"), ("transformer", "int8-dynamic")]
    return {
        (name, precision): export_targets(
            f"zoo:{name}", "openvino", root / f"{name}-{precision}", ExportOptions(precision=precision)
        )[0]
        for name, precision in wanted
    }


def test_digits_int8_loses_at_most_one_point(digits):
    assert digits.float_accuracy > 0.95  # the model really learned the task
    quantized = load(digits.int8.directory)
    int8_accuracy = accuracy(lambda x: quantized(x)["output"], digits.test_x, digits.test_y)
    print(f"digits held-out accuracy: fp32 {digits.float_accuracy:.4f}, openvino int8 {int8_accuracy:.4f}")
    assert digits.float_accuracy - int8_accuracy <= 0.01


def test_int8_ir_is_quantized_and_the_manifest_says_how(digits):
    ir = ov.Core().read_model(str(digits.int8.directory / "model.xml"))
    kinds = [op.get_type_name() for op in ir.get_ordered_ops()]
    assert kinds.count("FakeQuantize") >= 3  # the activations of both convolutions and the classifier
    assert all(weighted_op_states(ir).values())
    manifest = json.loads((digits.int8.directory / "manifest.json").read_text())
    quantization = manifest["target_info"]["quantization"]
    assert (quantization["precision"], quantization["method"], quantization["kept_float"]) == ("int8", "minmax", [])
    assert quantization["quantized"] == 3
    assert manifest["target_info"]["calibration"]["representative"] is True
    assert manifest["runtime_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    runtime = manifest["parity"]["runtime"]
    assert runtime["inference_precision"] == "f32" and runtime["int8_layers"] >= 3
    record = next(p for p in manifest["passes"] if p["name"] == "quantize-int8")
    assert record["ir"] == "openvino" and record["nodes_after"] > record["nodes_before"]


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_each_calibration_method_runs_and_is_recorded(digits, method):
    quantized, summary = quantize_openvino(digits.ov_model(), "int8", digits.calibration(method))
    estimator = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}[method]
    assert summary.to_dict()["method"] == method
    assert summary.settings["activations_range_estimator"] == estimator
    assert any("no KL-divergence" in note for note in summary.notes) == (method == "entropy")
    assert digits.float_accuracy - digits.accuracy_of(quantized) <= 0.01


def test_excluded_onnx_node_stays_float_in_the_ir(digits, tmp_path):
    import onnx

    graph = onnx.load(str(digits.onnx.directory / "model.onnx")).graph
    first, second = [n.name for n in graph.node if n.op_type == "Conv"]
    quantized, summary = quantize_openvino(digits.ov_model(), "int8", digits.calibration("minmax"), exclude=[first])
    ov.save_model(quantized, str(tmp_path / "model.xml"), compress_to_fp16=False)
    states = weighted_op_states(ov.Core().read_model(str(tmp_path / "model.xml")))
    float_ops = [name for name, quantized in states.items() if not quantized]
    assert float_ops == [f"{first}/WithoutBiases"]
    assert states[f"{second}/WithoutBiases"]
    assert summary.kept_float == (f"{first}/WithoutBiases",) and summary.excluded == (first,)


def test_excluding_an_unknown_node_is_a_usage_error(digits):
    with pytest.raises(UsageError, match="no_such_node"):
        quantize_openvino(digits.ov_model(), "int8", digits.calibration("minmax"), exclude=["no_such_node"])


@pytest.mark.parametrize("name", ["cnn", "mobilenet"])
def test_int8_zoo_cnns_pass_parity_and_agree_on_top1(zoo_quantized, name):
    result = zoo_quantized[(name, "int8")]
    assert result.published and result.parity is not None and result.parity.passed
    module, (example,) = ZOO[name]()
    images = random_like(example.numpy(), 200, np.random.default_rng(7))
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).argmax(1).numpy()
    quantized = load(result.directory)
    got = np.array([quantized(image[None])["output"].argmax() for image in images])
    agreement = float((got == expected).mean())
    print(f"{name} openvino int8 top-1 agreement with fp32 on 200 random inputs: {agreement:.3f}")
    assert agreement >= 0.99


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_int8_dynamic_compresses_weights_and_passes_parity(zoo_quantized, name):
    result = zoo_quantized[(name, "int8-dynamic")]
    assert result.published and result.parity is not None and result.parity.passed
    quantization = result.manifest.target_info["quantization"]
    assert quantization["method"] == "weights-only" and quantization["settings"]["symmetric_activations"] is None
    assert quantization["quantized"] >= 1
    ir = ov.Core().read_model(str(result.directory / "model.xml"))
    kinds = {op.get_type_name() for op in ir.get_ordered_ops()}
    assert "FakeQuantize" not in kinds  # activations stay float
    assert any(
        op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("u8", "i8")
        for op in ir.get_ordered_ops()
    )
