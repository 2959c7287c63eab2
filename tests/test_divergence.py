"""Localization: the first module where an artifact diverges from PyTorch, found by building prefixes of the
captured program (compiler/diagnose/divergence.py). Each model has its divergence planted at a known module."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from kiln import cli
from kiln.compiler.capture.program import CapturedModel, fx_signature
from kiln.compiler.diagnose.cut import module_boundaries, prefix_program
from kiln.compiler.diagnose.divergence_record import DIVERGENCE_FILE
from kiln.compiler.export.options import ExportOptions, export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.progress import Progress
from kiln.compiler.types import Manifest
from kiln.passes.base import ONNX, Pass, PassResult

from tests.models.fragile import FRAGILE_MODULE, fragile_cnn
from tests.models.planted import Plain, cancellation, overflow, plain, unconvertible

PLANTED = Path(__file__).parent / "models" / "planted.py"
PERTURBED = "body.3.conv"  # the conv whose weights the wrong pass changes


def _perturb_conv(model: object) -> PassResult:
    """A wrong ONNX pass, for the test: scales the weights of one conv by 1.5 (when that conv is in the graph)."""
    import onnx_ir as ir

    value = model.graph.initializers.get(f"{PERTURBED}.weight")  # type: ignore[attr-defined]
    if value is None or value.const_value is None:
        return PassResult(model, False)
    value.const_value = ir.tensor(value.const_value.numpy() * 1.5, name=value.name)
    return PassResult(model, True)


WRONG_PASS = Pass("perturb-conv", "test only: scales one conv's weights", ONNX, 1, _perturb_conv)


def _export(model_and_inputs: tuple, target: str, out: Path, **options: object) -> tuple[object, str]:
    """Export with progress captured: the result and the progress text."""
    stream = io.StringIO()
    model, inputs = model_and_inputs
    result = export_targets(model, target, out, export_options(**options), inputs, Progress(stream=stream))[0]  # type: ignore[arg-type]
    return result, stream.getvalue()


def _bound(divergence: dict) -> int:
    return math.ceil(math.log2(divergence["boundaries"])) + 2


def test_boundaries_in_execution_order_innermost_named() -> None:
    """Every non-trivial module call, in order; a module ending at its last child's node is named by the child."""
    import torch

    model, inputs = plain()
    program = torch.export.export(model, inputs, strict=False)
    names = [b.module for b in module_boundaries(program)]
    assert names[:4] == ["stem", "body.0.conv", "body.0.act", "body.0"]
    assert names[-1] == "head" and len(names) == 1 + 8 * 3 + 1
    last_block = module_boundaries(program)[-2]
    assert last_block.module == "body.7" and last_block.enclosing == ("body",)
    assert "planted.py" in last_block.source or "container.py" in last_block.source
    captured = CapturedModel(program, None, *fx_signature(program, ["output"]), 0, None)
    prefix = prefix_program(captured, last_block, [inputs[0].numpy()], "cut")
    assert [s.name for s in prefix.inputs] == [s.name for s in captured.inputs]  # calibration data is keyed by them
    assert prefix.outputs[0].name == "cut" and prefix.outputs[0].shape == (2, 8, 16, 16)
    assert "body.7.conv.weight" in prefix.exported.state_dict and "head.weight" not in prefix.exported.state_dict
    assert not prefix.exported.constants  # the weights are the model's parameters, not tensors baked in


def test_int8_prefixes_build_with_the_calibration(tmp_path: Path) -> None:
    """--localize on a passing int8 OpenVINO export: one build (the whole model, every boundary read from
    OpenVINO: the fast path), calibrated and within tolerance."""
    result, text = _export(plain(), "openvino", tmp_path / "out", precision="int8", localize=True)
    record = result.parity.divergence  # type: ignore[attr-defined]
    assert result.parity.passed and record["builds"] == 1 and record["first"] is None, text  # type: ignore[attr-defined]
    assert record["method"] == "fast-path" and len(record["measured"]) == record["boundaries"]
    assert all(m["passed"] for m in record["measured"]) and record["measured"][-1]["module"] == "head"


