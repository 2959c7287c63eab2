"""`--target tflite` and `--target edgetpu`: LiteRT models checked in the LiteRT interpreter."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch", reason="the tflite target needs litert-torch (pip install .[tpu])")
pytest.importorskip("ai_edge_quantizer", reason="the tflite target needs ai-edge-quantizer (pip install .[tpu])")

from kiln import export, load
from kiln.compiler.capture.zoo import ZOO
from kiln.compiler.export.options import Calibration, ExportOptions, Thresholds
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.parity.gate import ParitySamples, judge
from kiln.compiler.quantization.calibration import CalibrationSpec
from kiln.compiler.types import Manifest, Tolerance
from kiln.targets.edgetpu import COMPILER
from kiln.targets.litert import read_ops

from tests.conftest import ROOT, USER_MODELS, ZOO_MODELS, run_cli

CALIBRATION_ROWS = 32


def _random_images(count: int, seed: int) -> np.ndarray:
    """Image-like calibration rows: the zoo CNNs take 3x32x32 standard-normal images."""
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="session")
def tflite_fp32(tmp_path_factory):
    """Every zoo model exported to tflite fp32: name -> result."""
    root = tmp_path_factory.mktemp("tflite")
    return {name: export_targets(f"zoo:{name}", "tflite", root / name, ExportOptions())[0] for name in ZOO_MODELS}


@pytest.fixture(scope="session")
def calibration_sources(tmp_path_factory):
    """An .npz file and a directory of .npy files of calibration images."""
    root = tmp_path_factory.mktemp("calib")
    np.savez(root / "images.npz", image=_random_images(CALIBRATION_ROWS, 1))
    directory = root / "frames"
    directory.mkdir()
    for index, row in enumerate(_random_images(CALIBRATION_ROWS, 2)):
        np.save(directory / f"{index:03d}.npy", row)  # one sample per file, no batch axis
    return {"file": root / "images.npz", "dir": directory}


@pytest.fixture(scope="session")
def tflite_quantized(tmp_path_factory, calibration_sources):
    """cnn at fp16, int8-dynamic and int8 (calibrated from an .npz); mobilenet int8 from a directory."""
    root = tmp_path_factory.mktemp("tflite-q")
    runs = {
        ("cnn", "fp16"): None,
        ("cnn", "int8-dynamic"): None,
        ("cnn", "int8"): calibration_sources["file"],
        ("mobilenet", "int8"): calibration_sources["dir"],
    }
    results = {}
    for (name, precision), calib in runs.items():
        options = ExportOptions(precision, calibration=Calibration(CalibrationSpec(str(calib) if calib else None)))
        (results[name, precision],) = export_targets(f"zoo:{name}", "tflite", root / f"{name}-{precision}", options)
    return results


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_every_zoo_model_converts_to_fp32_tflite_with_parity(tflite_fp32, model):
    result = tflite_fp32[model]
    assert result.published and result.parity.passed, result.parity.summary()
    assert max(o.max_abs_error for o in result.parity.outputs) < 1e-4
    assert (result.directory / "model.tflite").is_file()
    info = result.manifest.target_info
    assert info["ops"] and info["model_bytes"] == (result.directory / "model.tflite").stat().st_size
    assert result.parity.runtime["runtime"].startswith("ai-edge-litert")


def test_converter_gaps_are_decomposed_and_reported(tflite_fp32):
    detector = tflite_fp32["detector"].manifest
    assert "aten.pow.Tensor_Scalar" in detector.target_info["decompositions_applied"]
    assert any("decomposed for the TFLite converter" in note for note in detector.notes)
    assert "POW" not in detector.target_info["ops"]


def test_embedding_bag_converts_through_a_decomposition(tmp_path):
    (result,) = export_targets(f"{USER_MODELS}:bag_of_words", "tflite", tmp_path / "o", ExportOptions())
    assert result.parity.passed, result.parity.summary()
    assert result.manifest.target_info["decompositions_applied"] == ["aten.embedding_bag.padding_idx"]


@pytest.mark.parametrize("precision", ["fp16", "int8-dynamic", "int8"])
def test_cnn_precisions_pass_their_default_thresholds(tflite_quantized, precision):
    result = tflite_quantized["cnn", precision]
    assert result.published and result.parity.passed, result.parity.summary()
    assert result.manifest.precision == precision
    minimum_ratio = {"fp16": 1.8, "int8-dynamic": 3.0, "int8": 3.5}[precision]
    assert result.manifest.target_info["size_ratio_vs_fp32"] > minimum_ratio


@pytest.mark.parametrize("model", ["cnn", "mobilenet"])
def test_calibrated_int8_is_small_and_close(tflite_quantized, model):
    result = tflite_quantized[model, "int8"]
    assert result.parity.passed, result.parity.summary()
    (logits,) = result.parity.outputs
    assert logits.min_cosine >= 0.99 and logits.snr_db >= 15 and logits.top1_agreement >= 0.9
    info = result.manifest.target_info
    assert info["size_ratio_vs_fp32"] >= 3.5
    calibration = info["calibration"]
    assert (calibration["samples"], calibration["representative"]) == (CALIBRATION_ROWS, True)
    assert calibration["used"] == {
        "method": "minmax", "method_asked": "minmax", "per_channel": True, "symmetric_activations": False
    }  # fmt: skip
    runtime = result.parity.runtime
    assert runtime["inference_precision"] == "int8"
    quantization = runtime["io_quantization"]["image"]
    assert quantization["dtype"] == "int8" and quantization["scale"] > 0
    assert not any("RANDOM" in note for note in result.manifest.notes)


def test_int8_model_is_integer_inside(tflite_quantized):
    ops = read_ops(tflite_quantized["cnn", "int8"].directory / "model.tflite")
    for op in ops:
        for tensor in [*op.inputs, *op.outputs]:
            assert tensor.dtype in ("INT8", "INT32"), f"{op.name}: {tensor.name} is {tensor.dtype}"


def test_int8_thresholds_are_defaults_the_user_can_override(tflite_quantized):
    result = tflite_quantized["cnn", "int8"]
    assert result.parity.tolerance == Tolerance.for_precision("int8")
    achieved = result.parity.outputs[0].snr_db
    strict = Thresholds(min_snr_db=achieved + 10).tolerance("int8")
    assert strict.min_cosine == Tolerance.for_precision("int8").min_cosine
    samples = ParitySamples.load(result.directory, [])
    report = judge(load(result.directory).run, samples, strict, "stored reference", {})
    assert not report.passed
    assert "SNR" in report.outputs[0].reason


@pytest.fixture(scope="session")
def loader_file(tmp_path_factory):
    """A Python calibration loader, the way a user writes one: yields input tuples of tensors."""
    path = tmp_path_factory.mktemp("loader") / "calib_loader.py"
    path.write_text(
        "import torch\n\n"
        "def samples():\n"
        "    generator = torch.Generator().manual_seed(3)\n"
        "    for _ in range(20):\n"
        "        yield (torch.randn(1, 3, 32, 32, generator=generator),)\n"
    )
    return path


@pytest.fixture(scope="session")
def edgetpu_cnn(tmp_path_factory, loader_file):
    """The CNN for the Edge TPU with NHWC I/O, calibrated by a Python loader, through the CLI."""
    out = tmp_path_factory.mktemp("edgetpu") / "cnn"
    command = [sys.executable, str(ROOT / "cli.py"), "export", "zoo:cnn", "--target", "edgetpu", "--io", "nhwc"]
    command += ["--calib", f"{loader_file}:samples", "--out", str(out), "-q"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""  # -q
    return out


def test_edgetpu_cnn_is_all_int8_and_every_op_maps(edgetpu_cnn):
    manifest = Manifest.read(edgetpu_cnn)
    assert manifest.precision == "int8" and manifest.parity.passed
    audit = manifest.target_info["edgetpu_audit"]
    assert audit["all_mapped"], audit
    assert audit["first_fallback"] is None and audit["ops_on_edgetpu"] == audit["ops_total"]
    for op in read_ops(edgetpu_cnn / "model.tflite"):
        for tensor in [*op.inputs, *op.outputs]:
            assert tensor.dtype in ("INT8", "INT32"), f"{op.name}: {tensor.name} is {tensor.dtype}"


def test_edgetpu_io_is_nhwc_batch_1_with_no_transposes_inside(edgetpu_cnn):
    manifest = Manifest.read(edgetpu_cnn)
    (image,) = manifest.inputs
    assert image.layout == "NHWC" and list(image.shape) == [1, 32, 32, 3]
    assert manifest.target_info["transposes_inside"] == 0
    layout = manifest.target_info["layout"]
    assert layout["io"] == "nhwc" and layout["transposes_after"] == 0 < layout["transposes_before"]
    assert [(r.name, r.ir) for r in manifest.passes if r.name == "nhwc-layout"] == [("nhwc-layout", "tflite")]
    assert manifest.target_info["calibration"]["representative"] is True
    assert manifest.target_info["calibration"]["samples"] == 20


def test_edgetpu_export_runs_on_nhwc_inputs_and_matches_pytorch(edgetpu_cnn):
    module, (image,) = ZOO["cnn"]()
    model = load(edgetpu_cnn)
    (logits,) = model(image.permute(0, 2, 3, 1).numpy()).values()
    with torch.no_grad():
        expected = module(image).numpy()
    cosine = float(np.dot(logits.ravel(), expected.ravel()) / np.linalg.norm(logits) / np.linalg.norm(expected))
    assert cosine > 0.99


def test_verify_reruns_parity_on_an_nhwc_export(edgetpu_cnn, capsys):
    code, out, _ = run_cli("verify", edgetpu_cnn, capsys=capsys)
    assert code == 0, out
    assert "parity PASSED" in out


@pytest.mark.skipif(shutil.which(COMPILER) is not None, reason="edgetpu_compiler is installed here")
def test_absent_compiler_is_said_in_one_line_and_the_int8_model_kept(edgetpu_cnn):
    manifest = Manifest.read(edgetpu_cnn)
    assert manifest.target_info["edgetpu_compiler"] == {"ran": False, "reason": f"{COMPILER} is not on PATH"}
    assert [n for n in manifest.notes if COMPILER in n] == [
        f"{COMPILER} is not on PATH: kept the int8 model; compile it with: {COMPILER} -s model.tflite"
    ]
    assert not (edgetpu_cnn / "model_edgetpu.tflite").exists()


def test_missing_calibration_warns_loudly_and_the_audit_names_unsupported_ops(tmp_path, capsys):
    code, _, err = run_cli("export", "zoo:mobilenet", "-t", "edgetpu", "--out", tmp_path / "o", capsys=capsys)
    assert code == 0, err
    assert "WARNING: int8 calibrated on RANDOM inputs" in err
    manifest = Manifest.read(tmp_path / "o")
    assert manifest.target_info["calibration"]["representative"] is False
    assert any("RANDOM" in note for note in manifest.notes)
    audit = manifest.target_info["edgetpu_audit"]
    assert not audit["all_mapped"]
    assert audit["unsupported_ops"] == ["HARD_SWISH"]
    first = audit["first_fallback"]
    assert first["op"] == "HARD_SWISH" and "not in the Edge TPU's supported operations" in first["reason"]
    after = [op for op in audit["ops"] if op["index"] > first["index"]]
    assert after and all(op["placement"].startswith("cpu") for op in after)


def test_failing_edgetpu_compiler_is_an_error_not_silence(tmp_path, capsys, monkeypatch):
    # A stand-in compiler that fails the way a real one does on a bad model (exit 1 with a message).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / COMPILER
    fake.write_text("#!/bin/sh\necho 'Internal compiler error. Aborting!' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, _, err = run_cli("export", f"{USER_MODELS}:good", "-t", "edgetpu", "--out", tmp_path / "o", capsys=capsys)
    lines = [line for line in err.splitlines() if line.startswith("kiln: error")]
    assert code == 2 and len(lines) == 1
    assert f"{COMPILER} failed (exit 1): Internal compiler error. Aborting!" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: np.savez(d / "c.npz", x=np.zeros((4, 7), np.float32)), "has shape [4, 7], expected [N, 6]"),
        (lambda d: np.savez(d / "c.npz", x=np.zeros((4, 6), np.complex64)), "is complex64, expected float32"),
        (lambda d: np.savez(d / "c.npz", y=np.zeros((4, 6), np.float32)), "has no array for input 'x'"),
        (lambda d: (d / "c.npz").write_text("not numpy"), "cannot read calibration file"),
        (lambda d: None, "does not exist"),
    ],
    ids=["wrong-shape", "wrong-dtype", "wrong-name", "not-npz", "missing"],
)
def test_bad_calibration_data_is_a_clear_error(tmp_path, capsys, make, expected):
    make(tmp_path)
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:good", "-t", "tflite", "--precision", "int8", "--calib", tmp_path / "c.npz",
        "--out", tmp_path / "o", capsys=capsys,
    )  # fmt: skip
    lines = [line for line in err.splitlines() if not line.startswith("[kiln]")]
    assert code == 2 and len(lines) == 1, err
    assert expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_calibration_loader_yielding_the_wrong_arity_is_a_clear_error(tmp_path, capsys):
    loader = tmp_path / "bad_loader.py"
    loader.write_text("import numpy as np\n\ndef samples():\n    yield (np.zeros((1, 6), np.float32), 1)\n")
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:good", "-t", "tflite", "--precision", "int8", "--calib", f"{loader}:samples",
        "--out", tmp_path / "o", capsys=capsys,
    )  # fmt: skip
    assert code == 2
    assert "item 0 has 2 inputs, the model takes 1" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "pt2", "--io", "nhwc"], "target pt2 does not support --io nhwc"),
        (["-t", "tflite", "--io", "planar"], "--io planar: unknown I/O option"),
        (["-t", "edgetpu", "--precision", "fp32"], "target edgetpu does not support precision fp32"),
        (["-t", "tflite", "--precision", "int4"], "target tflite does not support precision int4"),
    ],
)
def test_bad_litert_options_are_refused_before_any_work(tmp_path, capsys, argv, expected):
    code, _, err = run_cli("export", "zoo:cnn", *argv, "--out", tmp_path / "o", capsys=capsys)
    assert code == 2
    assert expected in err
    assert "capture" not in err


def test_unconvertible_op_names_the_op_and_the_module(tmp_path, capsys):
    code, _, err = run_cli("export", f"{USER_MODELS}:bucketize", "-t", "tflite", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2
    assert "LiteRT conversion failed on aten.searchsorted.Tensor in <root> (Bucketize)" in err
    assert "While executing" not in err
    assert not (tmp_path / "o").exists()


def test_digits_cnn_loses_at_most_one_point_after_int8_export(tmp_path):
    pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")
    from tests.models.digits import accuracy, trained_digits_cnn

    model, train_x, _, test_x, test_y = trained_digits_cnn()
    with torch.no_grad():
        float_accuracy = accuracy(lambda x: model(torch.from_numpy(x)).numpy(), test_x, test_y)
    assert float_accuracy > 0.95  # the model really learned the task
    np.savez(tmp_path / "train.npz", image=train_x)
    result = export(
        model, (torch.from_numpy(test_x[:1]),), "tflite", tmp_path / "digits", precision="int8",
        calib=tmp_path / "train.npz",
    )  # fmt: skip
    assert result.manifest.target_info["calibration"]["samples"] == 100
    quantized = load(result.directory)
    int8_accuracy = accuracy(lambda x: quantized(x)["output"], test_x, test_y)
    print(f"digits held-out accuracy: fp32 {float_accuracy:.4f}, int8 {int8_accuracy:.4f}")
    assert float_accuracy - int8_accuracy <= 0.01
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["parity"]["runtime"]["inference_precision"] == "int8"


def test_all_targets_skips_those_without_the_precision(tmp_path, capsys):
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:good", "-t", "all", "--precision", "int8-dynamic", "--out", tmp_path / "o",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "skipping edgetpu: target edgetpu does not support precision int8-dynamic" in err
    built = ("onnx", "openvino", "tflite")
    assert [Manifest.read(tmp_path / "o" / t).precision for t in built] == ["int8-dynamic"] * 3


def test_int64_token_inputs_calibrate_for_int8(tmp_path):
    # TFLite narrows int64 I/O to int32: calibration feeds must be narrowed the same way.
    options = ExportOptions("int8", calibration=Calibration(CalibrationSpec(samples=8)))
    (result,) = export_targets("zoo:transformer", "tflite", tmp_path / "o", options)
    assert result.manifest.target_info["calibration"]["samples"] == 8
    assert result.parity.runtime["inference_precision"] == "int8"
    assert result.parity.outputs[0].min_cosine > 0.95
