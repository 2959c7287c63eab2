"""`kiln tune`'s layout and batch candidates (kiln.compiler.perf.tune_candidates): NHWC image I/O built and gated like
any
candidate and named so in the leaderboard; `--batch N` other than the example's builds dynamic-batch candidates
timed at N, the static builds listed as not built with why; the plans of the other cases; bad input.

One tune run is shared: tests/models/planted.py:plain (2x3x16x16 images) on onnx and openvino at fp32 with
`--batch 4 --objective throughput`: four builds (NCHW and NHWC, each with a dynamic batch 1:4), no runtime
settings, no -O0 export, two short rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kiln.compiler.matrix.results import PASSED, CellResult
from kiln.compiler.perf.leaderboard import markdown
from kiln.compiler.perf.tune import TuneOptions, plan, run_tune
from kiln.compiler.perf.tune_candidates import MAX_BATCH, Entry, Variant
from kiln.compiler.perf.tune_report import publish
from kiln.compiler.progress import Progress
from kiln.compiler.types import Manifest
from kiln.targets.base import RuntimeSettings

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "tests" / "models" / "planted.py") + ":plain"  # example batch 2, one 2x3x16x16 image input
FLAT = str(ROOT / "tests" / "models" / "matrix_models.py") + ":tiny"  # 2x8: no image input
OPTIONS = TuneOptions(targets=("onnx", "openvino"), precisions=("fp32",), objective="throughput", batch=4,
                      plain=False, runtime_search=False, rounds=2, runs=3, warmup=1)  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(out, board)."""
    out = tmp_path_factory.mktemp("tune_shapes") / "out"
    return out, run_tune(MODEL, out, OPTIONS, Progress(quiet=True))


def _rows(board):
    return {r["name"]: r for r in board["candidates"] + board["rejected"]}


def test_dynamic_batch_candidates_are_timed_at_the_batch_asked(tuned):
    out, _ = tuned
    stored = json.loads((out / "leaderboard.json").read_text())
    assert stored["batch"] == 4 and stored["objective"] == "throughput" and stored["builds"] == 4
    names = {f"{t} fp32{layout} batch=1:4" for t in ("onnx", "openvino") for layout in ("", " NHWC")}
    assert set(_rows(stored)) == names and not stored["rejected"], stored["rejected"]
    for row in stored["candidates"]:
        assert row["batch"] == 4 and row["batch_range"] == "1:4", row
        assert row["throughput_items_per_s"] == pytest.approx(4 * 1000 / row["p50_ms"])
        assert Manifest.read(Path(row["directory"])).target_info["dynamic_batch"] == "1:4"
    static = [s for s in stored["skipped"] if s.get("variant") == "static batch 2"]
    assert static and "not at --batch 4" in static[0]["reason"], stored["skipped"]
    text = (out / "leaderboard.md").read_text()
    assert "(objective: throughput, timed at batch 4)" in text and "static batch 2" in text
    assert stored["why"].startswith(("best throughput at batch 4", "tie")) and "at batch 4" in stored["why"]


def test_the_nhwc_candidate_is_gated_and_its_row_says_nhwc(tuned):
    _, board = tuned
    rows = _rows(board)
    for target in ("onnx", "openvino"):
        row = rows[f"{target} fp32 NHWC batch=1:4"]
        assert row["io_layout"] == "nhwc" and row["min_cosine"] > 0.9999
        manifest = Manifest.read(Path(row["directory"]))
        assert manifest.parity is not None and manifest.parity.passed and manifest.published
        assert manifest.inputs[0].layout == "NHWC" and manifest.inputs[0].shape[1:] == (16, 16, 3)
        assert rows[f"{target} fp32 batch=1:4"]["io_layout"] == "nchw"
    table = [line for line in markdown(board).splitlines() if line.startswith("| ") and "NHWC batch" in line]
    assert len(table) == 2 and all("| NHWC | 1:4 |" in line for line in table), table


def test_best_and_a_published_nhwc_candidate_say_their_layout_and_pass_verify(tuned, tmp_path, capsys):
    out, board = tuned
    best = Manifest.read(out / "best")
    tune = best.target_info["tune"]
    assert tune["io_layout"] == board["winner"]["io_layout"] and tune["batch_range"] == "1:4"
    assert tune["timed_batch"] == 4 and tune["throughput_items_per_s"] == board["winner"]["throughput_items_per_s"]
    assert (best.inputs[0].layout == "NHWC") == (tune["io_layout"] == "nhwc")
    code, text, err = run_cli("verify", out / "best", capsys=capsys)
    assert code == 0, err + text
    row = _rows(board)["openvino fp32 NHWC batch=1:4"]  # whatever won: an NHWC winner is published so
    build = CellResult("m/openvino/fp32", "m", MODEL, "openvino", "fp32", PASSED, min_cosine=1.0)
    variant = Variant("nhwc", "1:4")
    entry = Entry(row["name"], "openvino", "fp32", False, RuntimeSettings(), None, build, Path(row["directory"]),
                  variant=variant, batch=4, timing={"batch": 4})  # fmt: skip
    publish(entry, tmp_path / "best", board | {"why": "test"})
    published = Manifest.read(tmp_path / "best")
    assert published.inputs[0].layout == "NHWC" and published.target_info["tune"]["io_layout"] == "nhwc"
    code, text, err = run_cli("verify", tmp_path / "best", capsys=capsys)
    assert code == 0, err + text


