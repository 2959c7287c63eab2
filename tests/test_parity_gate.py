"""The parity gate: metrics, tolerances by precision, rejection of broken artifacts."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from kiln import ParityError, export
from kiln.compiler.parity.gate import compare
from kiln.compiler.types import Tolerance
from kiln.passes import PASSES
from kiln.passes.base import ONNX, Pass, PassResult

from tests.conftest import USER_MODELS, run_cli

FP32 = Tolerance.for_precision("fp32")


def test_identical_outputs_pass():
    data = [{"y": np.linspace(-1, 1, 50, dtype=np.float32)}]
    (metrics,) = compare(data, data, FP32)
    assert metrics.passed and metrics.max_abs_error == 0 and metrics.min_cosine == pytest.approx(1.0)


def test_small_drift_passes_fp32_but_large_error_fails():
    expected = [{"y": np.linspace(1, 2, 100, dtype=np.float32)}]
    close = [{"y": expected[0]["y"] + 1e-6}]
    far = [{"y": expected[0]["y"] + np.where(np.arange(100) == 7, 0.1, 0.0).astype(np.float32)}]
    assert compare(close, expected, FP32)[0].passed
    (bad,) = compare(far, expected, FP32)
    assert not bad.passed
    assert bad.mismatch_fraction == pytest.approx(0.01)
    assert bad.max_abs_error == pytest.approx(0.1, rel=1e-5)
    assert "outside atol" in bad.reason


def test_bf16_tolerance_accepts_bf16_rounding_fp32_does_not():
    rng = np.random.default_rng(0)
    expected = [{"y": rng.standard_normal(1000).astype(np.float32)}]
    rounded = [{"y": torch.from_numpy(expected[0]["y"]).bfloat16().float().numpy()}]
    assert compare(rounded, expected, Tolerance.for_precision("bf16"))[0].passed
    assert not compare(rounded, expected, FP32)[0].passed


def test_integer_and_boolean_outputs_compare_exactly():
    expected = [{"index": np.array([1, 2, 3]), "mask": np.array([True, False, True])}]
    flipped = [{"index": np.array([1, 2, 4]), "mask": np.array([True, False, True])}]
    index, mask = compare(flipped, expected, FP32)
    assert index.kind == "exact" and not index.passed and index.agreement == pytest.approx(2 / 3)
    assert mask.passed and mask.agreement == 1.0
    quantized = Tolerance(atol=0, rtol=0, min_agreement=0.6)
    assert compare(flipped, expected, quantized)[0].passed


def test_a_decoders_cache_outputs_are_summarised_by_their_worst_and_a_failure_keeps_its_line():
    """A 30-layer decoder's report printed 60 `present.N.key|value` lines: outputs named alike but for one number
    are summarised in one line by the worst of them; a failing output keeps its own line."""
    from kiln.compiler.types import ParityReport

    rng = np.random.default_rng(0)
    want, got = [{}], [{}]
    for layer in range(4):
        for kind in ("key", "value"):
            name = f"present.{layer}.{kind}"
            want[0][name] = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
            drift = 0.2 if (layer, kind) == (3, "value") else 1e-6 * (layer + 1)  # present.3.value fails
            got[0][name] = want[0][name] + np.float32(drift) * rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    outputs = compare(got, want, FP32)
    lines = [
        line.strip() for line in ParityReport(False, "eager", FP32, 1, ["example"], outputs).summary().splitlines()[1:]
    ]
    keys = [line for line in lines if ".key" in line]
    assert len(lines) == 3 and len(keys) == 1  # the keys; the three passing values; the failing one
    worst = min((o for o in outputs if o.name.endswith("key")), key=lambda o: o.min_cosine)
    assert worst.name == "present.3.key"  # the largest drift
    assert keys[0] == "ok   present.N.key (4 outputs, N = 0..3; the worst, N = 3): " + worst.summary().split(": ", 1)[1]
    assert [line.split(":")[0] for line in lines if "value" in line] == [
        "ok   present.N.value (3 outputs, N = 0..2; the worst, N = 2)",
        "FAIL present.3.value",
    ]


def test_shape_mismatch_missing_output_and_nan():
    expected = [{"y": np.zeros((2, 3), np.float32), "z": np.array([np.nan, 1.0])}]
    (shape, missing) = compare([{"y": np.zeros((3, 2), np.float32)}], expected, FP32)
    assert not shape.passed and "shape [3, 2]" in shape.reason
    assert not missing.passed and "missing" in missing.reason
    (_, nan_ok) = compare([{"y": np.zeros((2, 3), np.float32), "z": np.array([np.nan, 1.0])}], expected, FP32)
    assert nan_ok.passed
    (_, nan_bad) = compare([{"y": np.zeros((2, 3), np.float32), "z": np.array([0.0, 1.0])}], expected, FP32)
    assert not nan_bad.passed


def test_stateful_model_is_rejected_and_kept_for_inspection(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("export", f"{USER_MODELS}:stateful", "-t", "onnx,openvino", "--out", out, capsys=capsys)
    assert code == 1
    assert "REJECTED" in stdout and "FAIL output" in stdout
    assert not (out / "onnx").exists()
    rejected = out / ".rejected" / "onnx"
    manifest = json.loads((rejected / "manifest.json").read_text())
    assert manifest["published"] is False and manifest["parity"]["passed"] is False
    assert (rejected / "model.onnx").is_file()
    # the directory holding only rejected builds may be reused without --force
    code, _, _ = run_cli("export", f"{USER_MODELS}:stateful", "-t", "onnx", "--out", out, "-q", capsys=capsys)
    assert code == 1


def test_tolerance_override_and_no_gate(tmp_path, capsys):
    def export(out: str, *flags: str) -> int:
        source = f"{USER_MODELS}:stateful"
        return run_cli("export", source, "-t", "onnx", "--out", tmp_path / out, *flags, "-q", capsys=capsys)[0]

    assert export("a", "--atol", "100") == 1  # every element within atol, each channel off by a factor: SNR < 1 dB
    assert export("a2", "--atol", "100", "--min-channel-cosine", "0", "--min-channel-snr", "0") == 0
    assert export("b", "--no-parity-gate") == 1
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["published"] is True and manifest["parity_gate"] is False
    assert any("--no-parity-gate" in note for note in manifest["notes"])


def _scale_first_weight(model: ir.Model) -> ir.Model:
    """A deliberately wrong pass: scales one weight by 1.01."""
    name, value = next((n, v) for n, v in model.graph.initializers.items() if v.const_value.size > 8)
    array = value.const_value.numpy() * np.float32(1.01)
    value.const_value = ir.Tensor(array, name=name)
    return model


BROKEN_PASS = Pass(
    "scale-a-weight", "breaks the model on purpose", ONNX, 1, lambda m: PassResult(_scale_first_weight(m), True)
)


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_broken_artifact_is_rejected_by_the_library(tmp_path, target):
    from kiln.compiler.capture.zoo import cnn

    module, inputs = cnn()
    with pytest.raises(ParityError, match="failed parity"):
        export(module, inputs, target=target, out=tmp_path / "o", passes=[*PASSES.values(), BROKEN_PASS])
    assert (tmp_path / "o" / ".rejected" / target / "manifest.json").is_file()
    assert not (tmp_path / "o" / "manifest.json").exists()
