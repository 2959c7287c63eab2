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
    assert list(stages.values()) == sorted(stages.values())  # a high-water mark only grows


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
