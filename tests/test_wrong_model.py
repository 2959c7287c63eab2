"""`verify --model` and `debug --model` given a model that is not the export's: exit 2 with one line, never an
internal error, never a localization of the wrong model; `debug --html` checked before any work."""

from __future__ import annotations

from tests.conftest import run_cli
from tests.test_cli_errors import assert_one_line_error

# Takes an image of the export's rank and dtype, but only at 16x16: it fails on zoo:cnn's stored 32x32 inputs.
SMALLER = """
import torch
from torch import nn


class Small(nn.Module):
    def forward(self, image):
        return image.reshape(1, 3 * 16 * 16).sum(dim=1, keepdim=True)


def build():
    return Small().eval(), (torch.randn(1, 3, 16, 16),)
"""


def test_verify_with_another_models_inputs_is_bad_input(cnn_onnx_export, capsys):
    code, _, err = run_cli("verify", cnn_onnx_export, "--model", "zoo:lstm", capsys=capsys)
    expected = "zoo:lstm does not take the inputs of this export: its input 1 is float32 of rank 3, the export's"
    assert_one_line_error(code, err, expected)


def test_verify_with_a_model_that_fails_on_the_stored_inputs_is_bad_input(cnn_onnx_export, tmp_path, capsys):
    source = tmp_path / "small.py"
    source.write_text(SMALLER)
    code, _, err = run_cli("verify", cnn_onnx_export, "--model", f"{source}:build", capsys=capsys)
    assert_one_line_error(code, err, f"{source}:build fails on the parity inputs stored in {cnn_onnx_export}")


def test_verify_with_a_model_returning_fewer_outputs_is_bad_input(cnn_onnx_export, tmp_path, capsys):
    source = tmp_path / "nothing.py"
    source.write_text(SMALLER.replace("return image.reshape(1, 3 * 16 * 16).sum(dim=1, keepdim=True)", "return ()"))
    code, _, err = run_cli("verify", cnn_onnx_export, "--model", f"{source}:build", capsys=capsys)
    assert_one_line_error(code, err, f"{source}:build returns fewer outputs than the export in {cnn_onnx_export}")


def test_debug_with_another_model_is_refused_before_localizing(cnn_onnx_export, capsys):
    code, _, err = run_cli("debug", cnn_onnx_export, "--model", "zoo:lstm", capsys=capsys)
    assert_one_line_error(code, err, "zoo:lstm does not take the inputs of this export: its input 1 is 'frames'")
    assert "localize" not in err and "cosine" not in err


def test_debug_html_that_is_a_directory_is_refused_before_any_work(cnn_onnx_export, tmp_path, capsys):
    code, _, err = run_cli("debug", cnn_onnx_export, "--model", "zoo:cnn", "--html", tmp_path, capsys=capsys)
    assert_one_line_error(code, err, f"--html {tmp_path} is a directory")
    assert "[kiln]" not in err, "nothing loaded, captured or localized"