def _planned(source: str, **asked):
    options = TuneOptions(**{"targets": ("onnx", "openvino", "tflite", "pt2"), "precisions": ("fp32", "int8")} | asked)
    planned = plan(source, options)
    cells = {c.cell_id: c for c in planned.config.cells()}
    return planned, cells


def test_the_default_tune_adds_only_nhwc_at_fp32():
    """The default latency tune: NCHW at every precision, NHWC at fp32 on the targets that take it (pt2 does
    not: listed), the -O0 export; no dynamic batch."""
    planned, cells = _planned(MODEL)
    assert {"plain-nhwc/onnx/fp32", "plain-nhwc/openvino/fp32", "plain-nhwc/tflite/fp32"} == {
        i for i in cells if i.startswith("plain-nhwc/")
    }
    assert cells["plain-nhwc/onnx/fp32"].options.io == "nhwc" and cells["plain/onnx/int8"].options.io is None
    assert not any(c.options.dynamic_batch for c in cells.values()) and "plain-O0/onnx/fp32" in cells
    assert planned.variants["plain-nhwc"].layout == "nhwc" and planned.variants["plain"].layout == "nchw"
    assert planned.batch == 2
    refused = [s for s in planned.skipped if s["target"] == "pt2" and s.get("variant") == "NHWC"]
    assert refused and "takes no NHWC I/O" in refused[0]["reason"]
    both, cells = _planned(MODEL, io=("nchw", "nhwc"), plain=False)
    assert {"plain-nhwc/onnx/int8", "plain-nhwc/onnx/fp32", "plain/onnx/int8"} <= set(cells)  # every precision
    assert both.variants["plain-nhwc"].precisions is None
    flat, cells = _planned(FLAT)
    assert set(flat.variants) == {"tiny", "tiny-O0"} and flat.variants["tiny"].layout is None


def test_throughput_at_the_examples_batch_adds_dynamic_fp32_and_another_batch_replaces_static():
    planned, cells = _planned(MODEL, objective="throughput", plain=False)
    dynamic = {i: c.options.dynamic_batch for i, c in cells.items() if c.options.dynamic_batch}
    assert set(dynamic) == {"plain-dynbatch/onnx/fp32", "plain-dynbatch/openvino/fp32", "plain-dynbatch/pt2/fp32",
                            "plain-nhwc-dynbatch/onnx/fp32", "plain-nhwc-dynbatch/openvino/fp32"}  # fmt: skip
    assert set(dynamic.values()) == {"1:2"} and "plain/onnx/fp32" in cells and "plain/tflite/int8" in cells
    tflite = [s for s in planned.skipped if s["target"] == "tflite" and "batch=1:2" in s.get("variant", "")]
    assert tflite and "needs static shapes" in tflite[0]["reason"]
    latency, _ = _planned(MODEL, plain=False)
    assert not any(v.batch_range for v in latency.variants.values())  # the default latency tune: no dynamic
    other, cells = _planned(MODEL, batch=8)
    assert cells and all(c.options.dynamic_batch == "1:8" for c in cells.values()) and other.batch == 8
    assert not any(i.startswith("plain/tflite") for i in cells)
    static = [s for s in other.skipped if s.get("variant") == "static batch 2"]
    assert static and "built with a dynamic batch 1:8 instead" in static[0]["reason"]


def test_what_each_target_refuses_of_a_variant():
    """NHWC where a target has no NHWC I/O, a dynamic batch on a static-shape target, and a static build of a
    target whose batch is fixed (the Edge TPU's 1) to be timed at another batch."""
    from kiln.targets import get_target

    edgetpu, pt2, onnx = get_target("edgetpu"), get_target("pt2"), get_target("onnx")
    assert "builds only at batch 1" in (Variant("nchw").refusal(edgetpu, 2) or "")
    assert Variant("nhwc").refusal(edgetpu, 1) is None and Variant("nhwc", "1:4").refusal(onnx, 4) is None
    assert "needs static shapes" in (Variant("nchw", "1:4").refusal(edgetpu, 4) or "")
    assert "takes no NHWC I/O" in (Variant("nhwc").refusal(pt2, 2) or "")
    assert Variant(None, "1:4").refusal(pt2, 4) is None


def test_a_matrix_cell_takes_io_nhwc_and_refuses_another():
    from kiln.compiler.errors import UsageError
    from kiln.compiler.matrix.config import CellOptions

    assert CellOptions().merged({"io": "nhwc"}, "m").export_settings()["io"] == "nhwc"
    assert "io" not in CellOptions().export_settings()
    with pytest.raises(UsageError, match="io = 'nchw' is not valid"):
        CellOptions().merged({"io": "nchw"}, "m")


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        (MODEL, ("--batch", "0"), f"--batch 0: must be from 1 to {MAX_BATCH}"),
        (MODEL, ("--batch", "-1"), f"--batch -1: must be from 1 to {MAX_BATCH}"),
        (MODEL, ("--batch", str(MAX_BATCH + 1)), f"--batch {MAX_BATCH + 1}: must be from 1"),
        (MODEL, ("--io", "foo"), "--io 'foo': not a layout list"),
        (MODEL, ("--io", ","), "--io ',': not a layout list"),
        (FLAT, ("--io", "nhwc"), "--io nhwc: the model has no image input"),
        (MODEL, ("--targets", "tflite", "--batch", "4"), "no candidates: tflite needs static shapes"),
    ],
)
def test_bad_input_is_one_line_exit_2(model, args, message, tmp_path, capsys):
    code, _, err = run_cli("tune", model, "--out", tmp_path / "o", *args, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "builds").exists()