def test_fp16_overflow_names_the_scaling_module(tmp_path: Path) -> None:
    """fp16 on ONNX Runtime: `up` scales past 65504 (`down` scales back, so fp32 is finite): `up` is named."""
    result, text = _export(overflow(), "onnx", tmp_path / "out", precision="fp16")
    assert not result.parity.passed  # type: ignore[attr-defined]
    record = result.parity.divergence  # type: ignore[attr-defined]
    assert record["first"]["module"] == "up" and record["first"]["kind"] == "Scale"
    assert record["inputs"]["passed"] and record["inputs"]["module"] == "body.5"
    assert record["builds"] <= _bound(record)
    assert text.count("localize onnx build") == record["builds"]
    assert "first divergence: up (Scale)" in text
    stored = json.loads((result.directory / DIVERGENCE_FILE).read_text())  # type: ignore[attr-defined]
    assert stored["first"]["module"] == "up"
    manifest = Manifest.read(result.directory)  # type: ignore[attr-defined]
    assert manifest.parity is not None and manifest.parity.divergence is not None
    assert manifest.parity.divergence["first"]["module"] == "up"


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_wrong_pass_names_the_perturbed_conv(tmp_path: Path, target: str) -> None:
    """fp32 with a pass that changes one conv's weights: that conv is the first divergence, its input matches."""
    result, _ = _export(plain(), target, tmp_path / "out", passes=[WRONG_PASS])
    record = result.parity.divergence  # type: ignore[attr-defined]
    assert record["first"]["module"] == PERTURBED
    assert record["inputs"]["module"] == "body.2" and record["inputs"]["cosine"] > 0.99999
    assert record["first"]["cosine"] < 0.9999 or not record["first"]["passed"]
    assert record["builds"] <= _bound(record)
    assert (tmp_path / "out" / ".rejected" / target / DIVERGENCE_FILE).is_file() or (
        result.directory / DIVERGENCE_FILE  # type: ignore[attr-defined]
    ).is_file()


def test_bf16_cancellation_on_tpu_names_the_module_that_loses_the_values(tmp_path: Path) -> None:
    """bf16 under XLA: `up` adds 4096 (still within bf16's tolerance), `down` subtracts it and the small values are
    gone: `down` is named, with `up`'s output (its input) still matching."""
    pytest.importorskip("tensorflow", reason="the tpu target needs tensorflow-cpu (pip install .[tpu])")
    pytest.importorskip("litert_torch", reason="the tpu target needs litert-torch (pip install .[tpu])")
    result, text = _export(cancellation(), "tpu", tmp_path / "out", precision="bf16")
    record = result.parity.divergence  # type: ignore[attr-defined]
    assert record["first"]["module"] == "down" and record["first"]["kind"] == "Shift", text
    assert record["inputs"]["module"] == "act" and record["inputs"]["passed"]
    assert record["builds"] <= _bound(record) and text.count("localize tpu build") == record["builds"]


def test_int8_outlier_weight_names_the_fragile_conv_on_onnx_and_openvino(tmp_path: Path) -> None:
    """int8: `features.2` weighs a dead channel by 200, so its int8 weight scale zeroes its other weights (the
    quant-report's model); both runtimes name it, judged by cosine/SNR, its input still matching."""
    module, example = fragile_cnn()
    stream = io.StringIO()
    found = export_targets(
        module, "onnx,openvino", tmp_path / "out", ExportOptions(precision="int8"), example, Progress(stream=stream)
    )
    for result in found:
        record = result.parity.divergence  # type: ignore[union-attr]
        assert record["first"]["module"] == FRAGILE_MODULE and record["first"]["kind"] == "Conv2d", result.target
        assert "SNR" in record["first"]["reason"] and record["inputs"]["snr_db"] > 30
        assert record["builds"] <= _bound(record)
        assert (tmp_path / "out" / ".rejected" / result.target / DIVERGENCE_FILE).is_file()


def test_a_prefix_that_does_not_convert_is_the_answer(tmp_path: Path) -> None:
    """The library call on a model ONNX cannot take: the module whose addition breaks conversion is named, with
    the op, and the prefixes before it convert and match."""
    from kiln.compiler.capture.program import capture
    from kiln.compiler.capture.sources import from_module
    from kiln.compiler.diagnose.divergence import localize
    from kiln.compiler.diagnose.probe import Recipe
    from kiln.compiler.parity.reference import reference_samples
    from kiln.targets import get_target

    source = from_module(*unconvertible())
    captured = capture(source, None, tmp_path / "capture", to_onnx=False)
    options = ExportOptions()
    samples = reference_samples(source, captured, options)
    found = localize(captured, Recipe.of(get_target("onnx"), options), samples, workdir=tmp_path / "work")
    assert found.first is not None and found.first.module == "binning" and found.first.kind == "Binning"
    assert found.conversion_error is not None and "lowering to ONNX failed" in found.conversion_error
    assert found.inputs is not None and found.inputs.module == "pre" and found.inputs.passed
    assert "searchsorted" in found.first.ops and "binning (Binning) (ops searchsorted" in found.summary()


