"""Localization on LiteRT (`tflite`), and the fast paths (one build, the module boundaries read from ONNX Runtime
or OpenVINO) agreeing with the bisection on the planted models."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from kiln.compiler.diagnose.divergence import Search, localize
from kiln.compiler.diagnose.divergence_record import DIVERGENCE_FILE
from kiln.compiler.diagnose.probe import Recipe
from kiln.compiler.diagnose.profile_html import HTML_FILE
from kiln.compiler.export.options import ExportOptions, export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.progress import Progress
from kiln.passes.base import FX, Pass, PassResult

from tests.models.fragile import FRAGILE_MODULE, fragile_cnn
from tests.models.planted import overflow, plain
from tests.test_divergence import _bound

PERTURBED = "body.3.conv"
SHIFT = 1e-3  # below the pass contract's round-off check at the outputs (2.3e-3 here), above the tight gate below


def _shift_bias(program: Any) -> PassResult:
    """A wrong FX pass, for the test: adds 1e-3 to one conv's bias (a new tensor: the model's stays as it is)."""
    import torch

    name = f"{PERTURBED}.bias"
    if name not in program.state_dict:
        return PassResult(program, False)
    program.state_dict[name] = torch.nn.Parameter(program.state_dict[name].detach() + SHIFT, requires_grad=False)
    return PassResult(program, True)


WRONG_FX_PASS = Pass("shift-a-bias", "test only: shifts one conv's bias", FX, 1, _shift_bias)


def _export(model_and_inputs: tuple, target: str, out: Path, **options: object) -> tuple[Any, str]:
    stream = io.StringIO()
    model, inputs = model_and_inputs
    result = export_targets(model, target, out, export_options(**options), inputs, Progress(stream=stream))[0]  # type: ignore[arg-type]
    return result, stream.getvalue()


@pytest.fixture(autouse=True)
def _litert() -> None:
    pytest.importorskip("ai_edge_litert", reason="the tflite target needs ai-edge-litert")


def test_tflite_fp16_overflow_names_the_conv_that_reads_the_scaled_values(tmp_path: Path) -> None:
    """LiteRT's fp16 stores weights in fp16 but computes `up`'s Mul in fp32: `up`'s 6.6e7 is exact there, and the
    first module whose output is not finite is `mid.conv`, the conv that reads it (its input, `up`, matches)."""
    result, text = _export(overflow(), "tflite", tmp_path / "out", precision="fp16")
    record = result.parity.divergence
    assert not result.parity.passed and record["first"]["module"] == "mid.conv", text
    assert record["inputs"]["module"] == "up" and record["inputs"]["passed"]
    assert record["builds"] <= _bound(record) and text.count("localize tflite build") == record["builds"]
    assert (tmp_path / "out" / ".rejected" / "tflite" / DIVERGENCE_FILE).is_file()


def test_tflite_int8_outlier_weight_names_the_fragile_conv(tmp_path: Path) -> None:
    result, text = _export(fragile_cnn(), "tflite", tmp_path / "out", precision="int8")
    record = result.parity.divergence
    assert record["first"]["module"] == FRAGILE_MODULE and record["first"]["kind"] == "Conv2d", text
    assert "SNR" in record["first"]["reason"] and record["inputs"]["snr_db"] > 30
    assert record["builds"] <= _bound(record)


def test_tflite_wrong_fx_pass_names_the_shifted_conv(tmp_path: Path) -> None:
    """fp32 with an FX pass that shifts one conv's bias by 1e-3 (small enough for the pass contract's check to
    keep it), under a gate of atol 5e-4: that conv is named, its input matching."""
    result, text = _export(plain(), "tflite", tmp_path / "out", passes=[WRONG_FX_PASS], atol=5e-4, rtol=1e-5)
    assert "shift-a-bias was rolled back" not in text
    record = result.parity.divergence
    assert not result.parity.passed and record["first"]["module"] == PERTURBED, text
    assert record["inputs"]["module"] == "body.2" and record["inputs"]["passed"]
    assert record["builds"] <= _bound(record)


@pytest.fixture(scope="module")
def fragile_int8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fragile CNN captured once, with its parity samples and int8 calibration, for both runtimes."""
    from kiln.compiler.capture.sources import from_module
    from kiln.compiler.export.stages import capture_source
    from kiln.compiler.parity.reference import reference_samples
    from kiln.targets import get_target

    work = tmp_path_factory.mktemp("fragile")
    source = from_module(*fragile_cnn())
    options = ExportOptions(precision="int8")
    captured = capture_source(source, options, work / "capture")
    calibration = captured.calibrate([get_target("onnx"), get_target("openvino")])
    samples = reference_samples(source, captured.graph, options)
    return {
        "captured": captured.graph,
        "options": options,
        "samples": samples,
        "calibration": calibration,
        "work": work,
    }


