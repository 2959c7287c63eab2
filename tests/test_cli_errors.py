"""Bad input: one line on stderr saying what is wrong and how to fix it, exit 2, nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import ClassVar

import onnx
import pytest
import torch

from tests.conftest import ROOT, USER_MODELS, run_cli

BAD_MODELS = {
    "missing file": ("no/such/model.py:build", "does not exist"),
    "no factory named": (f"{USER_MODELS}", "names no function"),
    "missing factory": (f"{USER_MODELS}:missing", "has no function 'missing'"),
    "factory raises": (f"{USER_MODELS}:raises", "raised RuntimeError: checkpoint not found"),
    "wrong return": (f"{USER_MODELS}:wrong_return", "returned str, not (module, example_inputs)"),
    "inputs do not match forward": (f"{USER_MODELS}:wrong_inputs", "do not match TwoLayer.forward(x)"),
    "inputs of the wrong shape": (f"{USER_MODELS}:wrong_shape", "mat1 and mat2 shapes cannot be multiplied"),
    "forward's bare assert fails": (f"{USER_MODELS}:failing_assert", "(2, 3):float32) failed: AssertionError (hint"),
    "data-dependent control flow": (f"{USER_MODELS}:data_dependent", "user_models.py:"),
    "unknown zoo model": ("zoo:resnet9000", "no built-in model"),
    "unknown source kind": ("model.h5", "don't know how to load"),
}


def assert_one_line_error(code: int, err: str, expected: str, exit_code: int = 2) -> None:
    lines = [line for line in err.splitlines() if not line.startswith("[kiln]")]
    assert code == exit_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error: ") and expected in lines[0], lines[0]
    assert "hint:" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_source(case, tmp_path, capsys):
    spec, expected = BAD_MODELS[case]
    out = tmp_path / "out"
    code, _, err = run_cli("export", spec, "--target", "onnx", "--out", out, capsys=capsys)
    assert_one_line_error(code, err, expected)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_data_dependent_error_names_the_line_and_a_fix(tmp_path, capsys):
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:data_dependent", "-t", "onnx", "--out", tmp_path / "o", capsys=capsys
    )
    assert code == 2
    assert "user_models.py:46 (if x.sum() > 0:)" in err
    assert "torch.where" in err
    assert "def forward" not in err  # no converter graph dump


def test_unknown_target_suggests_the_closest(tmp_path, capsys):
    code, _, err = run_cli("export", "zoo:cnn", "--target", "openvno", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "unknown target 'openvno'")
    assert "did you mean openvino?" in err


def test_unsupported_precision(tmp_path, capsys):
    code, _, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx", "--precision", "bf16", "--out", tmp_path / "o", capsys=capsys
    )
    assert_one_line_error(code, err, "does not support precision bf16")


@pytest.mark.parametrize("value", ["8", "8:1", "0:4", "a:b"])
def test_bad_dynamic_batch(value, tmp_path, capsys):
    code, _, err = run_cli(
        "export", "zoo:cnn", "-t", "onnx", "--dynamic-batch", value, "--out", tmp_path / "o", capsys=capsys
    )
    assert_one_line_error(code, err, "--dynamic-batch")


def test_onnx_source_to_a_pytorch_target(tmp_path, capsys, zoo_exports):
    onnx_file = zoo_exports["cnn"]["onnx"].directory / "model.onnx"
    code, _, err = run_cli("export", onnx_file, "--target", "pt2", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "needs a PyTorch model")


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_corrupt_model_file(suffix, tmp_path, capsys):
    bad = tmp_path / f"model{suffix}"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    code, _, err = run_cli("export", bad, "--target", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, str(bad))
    assert not (tmp_path / "o").exists()


def test_truncated_onnx_file(tmp_path, capsys, zoo_exports):
    good = (zoo_exports["cnn"]["onnx"].directory / "model.onnx").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good[: len(good) // 2])
    code, _, err = run_cli("export", bad, "--target", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "truncated.onnx")


def _onnx_with_external_data(directory, location):
    """An Add model whose weight `w` lives in the external file `location` (relative to `directory`)."""
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [weight],
    )
    path = directory / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_onnx_external_data_outside_its_directory_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 8)
    path = _onnx_with_external_data(model_dir, "../secret.bin")
    code, _, err = run_cli("export", path, "--target", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "outside the model's directory")


def test_onnx_external_data_inside_its_directory_is_accepted(tmp_path, capsys):
    path = _onnx_with_external_data(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(torch.tensor([1.0, 2.0]).numpy().tobytes())
    code, _, err = run_cli("export", path, "--target", "openvino", "--out", tmp_path / "o", "-q", capsys=capsys)
    assert code == 0, err


def test_existing_output_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("export", "zoo:cnn", "--target", "onnx", "--out", out, capsys=capsys)
    assert_one_line_error(code, err, "already exists")
    assert "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_inputs_file(tmp_path, capsys):
    import numpy as np

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 3, 16, 16), np.float32))
    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", "--inputs", wrong, "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "has shape [1, 3, 16, 16], expected [1, 3, 32, 32]")
    assert not (tmp_path / "o").exists()


def _run_cli_process(*argv, env=None, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *map(str, argv)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_disk_write_failure_leaves_nothing(tmp_path):
    import resource

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    process = _run_cli_process(
        "export", "zoo:cnn", "--target", "openvino", "--out", tmp_path / "o", preexec_fn=small_files_only
    )
    _, err_bytes = process.communicate(timeout=300)
    err = err_bytes.decode()
    lines = [line for line in err.splitlines() if not line.startswith("[kiln]")]
    assert process.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("kiln: error:"), err
    assert "File too large" in lines[0]
    assert list(tmp_path.iterdir()) == []


def _with_default_sigint() -> None:
    """In the child: Ctrl-C's default action, even when this test runs with SIGINT ignored (as a shell's
    background job does), which Python would otherwise keep, never raising KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_export_cleans_up(tmp_path, tmp_path_factory):
    import signal
    import time

    # The child's own temporary directory: other processes' files in /tmp (parallel test runs) don't count.
    child_tmp = tmp_path_factory.mktemp("child-tmp")
    process = _run_cli_process(
        "export",
        "zoo:transformer",
        "--target",
        "onnx",
        "--out",
        tmp_path / "o",
        preexec_fn=_with_default_sigint,
        env={"TMPDIR": str(child_tmp)},
    )
    progress = b""
    deadline = time.time() + 120
    while b"capture" not in progress and time.time() < deadline:  # the stage line has no newline yet
        progress += os.read(process.stderr.fileno(), 1)
    time.sleep(0.5)  # capture takes several seconds: interrupt it midway
    # Press Ctrl-C until it takes: a SIGINT can be absorbed inside the exporters' own try/except blocks.
    for _ in range(80):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            continue
    err = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 130, progress.decode() + err
    assert "capture torch.export -> ONNX ... failed" in progress.decode() + err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert list(child_tmp.iterdir()) == []


def test_help_and_targets_do_not_import_torch():
    code = (
        "import sys, cli; cli.build_parser(); from targets import TARGETS; "
        "[(t.unavailable_reason(), t.limitation()) for t in TARGETS]; "
        "print([m in sys.modules for m in ('torch', 'openvino', 'tensorrt')])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[False, False, False]"


def test_console_script_entry_point():
    kiln = shutil.which("kiln", path=os.path.dirname(sys.executable))
    assert kiln, "the kiln console script is installed by `pip install -e .`"
    result = subprocess.run([kiln, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "export" in result.stdout


class _NeedsAbsentBackend(__import__("targets").Target):
    name = "absent-backend"
    description = "a target whose runtime is not installed here"
    requires: ClassVar[dict[str, str]] = {"kiln_absent_runtime": "kiln-absent-runtime"}


class _BrokenConverter(__import__("targets").Target):
    name = "broken-converter"
    description = "a target whose converter fails on the model"

    def build(self, model, directory, precision):
        raise RuntimeError("Cannot create node: operation FancyOp is not supported")


@pytest.fixture
def extra_targets(monkeypatch):
    from kiln import targets

    monkeypatch.setattr(targets, "TARGETS", [*targets.TARGETS, _NeedsAbsentBackend(), _BrokenConverter()])


def test_unavailable_target_exits_3_and_is_listed(extra_targets, tmp_path, capsys):
    code, _, err = run_cli("export", "zoo:cnn", "--target", "absent-backend", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "not available on this machine: needs kiln-absent-runtime", exit_code=3)
    code, out, _ = run_cli("targets", "--json", capsys=capsys)
    listed = {row["name"]: row for row in __import__("json").loads(out)}
    assert listed["absent-backend"]["available"] is False
    assert "pip install kiln-absent-runtime" in listed["absent-backend"]["why_unavailable"]
    assert listed["openvino"]["available"] is True and listed["onnx"]["aliases"] == ["onnxruntime", "ort"]


def test_converter_failure_names_the_operation(extra_targets, tmp_path, capsys):
    code, _, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx,broken-converter", "--out", tmp_path / "o", "--all-or-nothing",
        capsys=capsys,
    )  # fmt: skip
    assert_one_line_error(code, err, "broken-converter could not convert the model (operation FancyOp)")
    assert list(tmp_path.iterdir()) == []
    # By default the target that converts is still published, and the failure is reported (exit 1).
    code, out, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx,broken-converter", "--out", tmp_path / "o", capsys=capsys
    )
    assert code == 1, err
    assert "broken-converter could not convert the model (operation FancyOp)" in out
    assert (tmp_path / "o" / "onnx" / "manifest.json").is_file()
    assert not (tmp_path / "o" / "broken-converter").exists()


def test_passes_value_may_start_with_a_dash(tmp_path, capsys):
    """`--passes -name` (README: `--passes +name,-name`) is the value of --passes, not an unknown option."""
    out = tmp_path / "o"
    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", "-o", out, "-O1", "--passes", "-identity-elimination",
                           "-q", capsys=capsys)  # fmt: skip
    assert code == 0, err
    from kiln.compiler.types import Manifest

    names = [r.name for r in Manifest.read(out).passes]
    assert names and "identity-elimination" not in names
    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", "-o", tmp_path / "p", "--passes", "-fold-all",
                           capsys=capsys)  # fmt: skip
    assert_one_line_error(code, err, "unknown pass 'fold-all'")
    assert not (tmp_path / "p").exists()


def test_a_refusal_of_a_transformers_model_is_one_line_on_a_fresh_process(tmp_path):
    """Loading a transformers model imports torchao, whose logger warned about its CUDA kernels it cannot load
    ("Failed to load ..._C_mxfp8...so"), two extra stderr lines around a one-line refusal."""
    model = f"{ROOT / 'tests' / 'models' / 'hf_models.py'}:llama_causal_lm"
    argv = [sys.executable, str(ROOT / "cli.py"), "export", model, "-t", "pt2", "-q", "-o", str(tmp_path / "o")]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("kiln: error: text-generation export supports onnx, openvino (a growing KV cache)")
