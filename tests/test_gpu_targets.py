"""The GPU targets as far as this machine allows: `aoti --device cpu` packages (Python and C++) and TensorRT kits.

What needs a CUDA GPU (aoti on cuda, TensorRT engines) is in tests/test_gpu.py, skipped without one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from kiln import load
from kiln.compiler.capture.dynamic import DynamicBatch
from kiln.compiler.capture.zoo import ZOO
from kiln.compiler.export.options import ExportOptions, Shapes
from kiln.compiler.export.pipeline import export_targets
from kiln.targets.compile_cache import CACHE_ENV, CompileCache

from tests.conftest import ROOT, ZOO_MODELS, run_cli

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks the errors of a machine without a CUDA GPU")


@pytest.fixture(scope="session")
def gpu_kit_exports(tmp_path_factory):
    """Every zoo model exported once to `aoti --device cpu` and `tensorrt` (one capture): model -> target -> result."""
    root = tmp_path_factory.mktemp("gpu-targets")
    exports = {}
    for name in ZOO_MODELS:
        results = export_targets(f"zoo:{name}", "aoti,tensorrt", root / name, ExportOptions(device="cpu"))
        exports[name] = {r.target: r for r in results}
    return exports


@pytest.fixture(scope="session")
def reduced_precision_exports(tmp_path_factory):
    """cnn in bf16 with a dynamic batch 1..8 (aoti, cpu); transformer in fp16 (a tensorrt kit)."""
    root = tmp_path_factory.mktemp("gpu-reduced")
    (cnn,) = export_targets(
        "zoo:cnn", "aoti", root / "cnn", ExportOptions("bf16", "cpu", shapes=Shapes(DynamicBatch(1, 8)))
    )
    (transformer,) = export_targets("zoo:transformer", "tensorrt", root / "tf", ExportOptions("fp16"))
    return {"cnn-bf16": cnn, "transformer-fp16-tensorrt": transformer}


def _eager(model: str, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    module, _ = ZOO[model]()
    with torch.no_grad():
        return [t.numpy() for t in torch.utils._pytree.tree_leaves(module(*inputs))]


def _fresh_inputs(model: str, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs the exports never saw: new values of the example's dtypes (token ids and masks kept valid)."""
    _, example = ZOO[model]()
    generator = torch.Generator().manual_seed(123)
    fresh = []
    for tensor in example:
        if batch is not None:
            tensor = tensor[torch.arange(batch) % tensor.shape[0]]
        if tensor.is_floating_point():
            fresh.append(torch.randn(tensor.shape, generator=generator))
        elif tensor.max() > 1:
            fresh.append(torch.randint(0, int(tensor.max()) + 1, tensor.shape, generator=generator))
        else:
            fresh.append(tensor.clone())
    return tuple(fresh)


# ---------------------------------------------------------------------------------------------- aoti, CPU


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_aoti_cpu_package_passes_parity(gpu_kit_exports, model):
    result = gpu_kit_exports[model]["aoti"]
    assert result.published and result.parity.passed, result.parity.summary()
    assert max(o.max_abs_error for o in result.parity.outputs) < 1e-4
    manifest = result.manifest
    assert manifest.runtime_config == {"device": "cpu"}
    assert manifest.target_info["device"] == "cpu" and manifest.target_info["compile_cache"]["hit"] is False
    assert manifest.parity.runtime["runtime"].startswith("torch 2.13") and manifest.parity.runtime["device"] == "cpu"
    assert {f.path for f in manifest.files} >= {"model.pt2", "parity/inputs.npz"}
    inputs = _fresh_inputs(model)
    outputs = load(result.directory)(*inputs)
    for name, expected in zip(outputs, _eager(model, inputs)):
        np.testing.assert_allclose(outputs[name], expected, atol=1e-4, rtol=1e-3)


def test_aoti_reexport_comes_from_the_cache_and_is_still_validated(gpu_kit_exports, tmp_path):
    first = gpu_kit_exports["cnn"]["aoti"]
    (again,) = export_targets("zoo:cnn", "cuda", tmp_path / "again", ExportOptions(device="cpu"))
    cache = again.manifest.target_info["compile_cache"]
    assert cache["hit"] is True and cache["key"] == first.manifest.target_info["compile_cache"]["key"]
    assert again.parity.passed and again.parity.samples == first.parity.samples
    assert again.manifest.timings["build aoti"] < 5 < first.manifest.timings["build aoti"]
    assert (again.directory / "model.pt2").read_bytes() == (first.directory / "model.pt2").read_bytes()
    assert any("compile cache" in note for note in again.manifest.notes)
    assert str(CompileCache("aoti").directory).startswith(os.environ[CACHE_ENV])


def test_aoti_cache_key_follows_the_weights():
    from kiln.targets.aoti import _program_hash

    def program(seed: int) -> torch.export.ExportedProgram:
        module, inputs = ZOO["cnn"]()
        if seed:
            torch.manual_seed(seed)
            module.head.reset_parameters()
        return torch.export.export(module, inputs, strict=False)

    assert _program_hash(program(0)) == _program_hash(program(0))
    assert _program_hash(program(0)) != _program_hash(program(7))


def test_aoti_bf16_with_dynamic_batch(reduced_precision_exports, gpu_kit_exports):
    result = reduced_precision_exports["cnn-bf16"]
    assert result.published and result.parity.passed, result.parity.summary()
    assert result.parity.tolerance.atol == 5e-2
    assert result.parity.sample_origins[-2:] == ["random batch=1", "random batch=8"]
    assert result.manifest.inputs[0].shape[0] == "batch" and result.manifest.inputs[0].dtype == "float32"
    # bf16 rounding shows: well above the fp32 package's error
    fp32_error = gpu_kit_exports["cnn"]["aoti"].parity.outputs[0].max_abs_error
    assert result.parity.outputs[0].max_abs_error > 100 * fp32_error
    inputs = _fresh_inputs("cnn", batch=3)
    (got,) = load(result.directory)(*inputs).values()
    np.testing.assert_allclose(got, _eager("cnn", inputs)[0], atol=5e-2, rtol=5e-2)


