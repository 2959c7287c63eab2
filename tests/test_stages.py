"""The composable path (`kiln.capture(...).optimize(...).build(...).validate(...)`) is the one-call path's own
stages: on the same model it gives the same artifact; each step's keyword replaces its option group; the CLI's
flags, the library's keywords and the option groups are one vocabulary."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import kiln
import kiln.compiler.export.stages as stages
import numpy as np
import pytest
from kiln.cli_parser import build_parser
from kiln.compiler.errors import InternalError, UsageError
from kiln.compiler.export.options import KEYWORDS, ExportOptions, Thresholds, export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.perf.timing import BenchSettings

CLI_ONLY = {"command", "model", "target", "out", "json", "quiet"}  # `kiln export` flags that are not export options
LIBRARY_ONLY = {"passes"}  # an explicit pass pipeline: Pass objects, no flag


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """zoo:cnn exported to onnx both ways: by `kiln.export`, and by the stages, composed by hand."""
    root = tmp_path_factory.mktemp("stages")
    one_call = kiln.export("zoo:cnn", target="onnx", out=root / "one-call")
    captured = kiln.capture("zoo:cnn")
    validated = captured.optimize("onnx").build().validate()
    composed = validated.save(root / "composed")
    return {"one_call": one_call, "composed": composed, "captured": captured, "validated": validated}


def _figures(result: object) -> str:
    """Every output's parity metrics, as text (a NaN compares equal to itself)."""
    outputs = result.manifest.parity.outputs  # type: ignore[attr-defined]
    return json.dumps([asdict(o) for o in outputs], default=str, sort_keys=True)


def test_the_stages_composed_by_hand_give_the_one_call_artifact(cnn: dict[str, object]) -> None:
    one, composed = cnn["one_call"], cnn["composed"]
    assert composed.published and composed.failure is None  # type: ignore[attr-defined]
    assert (one.directory / "model.onnx").read_bytes() == (composed.directory / "model.onnx").read_bytes()  # type: ignore[attr-defined]
    assert _figures(one) == _figures(composed)
    first, second = one.manifest, composed.manifest  # type: ignore[attr-defined]
    assert [p.name for p in first.passes] == [p.name for p in second.passes]
    assert first.target_info == second.target_info  # the route included: onnx(dynamo), nothing else tried
    assert first.parity.sample_origins == second.parity.sample_origins
    assert [f.path for f in first.files] == [f.path for f in second.files]
    assert {f.path: f.sha256 for f in first.files}["model.onnx"] == {f.path: f.sha256 for f in second.files}[
        "model.onnx"
    ]


def test_each_step_takes_its_option_group_and_a_failed_gate_is_kept_rejected(
    cnn: dict[str, object], tmp_path: Path
) -> None:
    captured = cnn["captured"]
    strict = captured.optimize("onnx").build().validate(thresholds=Thresholds(min_snr_db=1000.0))  # type: ignore[attr-defined]
    assert not strict.passed and strict.options.thresholds.min_snr_db == 1000.0
    assert strict.options.thresholds != cnn["validated"].options.thresholds  # type: ignore[attr-defined]
    result = strict.localized().save(tmp_path / "out")
    assert not result.published and result.directory == tmp_path / "out" / ".rejected" / "onnx"
    assert result.parity.divergence is not None and (result.directory / "divergence.json").is_file()
    fp16 = kiln.build(captured.optimize("onnx", passes=kiln.PassOptions(level=1)), precision="fp16")  # type: ignore[attr-defined]
    assert fp16.request.precision == "fp16" and fp16.artifact.manifest.precision == "fp16"
    assert [r.name for r in fp16.optimized.records] != [r.name for r in cnn["validated"].optimized.records]  # type: ignore[attr-defined]
    assert kiln.validate(fp16).passed
    # int8 first needs calibration data and the quantized gate's 32 sets: made then, the first ones unchanged
    fp32_sets = cnn["validated"].samples.inputs  # type: ignore[attr-defined]
    int8 = captured.optimize("onnx").build(precision="int8").validate()  # type: ignore[attr-defined]
    assert int8.request.calibration is not None and len(int8.samples.inputs) == 32
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(fp32_sets, int8.samples.inputs) for k in a)
    assert len(captured.samples_for("fp32").inputs) == len(fp32_sets)  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="does not support precision int4"):
        captured.optimize("onnx").build(precision="int4")  # type: ignore[attr-defined]


def test_bench_times_a_stage_on_its_parity_inputs(cnn: dict[str, object]) -> None:
    timing = kiln.bench(cnn["validated"], BenchSettings(runs=3, warmup=1))
    assert len(timing.latency.times_ms) == 3 and timing.latency.fastest_ms > 0 and timing.load_s >= 0


def test_a_bug_is_an_internal_error_from_a_step_and_itself_inside_an_export(
    cnn: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(stages, "optimize", broken)
    with pytest.raises(InternalError, match="internal error: RuntimeError: planted bug") as raised:
        cnn["captured"].optimize("pt2")  # type: ignore[attr-defined]
    assert isinstance(raised.value.__cause__, RuntimeError)
    # the one-call flow lets it pass as it is (the CLI says it, or shows it with KILN_DEBUG=1); kiln.export wraps it
    with pytest.raises(RuntimeError, match="planted bug"):
        export_targets("zoo:cnn", "pt2", tmp_path / "a", ExportOptions())
    with pytest.raises(InternalError, match="planted bug"):
        kiln.export("zoo:cnn", target="pt2", out=tmp_path / "b")


def test_the_cli_flags_and_the_library_keywords_are_one_vocabulary() -> None:
    export = build_parser()._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    dests = {action.dest for action in export._actions if action.dest != "help"}
    assert dests - CLI_ONLY == set(KEYWORDS) - LIBRARY_ONLY
    args = build_parser().parse_args(
        ["export", "zoo:cnn", "-t", "onnx", "--per-tensor", "--activations", "asymmetric", "--min-snr", "30",
         "--no-parity-gate", "--passes=-constant-folding", "--max-drop", "0.02", "--precision", "int8"]
    )  # fmt: skip
    options = export_options(**{k: v for k, v in vars(args).items() if k in KEYWORDS})
    spec = options.calibration.spec
    assert (spec.per_channel, spec.symmetric_activations, options.calibration.accuracy.max_drop) == (False, False, 0.02)
    assert options.thresholds.min_snr_db == 30 and not options.parity.gate
    assert options.passes.adjustments.removed == ("constant-folding",)


def test_an_unknown_keyword_is_refused_with_the_closest_name() -> None:
    with pytest.raises(UsageError, match="unknown export option 'min_snr'") as raised:
        kiln.capture("zoo:cnn", min_snr=30)
    assert raised.value.hint == "did you mean min_snr_db?"
    with pytest.raises(UsageError, match="unknown export option 'opt_levels'") as raised:
        export_options(opt_levels=1)
    assert raised.value.hint == "did you mean opt_level?"
