"""Exporting the same model twice gives byte-identical artifacts on every CPU target (manifests aside: they carry
times). Where a backend writes something random (TensorFlow's SavedModel fingerprint uuid), Kiln fixes it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from compiler.pipeline import ExportOptions, export_targets
from compiler.types import MANIFEST_NAME

TARGETS = "onnx,openvino,tflite,tpu"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


@pytest.mark.slow
def test_two_exports_of_the_same_model_are_byte_identical(tmp_path):
    first = export_targets("zoo:cnn", TARGETS, tmp_path / "a", ExportOptions())
    second = export_targets("zoo:cnn", TARGETS, tmp_path / "b", ExportOptions())
    assert all(r.published for r in first + second)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert {Path(name).parts[0] for name in a} == set(TARGETS.split(","))
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []
