"""The GPU paths: `aoti` packages compiled for CUDA and TensorRT engines, validated on the GPU.

Every test here needs a CUDA GPU (and a CUDA build of torch); the TensorRT ones also need `tensorrt`.
Without them they are skipped, with the reason; tests/test_gpu_targets.py covers what runs on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from kiln.compiler.capture.dynamic import DynamicBatch
from kiln.compiler.export.loading import verify
from kiln.compiler.export.options import ExportOptions, Shapes
from kiln.compiler.export.pipeline import export_targets

from tests.conftest import ZOO_MODELS
from tests.test_gpu_targets import _eager, _fresh_inputs, run_aoti  # noqa: F401 (run_aoti: the C++ build fixture)

NO_CUDA_REASON = (
    "needs a CUDA GPU: torch.cuda.is_available() is False "
    f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})"
)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)]
needs_tensorrt = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
    reason=NO_CUDA_REASON if not torch.cuda.is_available() else "needs TensorRT: pip install tensorrt",
)


@pytest.fixture(scope="session")
def cuda_exports(tmp_path_factory):
    """Every zoo model exported once to `cuda` (aoti on the GPU), and to `tensorrt` where TensorRT is installed."""
    root = tmp_path_factory.mktemp("cuda")
    targets = "cuda,tensorrt" if importlib.util.find_spec("tensorrt") else "cuda"
    exports = {}
    for name in ZOO_MODELS:
        exports[name] = {r.target: r for r in export_targets(f"zoo:{name}", targets, root / name, ExportOptions())}
    return exports


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_aoti_cuda_package_passes_parity_on_the_gpu(cuda_exports, model):
    result = cuda_exports[model]["aoti"]
    assert result.published and result.parity.passed, result.parity.summary()
    info = result.manifest.target_info
    assert info["device"] == "cuda" and info["gpu"] == torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    assert info["compute_capability"] == f"{major}.{minor}"
    assert result.parity.runtime["device"] == "cuda" and result.parity.runtime["gpu"] == info["gpu"]
    assert result.manifest.runtime_config == {"device": "cuda", "tf32": False}
    metadata = torch._inductor.aoti_load_package(str(result.directory / "model.pt2")).get_metadata()
    assert metadata["AOTI_DEVICE_KEY"] == "cuda"


def test_aoti_cuda_fp16_and_dynamic_batch(tmp_path):
    (fp16,) = export_targets("zoo:cnn", "aoti", tmp_path / "fp16", ExportOptions(precision="fp16", device="cuda"))
    assert fp16.parity.passed and fp16.parity.tolerance.atol == 1e-2, fp16.parity.summary()
    (dynamic,) = export_targets(
        "zoo:transformer", "cuda", tmp_path / "dyn", ExportOptions(shapes=Shapes(DynamicBatch(1, 8)))
    )
    assert dynamic.parity.passed and dynamic.parity.sample_origins[-2:] == ["random batch=1", "random batch=8"]


def test_cpp_example_runs_the_cuda_package(run_aoti, cuda_exports, tmp_path):  # noqa: F811
    inputs = _fresh_inputs("transformer")
    files = []
    for spec, tensor in zip(cuda_exports["transformer"]["aoti"].manifest.inputs, inputs):
        files.append(tmp_path / f"{spec.name}.npy")
        np.save(files[-1], tensor.numpy())
    package = cuda_exports["transformer"]["aoti"].directory / "model.pt2"
    result = subprocess.run([run_aoti, package, tmp_path / "out", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "output_0.npy"), _eager("transformer", inputs)[0], atol=1e-4)


@needs_tensorrt
@pytest.mark.parametrize("model", ZOO_MODELS)
def test_tensorrt_engine_is_built_and_passes_parity_on_the_gpu(cuda_exports, model):
    import tensorrt

    result = cuda_exports[model]["tensorrt"]
    assert result.published and result.parity.passed, result.parity.summary()
    engine = result.manifest.target_info["engine"]
    assert engine["built"] and engine["tensorrt_version"] == tensorrt.__version__
    assert engine["gpu"] == torch.cuda.get_device_name()
    assert result.parity.runtime["runtime"] == f"tensorrt {tensorrt.__version__}"
    files = {f.path for f in result.manifest.files}
    assert {"model.engine", "engine.json", "model.timing.cache", "model.onnx", "build_engine.py"} <= files
    assert json.loads((result.directory / "engine.json").read_text())["onnx_sha256"]


@needs_tensorrt
def test_kit_built_with_build_engine_py_then_verified(cuda_exports, tmp_path):
    kit = tmp_path / "kit"
    shutil.copytree(cuda_exports["lstm"]["tensorrt"].directory, kit)
    for name in ("model.engine", "engine.json", "model.timing.cache"):
        (kit / name).unlink()
    manifest = json.loads((kit / "manifest.json").read_text())
    manifest["files"] = [
        f for f in manifest["files"] if f["path"] not in ("model.engine", "engine.json", "model.timing.cache")
    ]
    (kit / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, kit / "build_engine.py"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("built "), result.stderr
    (verification,) = verify(kit)
    assert verification.report.passed and verification.report.runtime["artifact"] == "model.engine"


@needs_tensorrt
def test_tensorrt_fp16_engine(tmp_path):
    (result,) = export_targets("zoo:mobilenet", "tensorrt", tmp_path / "fp16", ExportOptions(precision="fp16"))
    assert result.parity.passed, result.parity.summary()
    assert result.manifest.target_info["engine"]["precision"] == "fp16"