@pytest.mark.parametrize(("target", "method"), [("onnx", "fast-path+bisection"), ("openvino", "fast-path")])
def test_int8_fast_path_and_bisection_name_the_same_module(
    fragile_int8: dict[str, Any], target: str, method: str
) -> None:
    """ONNX Runtime's QDQ graph fuses the conv with its ReLU, so the conv's own output is not in it: the fast path
    narrows the search to it and one prefix build settles it. OpenVINO exposes every boundary: one build."""
    from kiln.targets import get_target

    found = {}
    for way in ("auto", "bisection"):
        found[way] = localize(
            fragile_int8["captured"],
            Recipe.of(get_target(target), fragile_int8["options"], fragile_int8["calibration"]),
            fragile_int8["samples"],
            Search(method=way),
            workdir=fragile_int8["work"] / f"{target}-{way}",
        )
    fast, bisection = found["auto"], found["bisection"]
    assert fast.method == method and bisection.method == "bisection"
    assert fast.first is not None and bisection.first is not None
    assert fast.first.module == bisection.first.module == FRAGILE_MODULE
    assert fast.inputs is not None and bisection.inputs is not None and fast.inputs.module == bisection.inputs.module
    assert fast.builds < bisection.builds


def test_fp16_fast_path_agrees_with_the_bisection_in_one_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp16 on ONNX Runtime: the export's localization reads the boundaries in one build (fast path) and names
    `up`; `kiln debug --bisect` on the same rejected export names `up` too; both pages are well-formed."""
    import json

    from kiln import cli

    from tests.test_divergence import PLANTED

    out = tmp_path / "out"
    export = ["export", f"{PLANTED}:overflow", "-t", "onnx", "--precision", "fp16", "--out", str(out), "-q"]
    assert cli.main(export) == 1
    rejected = out / ".rejected" / "onnx"
    record = json.loads((rejected / DIVERGENCE_FILE).read_text())
    assert record["method"] == "fast-path" and record["builds"] == 1 and record["first"]["module"] == "up"
    _check_page(rejected / HTML_FILE, ["up (Scale)", "body.5 (Block)", "mid.conv (Conv2d)"])
    page = tmp_path / "debug.html"
    args = ["debug", str(rejected), "--model", f"{PLANTED}:overflow", "--bisect", "--json", "--html", str(page)]
    assert cli.main(args) == 0
    found = json.loads(capsys.readouterr().out)[0]
    assert found["method"] == "bisection" and found["first"]["module"] == "up" and found["builds"] > 1
    _check_page(page, ["up (Scale)"])
    missing = ["debug", str(rejected), "--model", f"{PLANTED}:overflow", "--html", str(tmp_path / "no" / "p.html")]
    assert cli.main(missing) == 2 and "does not exist" in capsys.readouterr().err


def _check_page(path: Path, modules: list[str]) -> None:
    """One self-contained page: every SVG is well-formed XML, nothing is loaded from elsewhere, the modules and
    the first divergence's marker are in it."""
    import re
    import xml.etree.ElementTree as ET

    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    charts = re.findall(r"<svg.*?</svg>", text, flags=re.S)
    assert len(charts) == 3
    for chart in charts:
        ET.fromstring(chart)
    assert not re.search(r"<(script|link|img)\b", text) and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    assert all(module in text for module in modules)
    assert 'stroke="#c00"' in text and "stroke-dasharray" in text  # the first divergence, the tolerance line
