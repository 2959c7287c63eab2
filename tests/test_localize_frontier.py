"""Localization on a branching model: a prefix cut is judged on every boundary still live at the cut (the
frontier), so a divergence in a branch computed early and consumed late is named where it is, by the bisection
as by the fast path (compiler/diagnose/divergence.py, kiln.compiler.diagnose.cut.live_at)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kiln import export
from kiln.compiler.diagnose.divergence import Search, localize
from kiln.compiler.diagnose.probe import Recipe
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.progress import Progress

from tests.models.planted import branching


@pytest.fixture(scope="module")
def branching_fp16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The branching model captured once, with its fp16 parity samples."""
    from kiln.compiler.capture.program import capture
    from kiln.compiler.capture.sources import from_module
    from kiln.compiler.parity.reference import reference_samples

    work = tmp_path_factory.mktemp("branching")
    source = from_module(*branching())
    options = ExportOptions(precision="fp16")
    captured = capture(source, None, work / "capture", to_onnx=False)
    samples = reference_samples(source, captured, options)
    return {"captured": captured, "options": options, "samples": samples, "work": work}


def test_bisection_judges_the_branch_live_at_the_cut(branching_fp16: dict[str, Any]) -> None:
    """fp16 on ONNX Runtime: `early` overflows, but every block of the stack is computed before it is consumed,
    so a cut in the stack ends with a correct tensor. The bisection names `early` (judged as a value live at a
    later cut) and agrees with the fast path, which reads every boundary in one build."""
    from kiln.targets import get_target

    found = {}
    for way in ("auto", "bisection"):
        found[way] = localize(
            branching_fp16["captured"],
            Recipe.of(get_target("onnx"), branching_fp16["options"]),
            branching_fp16["samples"],
            Search(method=way),
            workdir=branching_fp16["work"] / way,
            progress=Progress(quiet=True),
        )
    fast, bisection = found["auto"], found["bisection"]
    assert fast.method == "fast-path" and bisection.method == "bisection"
    assert bisection.first is not None and bisection.first.module == "early", bisection.summary()
    assert fast.first is not None and fast.first.module == bisection.first.module
    assert bisection.first.cut_at is not None and bisection.first.cut_at > bisection.first.index
    assert bisection.inputs is not None and bisection.inputs.module == "stem" and bisection.inputs.passed
    assert bisection.to_dict()["first"]["cut_at"] == bisection.first.cut_at


class CdistNet(torch.nn.Module):
    """`torch.cdist`, which the dynamo exporter cannot lower: its ONNX export goes the `onnx(torchscript)` route."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(4, 8)
        self.centers = torch.nn.Parameter(torch.randn(3, 8))
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cdist(torch.relu(self.stem(x)), self.centers))


def test_prefixes_are_built_by_the_torchscript_route_that_made_the_artifact(tmp_path: Path) -> None:
    """The export goes `onnx(torchscript)` (dynamo cannot lower `cdist`): `--localize` builds its prefixes by that
    route too, so they convert and pass (by the default dynamo capture, the one holding `cdist` would not)."""
    result = export(CdistNet().eval(), (torch.randn(5, 4),), "onnx", tmp_path / "out", localize=True)
    assert result.manifest.target_info["route"] == "onnx(torchscript)"
    record = result.parity.divergence
    assert record["first"] is None and record["route"] == "onnx(torchscript)", record["summary"]
    assert record["measured"] and all(m["passed"] for m in record["measured"])


def _raising(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("planted exporter failure")


def test_prefixes_are_built_by_openvinos_direct_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ONNX exporter converts (both planted to raise): the artifact is OpenVINO's own conversion of the exported
    program, and so are the prefixes (lowered to ONNX, they would not convert)."""
    import kiln.compiler.capture.program as capture

    monkeypatch.setattr(capture, "_dynamo_onnx", _raising)
    monkeypatch.setattr(capture, "_torchscript_onnx", _raising)
    model, inputs = branching()
    result = export(model, inputs, "openvino", tmp_path / "out", localize=True)
    route = "openvino.convert_model(ExportedProgram)"
    assert result.manifest.target_info["route"] == route
    record = result.parity.divergence
    assert record["first"] is None and record["route"] == route and record["method"] == "bisection", record["summary"]
    assert record["measured"] and all(m["passed"] for m in record["measured"])
