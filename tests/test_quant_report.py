"""Per-layer quantization report, accuracy-aware int8 (--max-drop) and `kiln quant-report`, on ONNX Runtime.

The model (tests/models/fragile.py) has one convolution, `features.2`, that int8 ruins; everything else
quantizes well. The report must rank it first and name its module; the accuracy-aware loop must keep it
in float and meet the budget.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from kiln.compiler.capture.program import capture
from kiln.compiler.capture.sources import load_source
from kiln.compiler.errors import ParityError, UsageError
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.quantization.accuracy import agreement
from kiln.compiler.quantization.calibration import AccuracyBudget, CalibrationData, CalibrationSpec
from kiln.compiler.quantization.onnxrt import quantize_onnx
from kiln.compiler.quantization.report import QuantReport, layer_errors, module_classes
from kiln.targets.onnxrt import OnnxRuntimeRunner, accuracy_aware_onnx, quantize_onnx_artifact

from tests.conftest import run_cli
from tests.models.fragile import FRAGILE_MODULE, fragile_cnn

BUDGET = 0.02


@dataclass
class Fragile:
    fp32_export: Path  # a published fp32 `onnx` export of the model
    fp32_onnx: Path
    quantized: Path  # plain int8 Q/DQ (nothing excluded)
    calibration: CalibrationData
    classes: dict[str, str]
    fp32_outputs: np.ndarray

    def feeds(self) -> list[dict[str, np.ndarray]]:
        return self.calibration.batches(OnnxRuntimeRunner(self.fp32_onnx).inputs)


@pytest.fixture(scope="session")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Fragile:
    """The fragile CNN exported to fp32 ONNX once, its plain int8 quantization, and 64 calibration rows."""
    root = tmp_path_factory.mktemp("fragile")
    module, example = fragile_cnn()
    export_targets(module, "onnx", root / "fp32", ExportOptions(), example_inputs=example)
    rows = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    calibration = CalibrationData({"image": rows}, "test rows", True, CalibrationSpec())
    fp32_onnx = root / "fp32" / "model.onnx"
    quantize_onnx(fp32_onnx, root / "int8.onnx", "int8", calibration)
    with torch.no_grad():
        reference = module(torch.from_numpy(rows)).numpy()
    classes = module_classes(torch.export.export(module, example))
    return Fragile(root / "fp32", fp32_onnx, root / "int8.onnx", calibration, classes, reference)


def test_report_ranks_the_fragile_layer_first_with_its_module(fragile: Fragile) -> None:
    layers = layer_errors(fragile.fp32_onnx, fragile.quantized, fragile.feeds(), fragile.classes)
    worst, rest = layers[0], layers[1:]
    assert (worst.module, worst.module_class, worst.op_type.split("+")[0]) == (FRAGILE_MODULE, "Conv2d", "Conv")
    assert worst.label.startswith(f"{FRAGILE_MODULE} (Conv2d)")
    assert worst.quantized
    # it loses the signal by itself (local), and the others, fed exact inputs, do not
    assert worst.local_snr_db < 10 and worst.cosine < 0.9
    assert min(layer.local_snr_db for layer in rest) > worst.local_snr_db + 20
    # a layer after it inherits its error in total but not locally: the local error is what ranks
    downstream = next(layer for layer in rest if layer.module == "features.4")
    assert downstream.snr_db < 10 < downstream.local_snr_db
    assert {layer.module for layer in layers} >= {"features.0", "features.2", "features.4", "head"}


def test_accuracy_aware_keeps_the_fragile_layer_in_float_and_meets_the_budget(fragile: Fragile, tmp_path: Path) -> None:
    destination = tmp_path / "model.onnx"
    kept = accuracy_aware_onnx(
        fragile.fp32_onnx,
        destination,
        fragile.calibration,
        AccuracyBudget(BUDGET),
        module_classes=fragile.classes,
    )
    result, report, summary = kept.accuracy, kept.report, kept.summary
    assert result is not None and report is not None and kept.model == destination
    assert result.drop_before > BUDGET >= result.drop
    assert result.reverted_modules[0].startswith(f"{FRAGILE_MODULE} (Conv2d)")
    assert len(result.reverted) < len(report.layers)  # not everything went back to float
    assert result.history[0].reverted == 0 and result.history[0].drop == result.drop_before
    # the file left on disk is the model kept: its own agreement with PyTorch fp32 meets the budget
    runner = OnnxRuntimeRunner(destination)
    outputs = np.concatenate([runner.run(feeds)["output"] for feeds in fragile.feeds()])
    assert 1 - agreement({"output": outputs}, {"output": fragile.fp32_outputs}) <= BUDGET
    kept = {layer.name: layer for layer in report.layers}
    assert not kept[result.reverted[0]].quantized
    assert report.summary.reverted == result.reverted_modules
    assert list(summary.excluded) == result.reverted and set(result.reverted) <= set(summary.kept_float)


def test_user_metric_drives_the_loop(fragile: Fragile, tmp_path: Path) -> None:
    labels = tmp_path / "labels.npy"
    np.save(labels, fragile.fp32_outputs.argmax(1))
    metric = tmp_path / "metric.py"
    metric.write_text(
        "import numpy as np\n"
        f"LABELS = np.load({str(labels)!r})\n"
        "def accuracy(outputs, inputs):\n"
        "    assert inputs['image'].shape[0] == len(LABELS)\n"
        "    return float(np.mean(outputs['output'].argmax(1) == LABELS))\n"
    )
    budget = AccuracyBudget(BUDGET, f"{metric}:accuracy")
    result = accuracy_aware_onnx(fragile.fp32_onnx, tmp_path / "model.onnx", fragile.calibration, budget).accuracy
    assert result is not None
    assert result.metric == f"{metric}:accuracy"
    assert result.score_fp32 == pytest.approx(1.0, abs=0.02)
    assert result.drop_before > BUDGET >= result.drop
    assert result.reverted[0] == layer_errors(fragile.fp32_onnx, fragile.quantized, fragile.feeds())[0].name


def test_metric_errors_are_one_line(fragile: Fragile, tmp_path: Path) -> None:
    metric = tmp_path / "metric.py"
    metric.write_text(
        "CALLS = []\n"
        "def broken(outputs, inputs):\n    raise KeyError('logits')\n"
        "def flaky(outputs, inputs):\n    CALLS.append(1)\n    return 1.0 if len(CALLS) == 1 else 0.0\n"
    )
    destination = tmp_path / "model.onnx"

    def run(spec: str, max_drop: float) -> None:
        accuracy_aware_onnx(fragile.fp32_onnx, destination, fragile.calibration, AccuracyBudget(max_drop, spec))

    with pytest.raises(UsageError, match=r"metric .*broken failed: KeyError"):
        run(f"{metric}:broken", 0.1)
    with pytest.raises(UsageError, match="has no function 'missing'"):
        run(f"{metric}:missing", 0.1)
    # a budget no number of float layers can meet: fp32 scores 1, every quantized model 0
    with pytest.raises(ParityError, match=r"cannot be met: with all .* layers kept in float"):
        run(f"{metric}:flaky", 0.5)


def test_quant_report_command(fragile: Fragile, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "int8"
    shutil.copytree(fragile.fp32_export, export)
    _, info = quantize_onnx_artifact(
        fragile.fp32_onnx, export / "model.onnx", fragile.calibration, module_classes=fragile.classes
    )
    assert info["quant_report"]["layers"] == len(QuantReport.read(export).layers) > 3

    code, out, _ = run_cli("quant-report", export, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert "layer (PyTorch module)" in lines[0]
    assert lines[1].split()[:3] == ["1", FRAGILE_MODULE, "(Conv2d)"]

    code, out, _ = run_cli("quant-report", export, "--top", "2", capsys=capsys)
    assert code == 0 and len(out.splitlines()) == 1 + 2 + 1  # head, two layers, summary

    code, out, _ = run_cli("quant-report", export, "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and data[0]["layers"][0]["module"] == FRAGILE_MODULE
    assert data[0]["layers"][0]["label"].startswith(f"{FRAGILE_MODULE} (Conv2d)")
    assert data[0]["summary"]["samples"] == 16

    code, out, err = run_cli("quant-report", fragile.fp32_export, capsys=capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "is not a quantized export" in err


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_export_with_max_drop_records_the_reverted_layers(
    target: str, fragile: Fragile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole pipeline: `kiln export --precision int8 --max-drop` on the targets that can keep layers float."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=fragile.calibration.rows["image"])
    model = tmp_path / "fragile_model.py"
    model.write_text("from tests.models.fragile import fragile_cnn\n\ndef build():\n    return fragile_cnn()\n")
    out = tmp_path / "out"
    args = ["export", f"{model}:build", "-t", target, "--precision", "int8", "--calib", calib, "-o", out]
    code, _, err = run_cli(*args, "--max-drop", BUDGET, "--json", capsys=capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    aware = manifest["target_info"]["quantization"]["accuracy_aware"]
    assert aware["drop"] <= BUDGET < aware["drop_before"]
    assert aware["reverted_modules"][0].startswith(FRAGILE_MODULE)
    assert any(note.startswith("--max-drop: ") and FRAGILE_MODULE in note for note in manifest["notes"])
    if target == "onnx":
        assert QuantReport.read(out).summary.reverted == aware["reverted_modules"]
    assert manifest["parity"]["passed"]

    code, _, err = run_cli(*args[:3], "tflite", *args[4:8], "-o", tmp_path / "t", "--max-drop", "0.01", capsys=capsys)
    assert code == 2 and "--max-drop does not apply to target tflite" in err


def test_onnx_source_with_unnamed_nodes_gets_named_layers(
    fragile: Fragile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14: Kiln names an ONNX source's unnamed nodes when it takes the source in (the same names every
    time), so the quantization summary, the per-layer report and --max-drop's layers kept in float each name
    one layer (unnamed, they were all "", and keeping "" in float kept every unnamed node in float)."""
    source = onnx.load(str(fragile.fp32_onnx))
    for node in source.graph.node:
        node.name = ""
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(source, str(unnamed))
    captured = [capture(load_source(str(unnamed)), None, tmp_path / run).onnx_path for run in ("a", "b")]
    names = [[node.name for node in onnx.load(str(path)).graph.node] for path in captured]
    assert names[0] == names[1] and all(names[0]) and len(set(names[0])) == len(names[0])

    calib = tmp_path / "calib.npz"
    np.savez(calib, image=fragile.calibration.rows["image"])
    out = tmp_path / "out"
    args = ["export", unnamed, "-t", "onnx", "--precision", "int8", "--calib", calib, "--max-drop", BUDGET, "-o", out]
    code, _, err = run_cli(*args, capsys=capsys)
    assert code == 0, err
    quantization = json.loads((out / "manifest.json").read_text())["target_info"]["quantization"]
    aware = quantization["accuracy_aware"]
    assert aware["drop"] <= BUDGET < aware["drop_before"]
    assert aware["reverted"] and set(aware["reverted"]) <= set(names[0])
    assert quantization["excluded"] == aware["reverted"] and set(quantization["kept_float"]) <= set(names[0])
    layers = [layer.name for layer in QuantReport.read(out).layers]
    assert all(layers) and len(set(layers)) == len(layers)
