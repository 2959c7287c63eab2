"""More than one route per target, chosen automatically: a route that fails to convert or converts but fails
parity is not used; the next one is tried, and the manifest records which route made the artifact and why the
earlier ones were not used. The wrong routes are planted (the exporters' output perturbed, or the exporter
made to raise); the runtimes and the gate are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kiln.compiler.capture.program as capture
import numpy as np
import onnx
import pytest
import torch
from kiln import export
from kiln.compiler.errors import UnsupportedOpError
from onnx import helper, numpy_helper


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(image)).flatten(1))


EXAMPLE = (torch.randn(1, 3, 8, 8),)


def _shifted(convert: Any) -> Any:
    """An ONNX exporter whose graph adds 1 to its first output (converts fine, fails parity)."""

    def planted(first: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        convert(first, path, *args, **kwargs)
        proto = onnx.load(str(path))
        name = proto.graph.output[0].name
        for node in proto.graph.node:
            node.output[:] = [f"{name}_raw" if o == name else o for o in node.output]
        proto.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "planted_shift"))
        proto.graph.node.append(helper.make_node("Add", [f"{name}_raw", "planted_shift"], [name]))
        onnx.save(proto, str(path))

    return planted


PLANTED = "RuntimeError: planted exporter failure"


def _raising(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("planted exporter failure")


def _routes(result: Any) -> tuple[str, list[tuple[str, str, str]]]:
    info = result.manifest.target_info
    return info["route"], [(t["route"], t["step"], t["reason"]) for t in info["routes_tried"]]


def test_first_route_that_passes_parity_is_published(tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "_dynamo_onnx", _shifted(capture._dynamo_onnx))
    result = export(TinyNet().eval(), EXAMPLE, "onnx", tmp_path / "out", raise_on_parity_failure=False)
    assert result.published and result.parity is not None and result.parity.passed
    route, tried = _routes(result)
    assert route == "onnx(torchscript)"
    assert [(r, s) for r, s, _ in tried] == [("onnx(dynamo)", "validate")]
    assert tried[0][2].startswith("parity failed: output: max_abs=1 ")
    assert result.manifest.target_info["onnx_route"]["route"] == "torchscript"
    assert (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / ".rejected").exists()


def test_openvino_falls_back_to_its_direct_route_when_no_onnx_route_converts(tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "_dynamo_onnx", _raising)
    monkeypatch.setattr(capture, "_torchscript_onnx", _raising)
    result = export(TinyNet().eval(), EXAMPLE, "openvino", tmp_path / "out", raise_on_parity_failure=False)
    assert result.published and result.parity is not None and result.parity.passed
    route, tried = _routes(result)
    assert route == "openvino.convert_model(ExportedProgram)"
    assert tried == [
        ("onnx(dynamo)", "capture", "lowering to ONNX by the dynamo exporter failed: " + PLANTED),
        ("onnx(torchscript)", "capture", "lowering to ONNX by the torchscript exporter failed: " + PLANTED),
    ]
    assert "onnx_route" not in result.manifest.target_info  # no ONNX graph made this artifact
    assert [s.name for s in result.manifest.inputs] == ["image"]
    assert result.manifest.inputs[0].shape == (1, 3, 8, 8)


def test_no_route_passes_keeps_the_first_rejected_with_every_reason(tmp_path, monkeypatch):
    """Both ONNX routes convert and fail parity: the openvino fallback route is not tried, the first is kept."""
    monkeypatch.setattr(capture, "_dynamo_onnx", _shifted(capture._dynamo_onnx))
    monkeypatch.setattr(capture, "_torchscript_onnx", _shifted(capture._torchscript_onnx))
    result = export(TinyNet().eval(), EXAMPLE, "openvino", tmp_path / "out", raise_on_parity_failure=False)
    assert not result.published and result.directory == tmp_path / "out" / ".rejected" / "openvino"
    route, tried = _routes(result)
    assert route == "onnx(dynamo)" and result.manifest.target_info["onnx_route"]["route"] == "dynamo"
    assert [(r, s) for r, s, _ in tried] == [("onnx(torchscript)", "validate")]
    assert tried[0][2].startswith("parity failed")
    assert sorted(p.name for p in (tmp_path / "out" / ".rejected").iterdir()) == ["openvino"]


def test_no_route_builds_names_every_route(tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "_dynamo_onnx", _raising)
    monkeypatch.setattr(capture, "_torchscript_onnx", _raising)
    with pytest.raises(UnsupportedOpError) as caught:
        export(TinyNet().eval(), EXAMPLE, "openvino", tmp_path / "out", io="nhwc")
    text = caught.value.one_line()
    assert text.startswith("lowering to ONNX failed: dynamo: RuntimeError: planted exporter failure; torchscript:")
    assert "other routes failed too: openvino.convert_model(ExportedProgram) (at build): " in text
    assert "does not take --io nhwc" in text
    assert not (tmp_path / "out").exists()


def test_routes_are_declared_through_the_target_interface():
    from kiln.targets import get_target

    assert [r.name for r in get_target("openvino").routes()] == [
        "onnx(dynamo)",
        "onnx(torchscript)",
        "openvino.convert_model(ExportedProgram)",
    ]
    assert [r.name for r in get_target("onnx").routes()] == ["onnx(dynamo)", "onnx(torchscript)"]
