"""Memory: peak RSS in the manifest, memory-mapped weights let go between steps (compiler/memory.py), and how an
export's peak memory grows with the weights (measured on child processes, `os.wait4`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kiln.compiler.memory import current_rss, peak_rss, release_pages
from kiln.compiler.safetensors_file import write_safetensors

from tests.conftest import ROOT, run_cli
from tests.models import sized

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self")


def _mapped(path: Path, count: int) -> torch.Tensor:
    """A float32 tensor of `count` elements memory-mapped from `path` (private, as safetensors maps weights)."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=count * 4)
    return torch.tensor([], dtype=torch.float32).set_(storage)


@linux_only
def test_released_pages_come_back_unchanged_and_a_written_mapping_is_kept(tmp_path):
    count = 16 * 2**20  # 64 MiB
    path = tmp_path / "w.bin"
    torch.arange(count, dtype=torch.float32).numpy().tofile(path)
    weights = _mapped(path, count)
    total = float(weights.sum())  # every page read: resident
    before = current_rss()
    assert release_pages(addresses=[weights.data_ptr()]) >= count * 4
    assert before - current_rss() > 48 * 2**20  # the pages left this process's resident set
    assert float(weights.sum()) == total  # and come back from the file, unchanged
    weights[5] = -1.0  # a page now differs from the file: releasing it would undo the write
    assert release_pages(addresses=[weights.data_ptr()]) == 0
    assert float(weights[5]) == -1.0
    anonymous = torch.ones(count)  # not a file mapping: never released
    assert release_pages(addresses=[anonymous.data_ptr()]) == 0 and float(anonymous.sum()) == count


