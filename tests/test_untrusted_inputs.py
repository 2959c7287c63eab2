"""Untrusted array files and export directories: refused early and in one line, never unpickled."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from kiln.compiler.errors import UsageError
from kiln.compiler.export.options import export_options
from kiln.compiler.parity.input_files import check_input_files

from tests.conftest import run_cli
from tests.test_cli_errors import assert_one_line_error


def _pickled_npz(path, key="x"):
    np.savez(path, **{key: np.array([{"not": "an array"}], dtype=object)})  # an object array is stored as a pickle
    return path


def test_pickled_inputs_file_is_refused_before_capture(tmp_path, capsys):
    bad = _pickled_npz(tmp_path / "bad.npz")
    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", "--inputs", bad, "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, f"cannot read inputs file {bad} as .npz: Object arrays cannot be loaded")
    assert "capture" not in err and "load zoo:cnn" not in err, "checked before the model is loaded or captured"
    assert not (tmp_path / "o").exists()


def test_unreadable_calibration_file_is_refused_before_capture(tmp_path, capsys):
    corrupt = tmp_path / "calib.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    argv = ("export", "zoo:cnn", "-t", "onnx", "--precision", "int8", "--calib", corrupt, "--out", tmp_path / "o")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert_one_line_error(code, err, f"cannot read calibration file {corrupt} as .npz")
    assert "capture" not in err
    calib_dir = tmp_path / "dir"
    calib_dir.mkdir()
    _pickled_npz(calib_dir / "a.npz")
    with pytest.raises(UsageError, match="Object arrays"):
        check_input_files(export_options(calib=calib_dir, precision="int8"))
    with pytest.raises(UsageError, match=r"calibration source .* does not exist"):
        check_input_files(export_options(calib=tmp_path / "missing.npz"))


def test_calibration_file_is_not_checked_when_no_target_calibrates(tmp_path):
    """--calib is ignored (and said so) at fp32: an unreadable file there stays harmless, as before."""
    corrupt = tmp_path / "calib.npz"
    corrupt.write_bytes(b"junk")
    check_input_files(export_options(calib=corrupt, precision="fp32"))
    check_input_files(export_options(calib=f"{tmp_path}/loader.py:samples"))  # a loader is not run here


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from kiln import export

    out = tmp_path_factory.mktemp("tiny") / "export"
    export(_Tiny().eval(), (torch.randn(2, 4),), target="pt2", out=out)
    return out


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    return copy


def test_verify_passes_on_an_untouched_export(export_copy, capsys):
    code, _, err = run_cli("verify", export_copy, "-q", capsys=capsys)
    assert code == 0, err


def test_verify_refuses_a_file_not_in_the_manifest(export_copy, capsys):
    (export_copy / "parity" / "extra.npz").write_bytes(b"dropped in later")
    code, _, err = run_cli("verify", export_copy, capsys=capsys)
    assert_one_line_error(code, err, "file parity/extra.npz is not in the manifest")


def test_verify_refuses_a_listed_file_that_is_missing(export_copy, capsys):
    (export_copy / "parity" / "reference.npz").unlink()
    code, _, err = run_cli("verify", export_copy, capsys=capsys)
    assert_one_line_error(code, err, "artifact file parity/reference.npz is missing")


def test_verify_refuses_a_pickled_reference_even_with_a_matching_manifest(export_copy, capsys):
    """A reference replaced by a pickle (and the manifest's hash updated to match) is exit 2, never unpickled."""
    import hashlib

    reference = _pickled_npz(export_copy / "parity" / "reference.npz", key="0/output")
    manifest_path = export_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == "parity/reference.npz":
            entry["sha256"] = hashlib.sha256(reference.read_bytes()).hexdigest()
            entry["size"] = reference.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    code, _, err = run_cli("verify", export_copy, capsys=capsys)
    assert_one_line_error(code, err, "stored parity file")
    assert "reference.npz" in err and "Object arrays cannot be loaded" in err


def _spec(dtype, shape=(2, 4)):
    from kiln.compiler.types import TensorSpec

    return TensorSpec("x", shape, dtype)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (np.ones((2, 4), np.float64), "float32"),  # same kind: done, said
        (np.ones((2, 4), np.int32), "int64"),  # same kind, widening
        (np.full((2, 4), 7, np.int64), "int32"),  # same kind, the values fit
        (np.ones((2, 4), np.uint8), "int64"),  # lossless
        (np.ones((2, 4), np.bool_), "float32"),  # lossless between kinds
        (np.eye(2, 4, dtype=np.int64), "bool"),  # 0/1 values as a mask
    ],
)
def test_check_feed_casts_within_a_kind_or_without_loss_and_says_so(given, expected):
    from kiln.compiler.capture.inputs import check_feed

    notes: list[str] = []
    fed = check_feed(_spec(expected), given, "f.npz", notes)
    assert fed.dtype == np.dtype(expected) and np.array_equal(fed, given.astype(expected))
    assert notes == [f"f.npz: input 'x' cast from {given.dtype} to {expected}, the model's input type"]


@pytest.mark.parametrize(
    ("given", "expected", "message"),
    [
        (np.ones((2, 4), np.float32), "int64", "is float32, expected int64"),
        (np.ones((2, 4), np.int64), "float32", "is int64, expected float32"),
        (np.full((2, 4), 1 << 40, np.int64), "int32", "has values that int32 cannot hold"),
        (np.full((2, 4), 2, np.int64), "bool", "has values that bool cannot hold"),
    ],
)
def test_check_feed_refuses_casts_between_kinds_or_with_loss(given, expected, message):
    from kiln.compiler.capture.inputs import check_feed

    with pytest.raises(UsageError, match=message):
        check_feed(_spec(expected), given, "f.npz", [])


def test_check_feed_notes_nan_and_inf():
    from kiln.compiler.capture.inputs import check_feed

    notes: list[str] = []
    values = np.ones((2, 4), np.float32)
    values[0, 0], values[1, 1] = np.nan, np.inf
    check_feed(_spec("float32"), values, "f.npz", notes)
    assert notes == ["f.npz: input 'x' has 2 NaN/Inf value(s): its outputs will likely be NaN"]


def test_kiln_run_warns_on_nan_inputs_and_casts(tiny_export, tmp_path, capsys):
    values = np.ones((2, 4), np.float64)
    values[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=values)
    code, _, err = run_cli(
        "run", tiny_export, "--inputs", tmp_path / "nan.npz", "--output", tmp_path / "o.npz", "-q", capsys=capsys
    )
    assert code == 0, err
    assert err.splitlines() == [
        f"kiln: warning: {tmp_path / 'nan.npz'}: input 'x' cast from float64 to float32, the model's input type",
        f"kiln: warning: {tmp_path / 'nan.npz'}: input 'x' has 1 NaN/Inf value(s): its outputs will likely be NaN",
    ]
    np.savez(tmp_path / "int.npz", x=np.ones((2, 4), np.int64))
    code, _, err = run_cli("run", tiny_export, "--inputs", tmp_path / "int.npz", capsys=capsys)
    assert_one_line_error(code, err, "input 'x' is int64, expected float32")
