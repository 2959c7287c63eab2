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


def test_weights_in_several_data_files_are_saved_where_the_new_graph_finds_them(tmp_path, monkeypatch):
    """A graph whose weights sit in a file per tensor (as the TorchScript exporter writes a model over 2 GB) or in
    `.data` and `.extra.data` (a graph save_onnx wrote, saved again by a later pass): the largest file is linked,
    every other weight written beside the new graph. Before, the others kept their old relative locations, which
    did not resolve beside the new graph (a 3B decoder's OpenVINO fallback route failed to read it: "invalid
    external data")."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from kiln.compiler import large_graphs

    source = _linear_stack(tmp_path / "stack.onnx", layers=3, width=256)
    per_tensor = tmp_path / "per-tensor"
    per_tensor.mkdir()
    onnx.save(onnx.load(str(source)), str(per_tensor / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)  # fmt: skip
    assert sorted(p.name for p in per_tensor.iterdir()) == ["model.onnx", "w0", "w1", "w2"]
    monkeypatch.setattr(large_graphs, "EXTERNAL_DATA_BYTES", 0)
    x = {"x": np.random.default_rng(1).standard_normal((2, 256)).astype("f4")}
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, x)[0]
    model_dir = per_tensor
    for step in ("first", "second"):  # the second save reads a `.data` and an `.extra.data`
        saved = tmp_path / step
        saved.mkdir()
        large_graphs.save_onnx(large_graphs.load_ir(model_dir / "model.onnx"), saved / "model.onnx")
        assert sorted(p.name for p in saved.iterdir()) == ["model.onnx", "model.onnx.data", "model.onnx.extra.data"]
        session = ort.InferenceSession(str(saved / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, x)[0], expected)
        model_dir = saved


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


def _linear_stack(path: Path, layers: int, width: int, head: int | None = None) -> Path:
    """An ONNX file of `layers` MatMuls [width, width] (random float32 weights, ReLU between), the last one
    computing `logits` ([width, head] when given), its weights in external data beside it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, value = [], [], "x"
    for i in range(layers):
        out = width if head is None or i < layers - 1 else head
        weights.append(numpy_helper.from_array(rng.standard_normal((width, out), np.float32), f"w{i}"))
        last = i == layers - 1
        nodes.append(helper.make_node("MatMul", [value, f"w{i}"], ["logits" if last else f"m{i}"], name=f"mm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
            value = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", head or width])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


@pytest.mark.parametrize("symmetric", [True, False])
def test_weights_quantized_a_layer_at_a_time_are_onnxruntimes_own_blocks(tmp_path, monkeypatch, symmetric):
    """`quantize_onnx_weights` reads one weight at a time from the external data and writes the new data as it
    goes; the blocks, scales and zero points are byte for byte those ONNX Runtime's MatMulNBitsQuantizer makes
    from the whole model (int4 layers, the LM head in int8), and the two graphs give the same logits."""
    import numpy as np
    import onnx
    from kiln.compiler import large_graphs
    from kiln.compiler.quantization.matmul_nbits import quantize_onnx_weights
    from kiln.compiler.quantization.weight_only import WeightOnlySpec
    from kiln.targets.onnxrt import OnnxRuntimeRunner
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    source = _linear_stack(tmp_path / "model.onnx", layers=4, width=96, head=80)
    spec = WeightOnlySpec(4, 32, symmetric)
    monkeypatch.setattr(large_graphs, "EXTERNAL_DATA_BYTES", 0)  # the new weights as external data too
    out = tmp_path / "out"
    out.mkdir()
    summary = quantize_onnx_weights(source, out / "model.onnx", spec, keep_8bit=["mm1"])
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert summary.settings["lm_head"] == "mm3" and sorted(summary.settings["int8_layers"]) == ["mm1", "mm3"]
    ours = onnx.load(str(out / "model.onnx"))
    nbits = {n.name: n for n in ours.graph.node if n.op_type == "MatMulNBits"}
    bits = {name: next(a.i for a in node.attribute if a.name == "bits") for name, node in nbits.items()}
    assert bits == {"mm0_Q4": 4, "mm1_Q8": 8, "mm2_Q4": 4, "mm3_Q8": 8}
    assert not [n for n in ours.graph.node if n.op_type == "MatMul"]
    assert not {f"w{i}" for i in range(4)} & {t.name for t in ours.graph.initializer}  # the float weights are gone

    reference = onnx.load(str(source))
    for bits, names in ((4, ["mm0", "mm2"]), (8, ["mm1", "mm3"])):
        quantizer = MatMulNBitsQuantizer(
            reference,
            bits=bits,
            block_size=32,
            is_symmetric=symmetric,
            accuracy_level=4,
            nodes_to_exclude=[f"mm{i}" for i in range(4) if f"mm{i}" not in names],
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        reference = quantizer.model.model
    expected = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert sorted(got) == sorted(expected) and len(got) == (12 if not symmetric else 8)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    x = np.random.default_rng(1).standard_normal((5, 96), np.float32)
    onnx.save(reference, str(tmp_path / "reference.onnx"))
    theirs = OnnxRuntimeRunner(tmp_path / "reference.onnx").run({"x": x})["logits"]
    np.testing.assert_array_equal(OnnxRuntimeRunner(out / "model.onnx").run({"x": x})["logits"], theirs)


_QUANTIZE_PEAK = """
import sys
from pathlib import Path
from kiln.compiler import large_graphs
from kiln.compiler.memory import current_rss, peak_rss
from kiln.compiler.quantization.matmul_nbits import quantize_onnx_weights
from kiln.compiler.quantization.weight_only import WeightOnlySpec
import onnxruntime.quantization.matmul_nbits_quantizer, onnx  # imported before the baseline
large_graphs.EXTERNAL_DATA_BYTES = 0  # the new weights in external data, as a large model's are
Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
base = current_rss()
quantize_onnx_weights(Path(sys.argv[1]), Path(sys.argv[2]), WeightOnlySpec(4, 32, True))
print(peak_rss() - base)
"""


@linux_only
def test_weight_only_quantization_holds_one_layer_not_the_model(tmp_path):
    """The int4 of a 128 MiB stack of 8 MiB layers grows the quantizing process by a few layers' worth, not by
    the model's weights (ONNX Runtime's MatMulNBitsQuantizer loaded them all and built the new model beside them:
    a 3B decoder's int4 ran this machine's 24 GB out)."""
    source = _linear_stack(tmp_path / "model.onnx", layers=16, width=1448)  # 16 x 8 MiB
    weights = (tmp_path / "model.onnx.data").stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_PEAK, str(source), str(out / "model.onnx")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    grown = int(run.stdout.split()[-1])
    assert grown < weights / 4, f"quantizing grew the process by {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB"
