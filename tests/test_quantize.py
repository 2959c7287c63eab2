"""ONNX quantization for ONNX Runtime (compiler/quantization/onnxrt.py: the `onnx` target's int8, int8-dynamic,
fp16) and the same calibration spec honoured by the TFLite int8 build, on a CNN trained on scikit-learn's digits
and the zoo."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from kiln.compiler.export.options import Calibration, ExportOptions
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.export.result import ExportResult
from kiln.compiler.parity.gate import QUANTIZED_SAMPLES
from kiln.compiler.quantization.calibration import CalibrationSpec, load_calibration
from kiln.compiler.quantization.onnxrt import quantize_onnx
from kiln.compiler.types import Manifest
from kiln.targets.litert import LiteRtRunner
from kiln.targets.onnxrt import OnnxRuntimeRunner
from onnx import numpy_helper

from tests.conftest import run_cli
from tests.models.digits import accuracy, trained_digits_cnn

CALIBRATION_SAMPLES = 100
HELD_BACK = 20  # rows of the calibration file past --calib-samples: the int8 parity gate judges on them


@dataclass
class Digits:
    """The trained digits CNN, its held-out set, its calibration file and its exports."""

    model: torch.nn.Module
    test_x: np.ndarray
    test_y: np.ndarray
    calibration: Path
    fp32_onnx: Path
    int8: dict[str, ExportResult]  # target -> the int8 export (onnx and tflite, one capture)

    def fp32_predictions(self) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(self.test_x)).argmax(1).numpy()


def _predictions(run, images: np.ndarray) -> np.ndarray:
    return np.array([int(np.argmax(run(image[None]))) for image in images])


def _onnx_predict(path: Path):
    runner = OnnxRuntimeRunner(path, threads=2)
    name = runner.inputs[0].name
    return lambda image: runner.run({name: image})[runner.output_names[0]]


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """The digits CNN exported once at fp32 (ONNX) and once at int8 (ONNX and TFLite), calibrated on training images."""
    root = tmp_path_factory.mktemp("digits")
    model, train_x, _, test_x, test_y = trained_digits_cnn()
    calibration = root / "calib.npz"
    np.savez(calibration, image=train_x[: CALIBRATION_SAMPLES + HELD_BACK])
    example = (torch.from_numpy(train_x[:1]),)
    fp32 = export_targets(model, "onnx", root / "fp32", ExportOptions(), example_inputs=example)[0]
    options = ExportOptions("int8", calibration=Calibration(CalibrationSpec(str(calibration), CALIBRATION_SAMPLES)))
    int8 = export_targets(model, "onnx,tflite", root / "int8", options, example_inputs=example)
    return Digits(model, test_x, test_y, calibration, fp32.directory / "model.onnx", {r.target: r for r in int8})


def _digits_calibration(digits: Digits, **spec: object) -> object:
    inputs = OnnxRuntimeRunner(digits.fp32_onnx).inputs
    with np.load(digits.calibration) as data:
        examples = [data["image"][:1]]
    return load_calibration(CalibrationSpec(str(digits.calibration), CALIBRATION_SAMPLES, **spec), inputs, examples)


def _weight_scales(path: Path, op_type: str) -> list[tuple[int, ...]]:
    """Shapes of the scales dequantizing the int8 weights of every `op_type` node."""
    graph = onnx.load(str(path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    shapes = []
    for node in (n for n in graph.node if n.op_type == op_type):
        weight = dequantized.get(node.input[1])
        if weight is not None and initializers.get(weight.input[0], np.zeros(0, np.float32)).dtype == np.int8:
            shapes.append(initializers[weight.input[1]].shape)
    return shapes


def test_int8_onnx_keeps_digits_accuracy_and_is_qdq(digits: Digits) -> None:
    result = digits.int8["onnx"]
    assert result.published, result.parity.summary()
    path = result.directory / "model.onnx"
    fp32 = accuracy(lambda x: digits.model(torch.from_numpy(x)).detach().numpy(), digits.test_x, digits.test_y)
    int8 = accuracy(_onnx_predict(path), digits.test_x, digits.test_y)
    assert fp32 - int8 <= 0.01, (fp32, int8)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"], ops
    assert len(_weight_scales(path, "Conv")) == 2 and len(_weight_scales(path, "Gemm")) == 1


def test_manifest_records_quantization_pass_and_calibration(digits: Digits) -> None:
    manifest = digits.int8["onnx"].manifest
    record = next(p for p in manifest.passes if p.name == "quantize-int8")
    assert record.ir == "onnx" and record.changed and record.nodes_after > record.nodes_before
    quantization = manifest.target_info["quantization"]
    assert quantization["quantized"] == 3 and quantization["kept_float"] == []
    assert quantization["settings"]["per_channel"] is True and quantization["settings"]["reduce_range"] is True
    calibration = quantization["calibration"]
    assert calibration["source"] == str(digits.calibration) and calibration["representative"]
    assert (calibration["samples"], calibration["method"]) == (CALIBRATION_SAMPLES, "minmax")
    assert "uint8" in manifest.parity.runtime["inference_precision"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_each_calibration_method_runs(digits: Digits, method: str, tmp_path: Path) -> None:
    destination = tmp_path / "model.onnx"
    summary = quantize_onnx(digits.fp32_onnx, destination, "int8", _digits_calibration(digits, method=method))
    assert summary.settings["calibration_method"] == method and summary.quantized == 3
    agreement = np.mean(_predictions(_onnx_predict(destination), digits.test_x) == digits.fp32_predictions())
    assert agreement >= 0.97, (method, agreement)


def test_per_tensor_weights_have_one_scale_per_tensor(digits: Digits, tmp_path: Path) -> None:
    per_channel = _weight_scales(digits.int8["onnx"].directory / "model.onnx", "Conv")
    assert per_channel == [(16,), (32,)]
    destination = tmp_path / "model.onnx"
    quantize_onnx(digits.fp32_onnx, destination, "int8", _digits_calibration(digits, per_channel=False))
    assert _weight_scales(destination, "Conv") == [(), ()]


def test_excluded_nodes_stay_float(digits: Digits, tmp_path: Path) -> None:
    graph = onnx.load(str(digits.fp32_onnx)).graph
    gemm = next(n.name for n in graph.node if n.op_type == "Gemm")
    destination = tmp_path / "model.onnx"
    summary = quantize_onnx(digits.fp32_onnx, destination, "int8", _digits_calibration(digits), exclude=[gemm])
    assert summary.kept_float == (gemm,) and summary.quantized == 2
    assert _weight_scales(destination, "Gemm") == []


def test_int8_onnx_and_tflite_agree(digits: Digits) -> None:
    tflite = digits.int8["tflite"]
    assert tflite.published, tflite.parity.summary()
    assert tflite.manifest.target_info["calibration"]["used"] == {
        "method": "minmax",
        "method_asked": "minmax",
        "per_channel": True,
        "symmetric_activations": False,
    }
    runner = LiteRtRunner(tflite.directory / "model.tflite", tflite.manifest)
    name, output = runner.inputs[0].name, runner.outputs[0].name
    from_tflite = _predictions(lambda x: runner.run({name: x})[output], digits.test_x)
    from_onnx = _predictions(_onnx_predict(digits.int8["onnx"].directory / "model.onnx"), digits.test_x)
    assert np.mean(from_tflite == from_onnx) >= 0.99


@pytest.mark.parametrize(
    ("model", "precision"), [("lstm", "int8-dynamic"), ("transformer", "int8-dynamic"), ("cnn", "fp16")]
)
def test_zoo_reduced_precision_passes_parity(model: str, precision: str, tmp_path: Path) -> None:
    result = export_targets(f"zoo:{model}", "onnx", tmp_path / model, ExportOptions(precision=precision))[0]
    assert result.published, result.parity.summary()
    assert any(p.name == f"quantize-{precision}" and p.ir == "onnx" for p in result.manifest.passes)
    quantization = result.manifest.target_info["quantization"]
    assert quantization["precision"] == precision and quantization["quantized"] > 0
    ops = collections.Counter(n.op_type for n in onnx.load(str(result.directory / "model.onnx")).graph.node)
    if precision == "fp16":
        assert ops["Cast"] >= 2  # fp32 inputs and outputs kept
    else:
        assert ops["DynamicQuantizeLSTM"] if model == "lstm" else ops["MatMulInteger"], ops


def test_unknown_calibration_method_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx", "--precision", "int8", "--calib-method", "kl", "--out", tmp_path,
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--calib-method kl: unknown method" in err, err


def test_precision_onnx_lacks_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx", "--precision", "bf16", "--out", tmp_path, capsys=capsys
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "does not support precision bf16" in err and "fp32, int8, int8-dynamic, fp16" in err


SQUEEZENET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


@pytest.mark.skipif(not SQUEEZENET.is_file(), reason="this onnx wheel does not ship light_squeezenet.onnx")
def test_int8_squeezenet_source_keeps_its_softmax_output(tmp_path: Path) -> None:
    """Issue 14: ONNX's light squeezenet (opset 9, every weight 0.02, so its softmax is a uniform 0.001 over 1000
    classes) came out all zeros at int8: the quantizer's fixed [0, 1] uint8 range for a Softmax output rounds
    0.001 to 0. The Softmax of a graph output now computes in float."""
    result = export_targets(str(SQUEEZENET), "onnx", tmp_path / "sq", ExportOptions(precision="int8"))[0]
    assert result.published, result.parity.summary()
    quantization = result.manifest.target_info["quantization"]
    assert quantization["settings"]["float_softmax_outputs"] == ["softmaxout_1"]
    assert quantization["quantized"] > 0
    image = np.random.default_rng(0).uniform(0, 1, (1, 3, 224, 224)).astype(np.float32)
    probabilities = OnnxRuntimeRunner(result.directory / "model.onnx").run({"data_0": image})["softmaxout_1"]
    np.testing.assert_allclose(probabilities, 0.001, rtol=1e-3)


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_int8_is_judged_on_held_back_calibration_rows_never_calibrated_on(digits: Digits, target: str) -> None:
    """The rows past --calib-samples are parity sets; the rows calibrated on never are; the report, the manifest
    and the stored samples record all QUANTIZED_SAMPLES sets and the top-1 counts (issue 17)."""
    result = digits.int8[target]
    report = result.parity
    assert report is not None and report.passed, report.summary()
    held = [o for o in report.sample_origins if o.startswith("calib held-back#")]
    assert report.samples == QUANTIZED_SAMPLES and len(held) == HELD_BACK
    assert report.sample_origins[:4] == ["example", "random#1", "random#2", "random#3"]
    with np.load(digits.calibration) as data:
        rows = data["image"]
    with np.load(result.directory / "parity/inputs.npz") as stored:
        judged = [stored[key] for key in stored.files if not key.startswith("0/")]  # 0: the example, train_x[:1]
    calibrated = {row.tobytes() for row in rows[:CALIBRATION_SAMPLES]}
    assert not any(row.tobytes() in calibrated for j in judged for row in j)
    assert all(any(np.array_equal(row[None], j) for j in judged) for row in rows[CALIBRATION_SAMPLES:])
    (logits,) = report.outputs
    assert logits.top1_decided is not None and logits.top1_near_ties is not None
    assert logits.top1_decided + logits.top1_near_ties == QUANTIZED_SAMPLES and logits.top1_ci is not None
    stored_report = Manifest.read(result.directory).parity
    assert stored_report is not None and stored_report.outputs[0].top1_ci == logits.top1_ci
    assert stored_report.outputs[0].top1_decided == logits.top1_decided
