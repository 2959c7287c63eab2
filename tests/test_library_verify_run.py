"""Library API, dynamic batch, verify and run, on real exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kiln import UsageError, export, load
from kiln.compiler.capture.zoo import ZOO

from tests.conftest import USER_MODELS, run_cli
from tests.test_cli_errors import assert_one_line_error


def test_library_export_and_load(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).eval()
    x = torch.randn(3, 5)
    result = export(module, (x,), target="openvino", out=tmp_path / "seq")
    assert result.published and result.parity.passed
    assert {p.name for p in result.artifact_paths} >= {"model.xml", "model.bin"}
    runner = load(result.directory)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(runner(x)["output"], expected, atol=1e-5)
    with pytest.raises(UsageError, match="inputs missing"):
        runner()


def test_dynamic_batch_export(dynamic_export):
    for target, result in dynamic_export.items():
        assert result.parity.passed, result.parity.summary()
        origins = result.parity.sample_origins
        assert "random batch=1" in origins and "random batch=8" in origins
        assert [spec.shape for spec in result.manifest.inputs] == [("batch", 16), ("batch", 16)]
        assert result.manifest.outputs[0].shape[0] == "batch"
        assert result.manifest.target_info["dynamic_batch"] == "1:8"
        module, (ids, mask) = ZOO["transformer"]()
        ids5, mask5 = ids[[0, 1, 0, 1, 1]], mask[[0, 1, 0, 1, 1]]
        with torch.no_grad():
            expected = module(ids5, mask5).numpy()
        np.testing.assert_allclose(load(result.directory)(ids5, mask5)["output"], expected, atol=1e-4), target


def test_multi_target_layout_and_load(zoo_exports):
    root = zoo_exports["cnn"]["onnx"].directory.parent
    with pytest.raises(UsageError, match="several exports"):
        load(root)
    assert load(root, target="cpu").manifest.target == "openvino"


def test_verify_against_stored_reference_and_model(zoo_exports, capsys):
    directory = zoo_exports["lstm"]["openvino"].directory
    code, out, _ = run_cli("verify", directory, capsys=capsys)
    assert code == 0 and "PASSED against stored reference" in out
    code, out, _ = run_cli("verify", directory, "--model", "zoo:lstm", capsys=capsys)
    assert code == 0 and "PASSED against pytorch eager" in out
    code, out, _ = run_cli("verify", directory.parent, "--json", capsys=capsys)
    assert code == 0 and {r["target"] for r in json.loads(out)} == {"onnx", "openvino", "pt2"}


def test_verify_with_a_different_model_fails(tmp_path, capsys, zoo_exports):
    directory = zoo_exports["cnn"]["onnx"].directory
    factory = tmp_path / "other.py"
    factory.write_text(
        "import torch\nfrom kiln.compiler.capture.zoo import SmallCNN\n"
        "def build():\n    torch.manual_seed(123)\n"
        "    return SmallCNN().eval(), (torch.randn(1, 3, 32, 32),)\n"
    )
    code, out, _ = run_cli("verify", directory, "--model", f"{factory}:build", capsys=capsys)
    assert code == 1
    assert "different weights" in out and "FAIL" in out


def test_verify_detects_a_modified_artifact(tmp_path, capsys, zoo_exports):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(zoo_exports["mobilenet"]["openvino"].directory, copy)
    weights = bytearray((copy / "model.bin").read_bytes())
    weights[100] ^= 0xFF
    (copy / "model.bin").write_bytes(bytes(weights))
    code, _, err = run_cli("verify", copy, capsys=capsys)
    assert code == 2 and "model.bin changed since export" in err


def test_run_saves_outputs(tmp_path, capsys, zoo_exports):
    directory = zoo_exports["transformer"]["onnx"].directory
    _, (ids, mask) = ZOO["transformer"]()
    inputs = tmp_path / "x.npz"
    np.savez(inputs, input_ids=ids.numpy(), attention_mask=mask.numpy())
    output = tmp_path / "y.npz"
    code, out, _ = run_cli("run", directory, "--inputs", inputs, "--output", output, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["outputs"]["output"]["shape"] == [2, 4]
    with np.load(output) as saved:
        np.testing.assert_allclose(saved["output"], load(directory)(ids, mask)["output"])


def test_run_checks_its_output_path_first_and_prints_where_it_saved(tmp_path, capsys, cnn_onnx_export):
    """--output in a folder that does not exist, or naming a directory: one line, exit 2, before anything runs
    (it was a FileNotFoundError after the run, exit 4). --output NAME without .npz saves NAME.npz (as np.savez
    does), and that is the path printed and in the JSON (it printed NAME)."""
    inputs = tmp_path / "in.npz"
    np.savez(inputs, image=np.zeros((1, 3, 32, 32), np.float32))
    run = ("run", cnn_onnx_export, "--inputs", inputs, "--output")
    missing = tmp_path / "nodir" / "x.npz"
    code, _, err = run_cli(*run, missing, capsys=capsys)
    assert_one_line_error(code, err, f"--output {missing}: directory {missing.parent} does not exist")
    (tmp_path / "d.npz").mkdir()
    code, _, err = run_cli(*run, tmp_path / "d", capsys=capsys)
    assert_one_line_error(code, err, f"--output {tmp_path / 'd.npz'} is a directory")
    (tmp_path / "somedir").mkdir()
    code, out, err = run_cli(*run, tmp_path / "somedir", capsys=capsys)
    assert code == 0 and out.splitlines()[-1] == f"saved to {tmp_path / 'somedir.npz'}", (out, err)
    code, out, err = run_cli(*run, tmp_path / "somedir", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["output_file"] == str(tmp_path / "somedir.npz"), (out, err)
    with np.load(tmp_path / "somedir.npz") as saved:
        expected = load(cnn_onnx_export)(np.zeros((1, 3, 32, 32), np.float32))["output"]
        np.testing.assert_allclose(saved["output"], expected)
    assert list((tmp_path / "somedir").iterdir()) == []


def test_export_json_output(tmp_path, capsys):
    code, out, err = run_cli(
        "export", f"{USER_MODELS}:argmax_head", "-t", "onnx,openvino", "--out", tmp_path / "o", "--json", capsys=capsys
    )
    assert code == 0, err
    assert err == ""  # --json keeps stderr clean of progress
    payload = json.loads(out)
    assert payload["ok"] is True
    for result in payload["results"]:
        kinds = {o["name"]: o["kind"] for o in result["parity"]["outputs"]}
        assert kinds == {"output_0": "float", "output_1": "exact", "output_2": "exact"}


def test_user_inputs_are_added_to_parity(tmp_path, capsys):
    inputs = tmp_path / "mine.npz"
    np.savez(inputs, x=np.full((2, 6), 3.0, np.float32))
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:good", "-t", "onnx", "--inputs", inputs, "--out", tmp_path / "o", "-q", capsys=capsys
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["parity"]["sample_origins"][-1] == "user:mine.npz"
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "features"]


def test_pt2_and_onnx_sources(tmp_path, capsys, zoo_exports):
    module, inputs = ZOO["mobilenet"]()
    saved = tmp_path / "mobilenet.pt2"
    torch.export.save(torch.export.export(module, inputs), str(saved))
    code, _, err = run_cli("export", saved, "-t", "openvino", "--out", tmp_path / "from_pt2", "-q", capsys=capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "from_pt2" / "manifest.json").read_text())
    assert manifest["source"]["reference"].startswith("pytorch (exported program")

    onnx_file = zoo_exports["cnn"]["onnx"].directory / "model.onnx"
    code, _, err = run_cli("export", onnx_file, "-t", "all", "--out", tmp_path / "from_onnx", "-q", capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "from_onnx").iterdir()) == ["onnx", "openvino"]


def test_model_with_example_inputs_attribute(tmp_path, capsys):
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:with_attribute", "-t", "pt2", "--out", tmp_path / "o", "-q", capsys=capsys
    )
    assert code == 0, err


def test_openvino_precisions(tmp_path, capsys):
    code, _, err = run_cli(
        "export", "zoo:cnn", "-t", "cpu", "--precision", "fp16", "--out", tmp_path / "fp16", "-q", capsys=capsys
    )
    assert code == 0, err
    assert 'element_type="f16"' in (tmp_path / "fp16" / "model.xml").read_text()
    code, _, err = run_cli(
        "export", "zoo:cnn", "-t", "cpu", "--precision", "bf16", "--out", tmp_path / "bf16", "-q", capsys=capsys
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["runtime_config"] == {"INFERENCE_PRECISION_HINT": "bf16"}
    assert manifest["parity"]["tolerance"]["atol"] == 5e-2
    used = manifest["parity"]["runtime"]["inference_precision"]
    has_bf16 = "BF16" in manifest["target_info"]["cpu_capabilities"]
    assert used == ("bf16" if has_bf16 else "f32")
    assert has_bf16 or any("no bf16" in note for note in manifest["notes"])
