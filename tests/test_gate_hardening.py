"""The parity gate cannot be switched off by accident: thresholds, empty outputs, declared vs produced shapes,
one failing target among several, and library entry points that raise only Kiln's errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from kiln import KilnError, UsageError, export, load
from kiln.compiler.errors import InternalError
from kiln.compiler.export.options import Thresholds
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.parity.gate import compare
from kiln.compiler.types import Tolerance
from onnx import TensorProto, helper

from tests.conftest import USER_MODELS, run_cli


@pytest.mark.parametrize(
    "flags",
    [
        ("--rtol", "nan"),
        ("--atol", "nan"),
        ("--atol", "-0.001"),
        ("--rtol", "inf"),
        ("--min-cosine", "nan"),
        ("--min-cosine", "1.5"),
        ("--min-top1", "-0.1"),
        ("--min-snr", "nan"),
    ],
)
def test_a_threshold_that_is_not_a_finite_non_negative_number_is_refused_before_any_work(flags, tmp_path, capsys):
    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", *flags, "--out", tmp_path / "o", capsys=capsys)
    assert code == 2, err
    assert flags[0] in err and "capture" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["atol", "rtol", "min_cosine", "min_snr_db", "min_top1"])
def test_the_library_refuses_the_same_thresholds(name, tmp_path):
    for value in (float("nan"), float("inf"), -1.0):
        with pytest.raises(UsageError, match=r"threshold|between 0 and 1"):
            export("zoo:cnn", target="onnx", out=tmp_path / "o", **{name: value})
        with pytest.raises(UsageError):
            Thresholds(**{name: value})
    with pytest.raises(UsageError, match="max-drop"):
        export("zoo:cnn", target="onnx", out=tmp_path / "o", precision="int8", max_drop=float("nan"))


def test_a_stored_tolerance_with_nan_is_refused():
    with pytest.raises(UsageError, match="--rtol nan"):
        Tolerance(atol=1e-4, rtol=float("nan"))


def test_an_output_with_no_elements_is_no_evidence():
    empty = [{"y": np.zeros((0, 10), np.float32)}]
    (metrics,) = compare(empty, empty, Tolerance.for_precision("fp32"))
    assert not metrics.passed and "no elements" in metrics.reason
    ints = [{"i": np.zeros((1, 0), np.int64)}]
    assert not compare(ints, ints, Tolerance.for_precision("fp32"))[0].passed


def _relu_onnx(path, input_shape, output_shape):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return path


def test_an_onnx_model_with_a_zero_batch_is_not_published(tmp_path, capsys):
    model = _relu_onnx(tmp_path / "zero.onnx", [0, 10], [0, 10])
    code, out, err = run_cli("export", model, "-t", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert code == 1, err
    assert "no elements" in out + err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_declared_output_shape_that_contradicts_the_graph_is_refused(tmp_path, capsys):
    model = _relu_onnx(tmp_path / "declared.onnx", [1, 10], [1, 0])
    code, _, err = run_cli("export", model, "-t", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and "(10) vs (0)" in err
    assert not (tmp_path / "o").exists()


def test_the_manifest_records_the_shape_the_artifact_produced(tmp_path, capsys):
    # NonZero's output length depends on the data, so shape inference cannot contradict a declared [2, 0].
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["y"])],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 0])],
    )
    model = tmp_path / "declared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), model)
    ones = tmp_path / "ones.npz"
    np.savez(ones, x=np.ones((1, 10), np.float32))
    code, _, err = run_cli("export", model, "-t", "onnx", "--inputs", ones, "--out", tmp_path / "o", capsys=capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["outputs"][0]["shape"] == [2, 10]
    assert manifest["parity"]["outputs"][0]["shape"] == [2, 10]


def test_one_target_failing_to_convert_does_not_block_the_others(tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, err = run_cli(
        "export", f"{USER_MODELS}:bucketize", "-t", "onnx,pt2", "--out", out, "--json", capsys=capsys
    )
    assert code == 1, err
    results = {r["target"]: r for r in json.loads(stdout)["results"]}
    assert results["pt2"]["published"] and (out / "pt2" / "manifest.json").is_file()
    assert not results["onnx"]["published"] and results["onnx"]["failure"]["step"] == "capture"
    assert "lowering to ONNX failed" in results["onnx"]["failure"]["message"]
    assert not (out / "onnx").exists()
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:bucketize", "-t", "onnx,pt2", "--out", tmp_path / "strict", "--all-or-nothing",
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "lowering to ONNX failed" in err
    assert not (tmp_path / "strict").exists()


def test_the_library_returns_the_failures_among_the_results(tmp_path):
    results = export_targets(f"{USER_MODELS}:bucketize", "onnx,pt2", tmp_path / "o")
    by_target = {r.target: r for r in results}
    assert by_target["pt2"].published and by_target["pt2"].failure is None
    assert by_target["onnx"].failure is not None and by_target["onnx"].manifest is None


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: export("zoo:cnn", target=None, out=tmp / "o"),
        lambda tmp: export("zoo:cnn", target="onnx", out=tmp / "o", precison="fp32"),
        lambda tmp: export(42, target="onnx", out=tmp / "o"),
        lambda tmp: export("zoo:cnn", target="onnx", out=3.5),
        lambda tmp: load(None),
        lambda tmp: load(tmp / "missing"),
    ],
)
def test_library_entry_points_raise_only_kiln_errors(call, tmp_path):
    with pytest.raises(KilnError) as raised:
        call(tmp_path)
    assert not isinstance(raised.value, InternalError), raised.value.one_line()


@pytest.mark.parametrize("value", ["int8", "uint8", "nhwc,int8"])
def test_integer_io_is_refused_not_dropped(value, tmp_path, capsys):
    code, _, err = run_cli("export", "zoo:cnn", "-t", "edgetpu", "--io", value, "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and "integer I/O is not a separate option" in err


@pytest.mark.parametrize(
    "text",
    ["[]", '{"target": "onnx"}', '{"target": 3, "precision": "fp32", "published": true, "parity_gate": true}', "{"],
)
def test_a_malformed_manifest_is_a_usage_error(text, tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(text)
    for command in (("verify", tmp_path), ("run", tmp_path, "--inputs", tmp_path / "x.npz")):
        code, _, err = run_cli(*command, capsys=capsys)
        assert code == 2, err
        assert "Traceback" not in err and "internal error" not in err