def test_safetensors_written_tensor_by_tensor_read_back(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.tensor(2.5),
        "d": torch.randn(4, 6).t(),  # not contiguous
        "e": torch.ones(2, dtype=torch.bfloat16),
        "f": torch.tensor([True, False]),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors.items(), {"format": "pt"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_manifest_and_json_report_peak_rss(tmp_path, capsys):
    code, printed, err = run_cli("export", "zoo:cnn", "-t", "onnx", "--out", tmp_path / "o", "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(printed)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    host = manifest["host"]
    assert 50 * 2**20 < host["peak_rss"] <= report["peak_rss"] <= peak_rss()
    assert report["results"][0]["peak_rss"] == host["peak_rss"]
    stages = host["peak_rss_by_stage"]
    assert {"load", "capture", "reference", "build onnx", "validate onnx"} <= set(stages)
    assert 0 < stages["load"] <= stages["validate onnx"] <= host["peak_rss"]  # the high-water mark then


def _export_peak(factory: str, target: str, out: Path) -> int:
    """The peak RSS in bytes of `kiln export tests/models/sized.py:FACTORY -t TARGET` run as a child process."""
    command = [sys.executable, str(ROOT / "cli.py"), "export", f"{ROOT}/tests/models/sized.py:{factory}"]
    child = subprocess.Popen([*command, "-t", target, "--out", str(out), "-q"], stderr=subprocess.PIPE)
    assert child.stderr is not None
    error = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, error.decode()[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
@linux_only
def test_tpu_build_memory_grows_at_most_three_times_the_weights(tmp_path):
    """A BERT-base was killed at 24 GB while the weights (0.44 GB) were inlined as constants in the StableHLO text;
    now each further byte of weights costs at most about 3 bytes of peak memory (the model, the SavedModel's
    variables, the copy the parity run loads)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("litert_torch")
    small = _export_peak("bert_small", "tpu", tmp_path / "small")
    large = _export_peak("bert_large", "tpu", tmp_path / "large")
    weights = sized.weight_bytes(sized.bert_large()[0]) - sized.weight_bytes(sized.bert_small()[0])
    growth = (large - small) / weights
    assert growth <= 3.0, f"peak {small / 2**30:.2f} -> {large / 2**30:.2f} GiB: {growth:.2f}x the weights' growth"


def test_large_onnx_is_saved_with_its_unchanged_weights_linked(tmp_path, monkeypatch):
    """Above EXTERNAL_DATA_BYTES a graph is saved with external data; weights still read unchanged from the source's
    data file are linked (same file, nothing rewritten), new ones written beside it, and the graph computes the
    same."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    from kiln.compiler import large_graphs

    source = tmp_path / "src"
    source.mkdir()
    x = ir.Value(name="x", shape=ir.Shape([2, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", const_value=ir.tensor(np.random.default_rng(0).standard_normal((64, 512)).astype("f4")))
    node = ir.node("MatMul", [x, weight])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    monkeypatch.setattr(large_graphs, "EXTERNAL_DATA_BYTES", 0)
    large_graphs.save_onnx(model, source / "model.onnx")
    assert (source / "model.onnx.data").stat().st_size == 64 * 512 * 4
    loaded = ir.load(str(source / "model.onnx"))
    bias = ir.Value(name="b", const_value=ir.tensor(np.arange(512, dtype="f4")))  # a weight a pass made
    add = ir.node("Add", [loaded.graph.outputs[0], bias])
    loaded.graph.append(add)
    loaded.graph.register_initializer(bias)
    loaded.graph.outputs[0] = add.outputs[0]
    add.outputs[0].name = "y"
    optimized = tmp_path / "opt"
    optimized.mkdir()
    large_graphs.save_onnx(loaded, optimized / "model.onnx")
    assert os.path.samefile(optimized / "model.onnx.data", source / "model.onnx.data")  # linked, not rewritten
    assert (optimized / "model.onnx.extra.data").stat().st_size == 512 * 4
    feeds = {"x": np.ones((2, 64), "f4")}
    session = ort.InferenceSession(str(optimized / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = feeds["x"] @ weight.const_value.numpy() + np.arange(512, dtype="f4")
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, rtol=1e-5)


def test_linear_weights_are_transposed_as_the_file_is_written(tmp_path):
    """The exporter's `MatMul(x, Transpose(W))` becomes `MatMul(x, W.transposed)` with W transposed while the
    file is written (no transposed copy of every weight held in memory), and the graph computes what PyTorch does."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from kiln.compiler.capture.program import lower_to_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).eval()
    example = torch.randn(2, 3, 512)
    program = torch.export.export(model, (example,), strict=False)
    lower_to_onnx(program, tmp_path / "model.onnx", ["output"], None)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    names = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert names["0.weight.transposed"] == (512, 256)  # 131072 elements: deferred (>= 65536)
    assert names["val_2"] == (256, 8)  # 2048: left to the exporter's optimizer, which folds it
    assert "Transpose" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(example).numpy()
    np.testing.assert_allclose(
        session.run(None, {session.get_inputs()[0].name: example.numpy()})[0], expected, atol=1e-5
    )


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_decoder_with_external_data_takes_the_genai_route_and_its_files_load_in_onnx(
    tmp_path, monkeypatch, capsys, precision
):
    """Every weight in external data (as above 64 MiB; the limit lowered here), so that the builds link the
    capture's unchanged data file. onnx and onnx_ir refuse a data file with several links ("a hard link attack"):
    before, the onnxruntime-genai route failed on it and Kiln fell back to its stateless graph (a 3B decoder's
    export, and every decoder above 64 MiB), and int4's quantizer could not read the weights. The export is now
    the genai folder, and each of its files has one link and loads in onnx and onnx_ir with its weights."""
    import onnx
    import onnx_ir as ir
    from kiln.compiler import large_graphs

    monkeypatch.setattr(large_graphs, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "out"
    model = ROOT / "tests" / "models" / "decoders.py"
    flags = ["--precision", precision, "--group-size", "32"] if precision == "int4" else []
    code, _, err = run_cli("export", f"{model}:llama", "-t", "onnx", "-o", out, "-q", *flags, capsys=capsys)
    assert code == 0, err
    info = json.loads((out / "manifest.json").read_text())["target_info"]
    assert info["llm_format"] == "onnxruntime-genai" and not info.get("routes_tried"), info.get("routes_tried")
    assert (out / "genai_config.json").is_file() and (out / "model.onnx.data").is_file()
    assert all(p.stat().st_nlink == 1 for p in out.rglob("*") if p.is_file())
    assert {p.name for p in out.glob("*.data")} == large_graphs.data_locations(out / "model.onnx")  # none stale
    proto = onnx.load(str(out / "model.onnx"))  # external data read in
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    loaded = ir.load(str(out / "model.onnx"))
    assert sum(v.const_value.numpy().size for v in loaded.graph.initializers.values() if v.const_value) > 0