@needs_no_cuda
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "cuda"], "compiles for a CUDA GPU by default, but there is no CUDA"),
        (["-t", "aoti", "--device", "cuda"], "--device cuda: no CUDA"),
    ],
)
def test_cuda_without_a_gpu_is_one_line_before_any_work(argv, expected, tmp_path, capsys):
    from tests.test_cli_errors import assert_one_line_error

    code, _, err = run_cli("export", "zoo:cnn", *argv, "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, expected, exit_code=3)
    assert "--device cpu" in err and "[kiln] capture" not in err
    assert list(tmp_path.iterdir()) == []


def test_device_for_targets_that_take_none(tmp_path, capsys):
    from tests.test_cli_errors import assert_one_line_error

    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", "--device", "cpu", "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(code, err, "--device cpu applies to none of the targets onnx")


@needs_no_cuda
def test_verify_of_a_cuda_package_without_a_gpu(gpu_kit_exports, tmp_path, capsys):
    from tests.test_cli_errors import assert_one_line_error

    copy = tmp_path / "cuda-package"
    shutil.copytree(gpu_kit_exports["lstm"]["aoti"].directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runtime_config"]["device"] = "cuda"
    manifest["target_info"].update(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli("verify", copy, capsys=capsys)
    assert_one_line_error(code, err, "compiled for NVIDIA H100 80GB HBM3 (compute capability 9.0)", exit_code=3)


# ------------------------------------------------------------------------------------------- C++ example


@pytest.fixture(scope="session")
def run_aoti(tmp_path_factory):
    """examples/cpp built once with CMake against the libtorch of the installed torch wheel."""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the C++ example needs {' and '.join(missing)} (apt-get install cmake g++)")
    build = tmp_path_factory.mktemp("cpp-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", ROOT / "examples" / "cpp", "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release"]
    steps = [[*configure, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], ["cmake", "--build", build]]
    for step in steps:
        result = subprocess.run([str(a) for a in step], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return build / "run_aoti"


@pytest.mark.parametrize("model", ["cnn", "lstm", "transformer"])
def test_cpp_example_matches_pytorch(run_aoti, gpu_kit_exports, model, tmp_path):
    inputs = _fresh_inputs(model)
    files = []
    for spec, tensor in zip(gpu_kit_exports[model]["aoti"].manifest.inputs, inputs):
        files.append(tmp_path / f"{spec.name}.npy")
        np.save(files[-1], tensor.numpy())
    package = gpu_kit_exports[model]["aoti"].directory / "model.pt2"
    result = subprocess.run([run_aoti, package, tmp_path / "out", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = _eager(model, inputs)
    for i, want in enumerate(expected):
        got = np.load(tmp_path / "out" / f"output_{i}.npy")
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert not (tmp_path / "out" / f"output_{len(expected)}.npy").exists()


def test_cpp_example_refuses_wrong_inputs(run_aoti, gpu_kit_exports, tmp_path):
    package = gpu_kit_exports["cnn"]["aoti"].directory / "model.pt2"
    np.save(tmp_path / "ids.npy", np.zeros((2, 16), dtype=np.int64))
    result = subprocess.run([run_aoti, package, tmp_path / "out", tmp_path / "ids.npy"], capture_output=True, text=True)
    assert result.returncode == 1 and "run_aoti: error: " in result.stderr and "dtype" in result.stderr
    np.save(tmp_path / "image.npy", np.zeros((1, 3, 32, 32), dtype=np.float32))
    image = tmp_path / "image.npy"
    result = subprocess.run([run_aoti, package, tmp_path / "out", image, image], capture_output=True, text=True)
    assert result.returncode == 1 and "expected inputs vector size to be 1, but got 2" in result.stderr


# ---------------------------------------------------------------------------------------------- tensorrt


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_tensorrt_kit_is_complete_and_its_onnx_passes_parity(gpu_kit_exports, model):
    import onnx

    result = gpu_kit_exports[model]["tensorrt"]
    assert result.published and result.parity.passed, result.parity.summary()
    assert max(o.max_abs_error for o in result.parity.outputs) < 1e-4
    directory = result.directory
    assert {f.path for f in result.manifest.files} >= {"model.onnx", "profiles.json", "build_engine.py"}
    onnx.checker.check_model(str(directory / "model.onnx"))
    kit = json.loads((directory / "profiles.json").read_text())
    assert kit["precision"] == "fp32" and kit["tf32"] is False
    assert list(kit["inputs"]) == [s.name for s in result.manifest.inputs]
    for spec in result.manifest.inputs:
        shapes = kit["inputs"][spec.name]
        assert not shapes["dynamic"] and shapes["min"] == shapes["opt"] == shapes["max"] == list(spec.shape)
    info = result.manifest.target_info
    assert info["onnx"]["custom_domain_ops"] == [] and info["onnx"]["opset"] >= 18
    if NO_CUDA:
        assert info["engine"]["built"] is False and "CUDA GPU" in info["engine"]["why"]
        assert result.parity.runtime["artifact"] == "model.onnx (engine not built here)"
        assert any(n.startswith("the engine must be built on the GPU machine") for n in result.manifest.notes)
        assert not (directory / "model.engine").exists()


def test_tensorrt_kit_with_a_dynamic_batch_and_fp16(reduced_precision_exports, tmp_path):
    import onnx

    (result,) = export_targets(
        "zoo:transformer", "trt", tmp_path / "dyn", ExportOptions(shapes=Shapes(DynamicBatch(1, 8)))
    )
    assert result.parity.passed and result.parity.sample_origins[-2:] == ["random batch=1", "random batch=8"]
    kit = json.loads((result.directory / "profiles.json").read_text())
    expected = {"dtype": "int64", "dynamic": True, "min": [1, 16], "opt": [8, 16], "max": [8, 16]}
    assert kit["inputs"]["input_ids"] == expected and kit["inputs"]["attention_mask"] == expected
    trtexec = subprocess.run(
        [sys.executable, result.directory / "build_engine.py", "--print-trtexec"], capture_output=True, text=True
    )
    assert trtexec.returncode == 0
    assert trtexec.stdout.strip() == (
        "trtexec --onnx=model.onnx --saveEngine=model.engine --timingCacheFile=model.timing.cache --stronglyTyped "
        "--noTF32 --minShapes=input_ids:1x16,attention_mask:1x16 --optShapes=input_ids:8x16,attention_mask:8x16 "
        "--maxShapes=input_ids:8x16,attention_mask:8x16"
    )
    fp16 = reduced_precision_exports["transformer-fp16-tensorrt"]
    assert fp16.parity.passed and fp16.parity.tolerance.atol == 1e-2
    proto = onnx.load(str(fp16.directory / "model.onnx"))
    weights = {np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).name for t in proto.graph.initializer}
    assert "float16" in weights and "float32" not in weights  # the graph itself computes in fp16
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert json.loads((fp16.directory / "profiles.json").read_text())["precision"] == "fp16"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the message without TensorRT")
def test_build_engine_without_tensorrt_says_so(gpu_kit_exports):
    script = gpu_kit_exports["cnn"]["tensorrt"].directory / "build_engine.py"
    result = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert result.returncode == 3
    assert result.stderr.strip() == "build_engine: error: TensorRT is not importable (No module named 'tensorrt'): " + (
        "pip install tensorrt"
    )
    assert not (script.parent / "model.engine").exists()


def _foreign_engine_kit(source, kit) -> None:
    """A copy of a kit with what a build on another machine leaves: model.engine and its engine.json."""
    shutil.copytree(source, kit)
    (kit / "model.engine").write_bytes(b"ftrt" + bytes(64))
    record = {"tensorrt_version": "8.6.1", "gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}
    (kit / "engine.json").write_text(json.dumps(record))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks a machine without TensorRT")
def test_verify_of_an_engine_without_tensorrt_here(gpu_kit_exports, tmp_path, capsys):
    from tests.test_cli_errors import assert_one_line_error

    _foreign_engine_kit(gpu_kit_exports["mobilenet"]["tensorrt"].directory, tmp_path / "kit")
    code, _, err = run_cli("verify", tmp_path / "kit", capsys=capsys)
    expected = "model.engine was built with TensorRT 8.6.1 for NVIDIA A100-SXM4-40GB (compute capability 8.0); "
    assert_one_line_error(code, err, expected + "this machine has no TensorRT", exit_code=3)
    assert "pip install tensorrt==8.6.1" in err


def test_verify_of_an_engine_from_another_tensorrt_version(gpu_kit_exports, tmp_path, capsys, monkeypatch):
    from tests.test_cli_errors import assert_one_line_error

    _foreign_engine_kit(gpu_kit_exports["mobilenet"]["tensorrt"].directory, tmp_path / "kit")
    if importlib.util.find_spec("tensorrt") is None:
        # This machine has no TensorRT: stand in an importable one of another version (all the check reads).
        installed = types.ModuleType("tensorrt")
        installed.__spec__ = importlib.util.spec_from_loader("tensorrt", loader=None)
        installed.__version__ = "10.3.0"  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "tensorrt", installed)
    version = importlib.import_module("tensorrt").__version__
    code, _, err = run_cli("verify", tmp_path / "kit", capsys=capsys)
    expected = f"this machine has TensorRT {version}, and an engine runs only with the TensorRT version that built it"
    assert_one_line_error(code, err, expected, exit_code=3)
    assert "rebuild it on this machine with `python build_engine.py`" in err


def test_verify_of_an_engine_without_its_record(gpu_kit_exports, tmp_path, capsys):
    from tests.test_cli_errors import assert_one_line_error

    kit = tmp_path / "kit"
    shutil.copytree(gpu_kit_exports["cnn"]["tensorrt"].directory, kit)
    (kit / "model.engine").write_bytes(b"ftrt" + bytes(64))
    code, _, err = run_cli("verify", kit, capsys=capsys)
    assert_one_line_error(code, err, "model.engine has no readable engine.json")


def test_verify_of_a_kit_without_engine_validates_its_onnx(gpu_kit_exports, capsys):
    code, out, _ = run_cli("verify", gpu_kit_exports["lstm"]["tensorrt"].directory, capsys=capsys)
    assert code == 0 and "PASSED against stored reference" in out


# ---------------------------------------------------------------------------------------------- listing


def test_targets_say_exactly_what_is_missing(capsys):
    code, out, _ = run_cli("targets", "--json", capsys=capsys)
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0
    assert rows["aoti"]["aliases"][0] == "cuda" and rows["aoti"]["devices"] == ["cuda", "cpu"]
    assert rows["tensorrt"]["precisions"] == ["fp32", "fp16"] and rows["tensorrt"]["available"] is True
    if NO_CUDA:
        assert rows["aoti"]["limited_here"].startswith("--device cpu only (no CUDA")
        trt = rows["tensorrt"]["limited_here"]
        assert trt.startswith("build kit only, engine not built here: needs ") and "CUDA GPU" in trt
        tensorrt_missing = importlib.util.find_spec("tensorrt") is None
        assert ("tensorrt (pip install tensorrt)" in trt) == tensorrt_missing


def test_all_leaves_out_targets_limited_here():
    from kiln.targets import resolve_targets

    chosen = {t.name for t in resolve_targets("all")}
    assert ("aoti" in chosen) == (not NO_CUDA)
    assert {"onnx", "openvino", "pt2"} <= chosen