def test_passing_export_has_no_record_and_no_extra_build(tmp_path: Path) -> None:
    result, text = _export(plain(), "onnx", tmp_path / "out")
    assert result.parity.passed and result.parity.divergence is None  # type: ignore[attr-defined]
    assert "localize" not in text
    assert not (result.directory / DIVERGENCE_FILE).exists()  # type: ignore[attr-defined]


def test_prefix_builds_leave_the_dumped_passes_alone(tmp_path: Path) -> None:
    """--dump-passes writes the export's own graphs: the prefixes built by --localize do not overwrite them."""
    import onnx

    dump = tmp_path / "dump"
    result, _ = _export(plain(), "onnx", tmp_path / "out", localize=True, dump_passes=dump)
    assert result.parity.divergence["builds"] == 1  # type: ignore[attr-defined]
    dumped = sorted((dump / "onnx").glob("*.onnx"))
    assert dumped and all([o.name for o in onnx.load(str(p)).graph.output] == ["output"] for p in dumped)


def test_cli_localize_flags_and_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--localize on a passing export builds its last boundary only; --no-localize skips a failing one; `kiln
    debug` on the rejected build finds the same module as the export did, in JSON and as a table."""
    out = tmp_path / "pass"
    assert cli.main(["export", f"{PLANTED}:plain", "-t", "onnx", "--out", str(out), "--localize", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["results"][0]["parity"]["divergence"]
    assert record["first"] is None and record["builds"] == 1
    failing = ["export", f"{PLANTED}:overflow", "-t", "onnx", "--precision", "fp16", "-q"]
    assert cli.main([*failing, "--out", str(tmp_path / "skip"), "--no-localize"]) == 1
    assert not (tmp_path / "skip" / ".rejected" / "onnx" / DIVERGENCE_FILE).exists()
    capsys.readouterr()
    assert cli.main([*failing, "--out", str(tmp_path / "fail")]) == 1
    rejected = tmp_path / "fail" / ".rejected" / "onnx"
    assert cli.main(["debug", str(rejected), "--model", f"{PLANTED}:overflow", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)[0]
    assert found["first"]["module"] == "up" and found["builds"] <= _bound(found)
    assert cli.main(["debug", str(rejected), "--model", f"{PLANTED}:overflow"]) == 0
    table = capsys.readouterr().out
    assert "first divergence: up (Scale)" in table and any(
        line.strip().startswith("->") and "up (Scale)" in line for line in table.splitlines()
    )
    assert cli.main(["debug", str(rejected), "--model", str(tmp_path / "missing.py:build")]) == 2
    assert "kiln: error:" in capsys.readouterr().err
    assert cli.main(["debug", str(tmp_path / "nothing"), "--model", f"{PLANTED}:plain"]) == 2


def test_debug_all_profiles_every_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--all --bisect builds every boundary; --all alone reads them all from ONNX Runtime in one build."""
    out = tmp_path / "out"
    assert cli.main(["export", f"{PLANTED}:plain", "-t", "onnx", "--out", str(out), "-q"]) == 0
    assert cli.main(["debug", str(out), "--model", f"{PLANTED}:plain", "--all", "--bisect", "-q", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)[0]
    assert found["first"] is None and found["builds"] == found["boundaries"] == len(Plain().body) * 3 + 2
    assert all(m["passed"] and m["cosine"] > 0.9999 for m in found["measured"])
    assert np.isfinite([m["max_abs"] for m in found["measured"]]).all()
    assert cli.main(["debug", str(out), "--model", f"{PLANTED}:plain", "--all", "-q", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)[0]
    assert fast["method"] == "fast-path" and fast["builds"] == 1 and fast["first"] is None
    assert [m["module"] for m in fast["measured"]] == [m["module"] for m in found["measured"]]
    assert all(m["passed"] for m in fast["measured"])
