"""Exporting the same model twice gives byte-identical artifacts on every CPU target (manifests aside: they carry
times). Where a backend writes something random (TensorFlow's SavedModel fingerprint uuid), Kiln fixes it.

Two exports are two `kiln export` runs: inside one process, OpenVINO's generated layer names and TensorFlow's
function names carry process-wide counters, so a second export in the same process names them differently."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from kiln.compiler.types import MANIFEST_NAME

from tests.conftest import ROOT

TARGETS = "onnx,openvino,tflite,tpu"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


@pytest.mark.slow
def test_two_exports_of_the_same_model_are_byte_identical(tmp_path):
    for out in ("a", "b"):
        command = [sys.executable, str(ROOT / "cli.py"), "export", "zoo:cnn", "-t", TARGETS, "--out", tmp_path / out]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert {Path(name).parts[0] for name in a} == set(TARGETS.split(","))
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []
