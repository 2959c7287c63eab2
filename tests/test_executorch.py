"""`--target executorch`: `.pte` programs lowered to XNNPACK, each checked in ExecuTorch's own runtime outside Kiln
against the PyTorch model; fp16 and int8 (PT2E, the per-layer report, --max-drop); dynamic dims; an op without a
kernel refused; verify, run, bench and a forged manifest; the C++ runner (examples/executorch_cpp)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="the executorch target needs executorch (pip install .[executorch])")

from kiln.compiler.capture.inputs import random_like
from kiln.compiler.capture.sources import from_module, load_source
from kiln.compiler.export.options import export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.export.result import ExportResult
from kiln.compiler.parity.gate import INPUTS_FILE, REFERENCE_FILE
from kiln.compiler.quantization.calibration import CalibrationData, CalibrationSpec
from kiln.compiler.types import MANIFEST_NAME

from tests.conftest import ROOT, run_cli
from tests.models.fragile import FRAGILE_MODULE, fragile_cnn

HF = ROOT / "tests" / "models" / "hf_models.py"
# CNN, LSTM, U-Net and detector shapes from the zoo, and two transformers architectures from small configs
MODELS = {
    "cnn": "zoo:cnn",
    "lstm": "zoo:lstm",
    "unet": "zoo:unet",
    "detector": "zoo:detector",
    "convnext": f"{HF}:convnext",
    "distilbert": f"{HF}:distilbert",
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """Each model of MODELS exported once to executorch at fp32: name -> result."""
    root = tmp_path_factory.mktemp("executorch")
    return {
        name: export_targets(source, "executorch", root / name, export_options())[0] for name, source in MODELS.items()
    }


def _execute(pte: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """`pte` run by ExecuTorch's own Python runtime, nothing of Kiln in between."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(pte).load_method("forward")
    return [t.numpy() for t in method.execute([torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_models_not_written_for_the_tests_match_pytorch_in_executorchs_own_runtime(exports, name):
    result = exports[name]
    assert result.published and result.parity.passed, result.parity.summary()
    source = load_source(MODELS[name])
    rng = np.random.default_rng(7)  # inputs the gate did not use
    inputs = [random_like(t.numpy(), None, rng) for t in source.example_inputs]
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(source.module(*[torch.from_numpy(a) for a in inputs]))
    got = _execute(result.directory / "model.pte", inputs)
    assert len(got) == len(expected) == len(result.manifest.outputs)
    for have, want in zip(got, expected):
        assert have.shape == tuple(want.shape) and have.dtype == want.numpy().dtype
        np.testing.assert_allclose(have, want.numpy(), atol=1e-4, rtol=1e-3)
    placed = result.manifest.target_info["delegation"]
    assert placed["delegated_ops"] == sum(placed["xnnpack"].values()) > 0
    assert placed["portable_ops"] == sum(placed["portable"].values())


def test_the_manifest_says_what_xnnpack_runs_and_what_it_does_not(exports):
    cnn = exports["cnn"].manifest
    placed = cnn.target_info["delegation"]
    assert placed["xnnpack"]["aten.convolution.default"] == 4 and placed["portable"] == {"aten.mean.dim": 1}
    assert any(
        note.startswith("1 of 12 ops not delegated to XNNPACK") and "aten.mean.dim (1)" in note for note in cnn.notes
    )
    assert exports["unet"].manifest.target_info["delegation"]["portable"] == {}
    runtime = cnn.parity.runtime  # type: ignore[union-attr]
    assert runtime["threads"] == 2 and "XnnpackBackend" in runtime["backends"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, exports) -> dict[str, ExportResult]:
    """zoo:cnn at int8 (calibrated on an .npz of images) and at fp16."""
    root = tmp_path_factory.mktemp("executorch-q")
    calib = root / "images.npz"
    np.savez(calib, image=np.random.default_rng(1).standard_normal((48, 3, 32, 32)).astype(np.float32))
    int8 = export_options(precision="int8", calib=calib, calib_samples=32)
    return {
        "int8": export_targets("zoo:cnn", "executorch", root / "int8", int8)[0],
        "fp16": export_targets("zoo:cnn", "executorch", root / "fp16", export_options(precision="fp16"))[0],
    }


def test_int8_is_delegated_whole_with_its_report(quantized, exports, capsys):
    result = quantized["int8"]
    assert result.published and result.parity.passed, result.parity.summary()
    info = result.manifest.target_info
    assert info["quantization"]["quantized"] == 5 and info["quantization"]["kept_float"] == []
    assert info["quantization"]["calibration"]["held_back_rows"] == 16  # the gate judged on rows not calibrated on
    assert not any("quantize" in op for op in info["delegation"]["portable"])  # every Q/DQ inside XNNPACK
    assert info["model_bytes"] * 3 < exports["cnn"].manifest.target_info["model_bytes"]
    assert "quantize-int8" in [p.name for p in result.manifest.passes]
    code, out, _ = run_cli("quant-report", result.directory, "--json", capsys=capsys)
    report = json.loads(out)[0]
    assert code == 0 and report["summary"]["quantized_layers"] == 5
    assert {layer["module"] for layer in report["layers"]} == {
        "stem.conv",
        "stage1.conv",
        "down.conv",
        "stage2.conv",
        "head",
    }


def test_fp16_computes_in_fp16_inside_xnnpack(quantized, exports):
    result = quantized["fp16"]
    assert result.published and result.parity.passed, result.parity.summary()
    info = result.manifest.target_info
    assert info["delegation"]["xnnpack"]["aten.convolution.default"] == 4
    # it computes in fp16: errors of fp16's size, where the fp32 program's are float32 round-off
    fp16_error = max(o.max_abs_error for o in result.parity.outputs)
    assert fp16_error > 100 * max(o.max_abs_error for o in exports["cnn"].parity.outputs)
    assert result.manifest.inputs[0].dtype == result.manifest.outputs[0].dtype == "float32"  # fp32 I/O kept


def test_the_report_ranks_the_layer_int8_ruins_first(tmp_path):
    """PT2E's per-layer report on the fragile CNN (features.2 weighs a dead channel by 200): its local error is the
    worst, though layers after it have a worse total error."""
    from kiln.compiler.capture.program import capture
    from kiln.compiler.quantization.pt2e import pt2e_report, quantize_pt2e

    module, example = fragile_cnn()
    captured = capture(from_module(module, example), None, tmp_path, to_onnx=False)
    rows = np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32)
    calibration = CalibrationData({"image": rows}, "test rows", True, CalibrationSpec())
    _, converted, summary = quantize_pt2e(captured.exported, calibration, captured.inputs, None)
    assert summary.quantized == 4 and summary.method == "minmax"
    report = pt2e_report(captured.exported, converted, calibration.batches(captured.inputs), captured.inputs)
    assert report.layers[0].module == FRAGILE_MODULE and report.layers[0].module_class == "Conv2d"
    assert report.layers[0].local_snr_db < 20 < min(layer.local_snr_db for layer in report.layers[1:])


@pytest.mark.slow
def test_max_drop_keeps_the_fragile_layer_in_float(tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32))
    model = tmp_path / "fragile_model.py"
    model.write_text("from tests.models.fragile import fragile_cnn\n\ndef build():\n    return fragile_cnn()\n")
    out = tmp_path / "out"
    args = ["export", f"{model}:build", "-t", "executorch", "--precision", "int8", "--calib", calib, "-o", out]
    code, _, err = run_cli(*args, "--max-drop", "0.02", capsys=capsys)
    assert code == 0, err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    aware = manifest["target_info"]["quantization"]["accuracy_aware"]
    assert aware["drop"] <= 0.02 < aware["drop_before"] and aware["reverted_modules"] == [f"{FRAGILE_MODULE} (Conv2d)"]
    assert manifest["target_info"]["quantization"]["kept_float"] == aware["reverted"]
    assert json.loads((out / "quant_report.json").read_text())["summary"]["reverted"] == aware["reverted_modules"]


def test_a_dynamic_batch_keeps_its_range(tmp_path):
    (result,) = export_targets("zoo:cnn", "executorch", tmp_path / "o", export_options(dynamic_batch="1:8"))
    assert result.published and result.parity.passed
    with np.load(result.directory / INPUTS_FILE) as stored:
        assert {stored[key].shape[0] for key in stored.files} >= {1, 8}  # judged at both ends of the range
    assert result.manifest.inputs[0].shape[0] == "batch"
    batch = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
    assert _execute(result.directory / "model.pte", [batch])[0].shape == (5, 10)


def test_an_op_without_a_kernel_is_refused_by_name(tmp_path, capsys):
    """XNNPACK does not take `torch.sort`, and the runtime has no `aten::sort.values` kernel: a .pte that would not
    load is refused at build, naming the op and the module."""
    model = tmp_path / "sorter.py"
    model.write_text(
        "import torch\n\nclass Sorter(torch.nn.Module):\n    def forward(self, x):\n"
        "        return torch.sort(x * 2).values\n\ndef build():\n    return Sorter(), (torch.randn(2, 16),)\n"
    )
    code, _, err = run_cli("export", f"{model}:build", "-t", "executorch", "-o", tmp_path / "o", "-q", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ExecuTorch has no kernel for aten::sort.values in <root> (Sorter)" in err


def test_verify_run_and_bench(exports, tmp_path, capsys):
    directory = exports["lstm"].directory
    assert run_cli("verify", directory, capsys=capsys)[0] == 0
    with np.load(directory / INPUTS_FILE) as stored:
        frames = stored["1/frames"]
    np.savez(tmp_path / "in.npz", frames=frames)
    code, _, err = run_cli(
        "run", directory, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz", capsys=capsys
    )
    assert code == 0, err
    with np.load(tmp_path / "o.npz") as got, np.load(directory / REFERENCE_FILE) as reference:
        for spec in exports["lstm"].manifest.outputs:
            np.testing.assert_allclose(got[spec.name], reference[f"1/{spec.name}"], atol=1e-5)
    code, out, err = run_cli(
        "bench", directory, "--rounds", "2", "--runs", "3", "--warmup", "1", "--no-write", "--json", capsys=capsys
    )
    timed = json.loads(out)
    assert code == 0, err
    (candidate,) = timed["candidates"]
    assert candidate["target"] == "executorch" and candidate["runtime_info"]["threads"] == 2


def test_a_forged_thread_count_is_a_one_line_error(exports, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(exports["cnn"].directory, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["runtime_config"]["threads"] = "all of them"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = run_cli("verify", copy, "-q", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "runtime_config.threads" in err


def test_a_forged_program_is_refused_not_a_crash(exports, tmp_path):
    """A `.pte` of foreign bytes, with a manifest that lists its hash: the runtime's own check would log the bytes and
    abort the process; Kiln refuses it in one line first (run in a child: an abort would take pytest down)."""
    import sys

    from kiln.compiler.export.artifacts import hash_files
    from kiln.compiler.types import Manifest

    copy = tmp_path / "forged"
    shutil.copytree(exports["cnn"].directory, copy)
    (copy / "model.pte").write_bytes(np.random.default_rng(5).bytes(5000))
    manifest = Manifest.read(copy)
    manifest.files = hash_files(copy)
    manifest.write(copy)
    verify = [sys.executable, "cli.py", "verify", str(copy), "-q"]
    done = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-500:]
    assert "is not an ExecuTorch program (no ET12 identifier in its header)" in done.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run_pte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/executorch_cpp built once with CMake against the C++ runtime inside the executorch wheel."""
    import executorch

    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the C++ example needs {' and '.join(missing)} (apt-get install cmake g++)")
    build = tmp_path_factory.mktemp("pte-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    package = f"-DCMAKE_PREFIX_PATH={next(iter(executorch.__path__))}"
    configure = ["cmake", "-S", ROOT / "examples" / "executorch_cpp", "-B", build, *generator, package]
    for step in ([*configure, "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", build]):
        done = subprocess.run([str(a) for a in step], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / "run_pte"


@pytest.mark.parametrize("name", ["cnn", "lstm", "distilbert"])
def test_cpp_runner_matches_the_stored_reference(run_pte, exports, quantized, name, tmp_path):
    result = quantized["int8"] if name == "cnn" else exports[name]  # int8 too: the quantized kernels link
    files = []
    with np.load(result.directory / INPUTS_FILE) as stored:
        for spec in result.manifest.inputs:
            files.append(tmp_path / f"{spec.name}.npy")
            np.save(files[-1], stored[f"2/{spec.name}"])
    done = subprocess.run([run_pte, result.directory / "model.pte", tmp_path / "out", *files], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    with np.load(result.directory / REFERENCE_FILE) as reference:
        for index, spec in enumerate(result.manifest.outputs):
            got, want = np.load(tmp_path / "out" / f"output_{index}.npy"), reference[f"2/{spec.name}"]
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=0.1 if name == "cnn" else 1e-4, rtol=1e-3)
    assert not (tmp_path / "out" / f"output_{len(result.manifest.outputs)}.npy").exists()


def test_cpp_runner_refuses_wrong_inputs(run_pte, exports, tmp_path):
    pte = exports["cnn"].directory / "model.pte"
    np.save(tmp_path / "ids.npy", np.zeros((1, 3, 32, 32), dtype=np.int64))
    done = subprocess.run([run_pte, pte, tmp_path / "o", tmp_path / "ids.npy"], capture_output=True, text=True)
    assert (
        done.returncode == 1
        and "run_pte: error: " in done.stderr
        and "dtype i8, the program expects Float" in done.stderr
    )
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((1, 3, 32, 32), dtype=np.float32))
    done = subprocess.run([run_pte, pte, tmp_path / "o", image, image], capture_output=True, text=True)
    assert done.returncode == 1 and "the program takes 1 inputs, 2 given" in done.stderr


def test_accuracy_budget_applies_to_executorch_int8_only():
    from kiln.compiler.errors import UsageError
    from kiln.compiler.export.selection import select_targets
    from kiln.compiler.progress import Progress

    options = export_options(precision="fp16", max_drop=0.01)
    with pytest.raises(UsageError, match="--max-drop does not apply to target executorch at precision fp16"):
        select_targets("executorch", options, Progress(quiet=True))


def test_every_target_includes_executorch():
    from kiln.targets import get_target, resolve_targets

    target = get_target("et")
    assert target.name == "executorch" and target in resolve_targets("all")
    assert target.kv_cache == "static" and target.consumes == "torch" and target.accuracy_aware
    from kiln.compiler.perf.tune import default_targets

    assert target.tuned_by_default and "executorch" in default_targets()  # kiln tune times it without --targets


@pytest.mark.slow
def test_static_cache_generation_gives_transformers_tokens(tmp_path, capsys):
    """A causal LM exported for text generation (the static-cache decode step): the gate's 32 tokens, then `kiln run
    --generate` on a prompt the gate did not use, against transformers' own `generate`."""
    pytest.importorskip("transformers", reason="this test builds a model with transformers")
    from kiln.compiler.generation.gate import PARITY_PROMPT

    from tests.models.hf_models import llama_causal_lm

    (result,) = export_targets(f"{HF}:llama_causal_lm", "executorch", tmp_path / "llama", export_options())
    generation = result.parity.generation
    assert result.published and generation["identical"] and generation["logits_within_tolerance"]
    assert {s.name: s.shape for s in result.manifest.inputs}["input_ids"] == (1, 1)
    prompt = [7, 3, 11, 2, 9]
    assert prompt != PARITY_PROMPT[: len(prompt)]
    ids = ",".join(map(str, prompt))
    code, out, err = run_cli("run", result.directory, "--generate", ids, "--max-new-tokens", "12", capsys=capsys)
    model, _ = llama_causal_lm()
    with torch.no_grad():
        tokens = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert code == 0, err
    assert out.strip() == ",".join(str(t) for t in tokens[0, len(prompt) :].tolist())


@pytest.mark.slow
def test_fp16_overflow_is_localized_through_the_same_lowering(tmp_path):
    """fp16 on ExecuTorch: `up` scales activations past 65504 (inf). The prefix programs go through the same lowering
    and runtime: `up` is measured infinite, and the first divergence is `up` or, where XNNPACK's fp16 convolutions
    drift out of fp16's element tolerance first (this AVX-512 CPU: `body.5.conv`, cosine still 0.999998), a module
    before it, with its input matching."""
    import io
    import math

    from kiln.compiler.progress import Progress

    from tests.models.planted import overflow

    module, inputs = overflow()
    said = io.StringIO()
    options = export_options(precision="fp16")
    (result,) = export_targets(module, "executorch", tmp_path / "o", options, inputs, Progress(stream=said))
    record = result.parity.divergence
    assert not result.parity.passed and record is not None, said.getvalue()
    measured = {m["module"]: m for m in record["measured"]}
    assert not measured["up"]["passed"] and float(measured["up"]["max_abs"]) == math.inf
    first = record["first"]
    assert first["index"] <= measured["up"]["index"] and record["inputs"]["passed"]
    assert first["module"] == "up" or first["cosine"] > 0.9999, first
    assert record["builds"] <= math.ceil(math.log2(record["boundaries"])) + 2
    assert said.getvalue().count("localize executorch build") == record["builds"]


@pytest.mark.slow
def test_tune_times_executorch_as_a_candidate(tmp_path, capsys):
    out = tmp_path / "tune"
    args = [
        "--targets",
        "executorch,onnx",
        "--precisions",
        "fp32",
        "--rounds",
        "2",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--confirm-budget",
        "5",
    ]
    code, _, err = run_cli("tune", "zoo:cnn", "--out", out, *args, "--io", "nchw", "--no-plain", "-q", capsys=capsys)
    assert code == 0, err
    board = json.loads((out / "leaderboard.json").read_text())
    timed = {r["name"]: r for r in board["candidates"]}
    assert "executorch fp32" in timed and timed["executorch fp32"]["p50_ms"] > 0
    assert board["winner"]["name"] in timed
    assert run_cli("verify", out / "best", "-q", capsys=capsys)[0] == 0
