"""Localization on a branching model: a prefix cut is judged on every boundary still live at the cut (the
frontier), so a divergence in a branch computed early and consumed late is named where it is, by the bisection
as by the fast path (compiler/divergence.py, compiler.cut.live_at)."""

from __future__ import annotations

from typing import Any

import pytest

from compiler.divergence import localize
from compiler.pipeline import ExportOptions
from compiler.progress import Progress
from tests.models.planted import branching


@pytest.fixture(scope="module")
def branching_fp16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The branching model captured once, with its fp16 parity samples."""
    from compiler.capture import capture
    from compiler.reference import reference_samples
    from compiler.sources import from_module

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
    from targets import get_target

    found = {}
    for way in ("auto", "bisection"):
        found[way] = localize(
            branching_fp16["captured"],
            get_target("onnx"),
            branching_fp16["options"],
            branching_fp16["samples"],
            workdir=branching_fp16["work"] / way,
            progress=Progress(quiet=True),
            method=way,
        )
    fast, bisection = found["auto"], found["bisection"]
    assert fast.method == "fast-path" and bisection.method == "bisection"
    assert bisection.first is not None and bisection.first.module == "early", bisection.summary()
    assert fast.first is not None and fast.first.module == bisection.first.module
    assert bisection.first.cut_at is not None and bisection.first.cut_at > bisection.first.index
    assert bisection.inputs is not None and bisection.inputs.module == "stem" and bisection.inputs.passed
    assert bisection.to_dict()["first"]["cut_at"] == bisection.first.cut_at
