"""`kiln tune`: candidates built as matrix cells (resumable), verified, timed in interleaved rounds, the winner
published to OUT/best, the leaderboards; a candidate that fails parity is rejected; its errors.

One tune run is shared: tests/models/planted.py:overflow on onnx at fp32 and fp16 (fp16 overflows: a real parity
failure, planted in the model), with the plain -O0 export and ONNX Runtime's runtime settings. It is started in a
process that is killed after its first build, then resumed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kiln.compiler.matrix.results import PASSED, CellResult, read_results
from kiln.compiler.perf.tune import MIN_ROUND_MS, TuneOptions, run_tune
from kiln.compiler.perf.tune_report import choose, publish, rank
from kiln.compiler.progress import Progress
from kiln.compiler.types import Manifest
from kiln.targets import get_target
from kiln.targets.base import RuntimeSettings

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "tests" / "models" / "planted.py") + ":overflow"
# --io nchw: the NHWC candidates (tests/test_tune_shapes.py) are left out here, to keep this run's three builds
ARGS = ("--targets", "onnx", "--precisions", "fp32,fp16", "--rounds", "2", "--runs", "3", "--warmup", "1",
        "--io", "nchw")  # fmt: skip
OPTIONS = TuneOptions(targets=("onnx",), precisions=("fp32", "fp16"), rounds=2, runs=3, warmup=1, io=("nchw",))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(out, board, progress text of the resumed run, the results the killed run had finished)."""
    out = tmp_path_factory.mktemp("tune") / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "tune", MODEL, "--out", str(out), *ARGS, "-q"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = out / "builds" / "results.jsonl"
    deadline = time.monotonic() + 600
    while not (results.is_file() and results.read_text().count("\n") >= 1) and process.poll() is None:
        assert time.monotonic() < deadline, "the first build did not finish in 10 minutes"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the tune and its cell processes
    process.wait()
    finished = read_results(results)
    stream = io.StringIO()
    board = run_tune(MODEL, out, OPTIONS, Progress(stream=stream))
    return out, board, stream.getvalue(), finished


def test_leaderboard_ranks_and_best_passes_verify(tuned, capsys):
    out, _, _, _ = tuned
    for name in ("leaderboard.md", "leaderboard.json", "leaderboard.html"):
        assert (out / name).is_file()
    stored = json.loads((out / "leaderboard.json").read_text())
    ranked = stored["candidates"]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert [r["p50_ms"] for r in ranked] == sorted(r["p50_ms"] for r in ranked)
    # --rounds 2 --runs 3, but a round of a fast model lasts MIN_ROUND_MS: not 3 runs inside one scheduler tick
    fast = [r for r in ranked if r["p50_ms"] < MIN_ROUND_MS / 10]
    assert fast and all(r["timed_runs"] >= 2 * 10 for r in fast), [(r["p50_ms"], r["timed_runs"]) for r in fast]
    names = {r["name"] for r in ranked}
    assert {"onnx fp32", "onnx fp32 -O0", "onnx fp32 [graph-optimization=basic]"} <= names  # the plain export too
    assert stored["winner"]["name"] in names and stored["why"] and set(stored["pareto"]) <= names
    assert "Winner:" in (out / "leaderboard.md").read_text()
    page = (out / "leaderboard.html").read_text()
    assert "<svg" in page and "Pareto" in page and "<script" not in page
    manifest = Manifest.read(out / "best")
    tune = manifest.target_info["tune"]
    assert tune["chosen_by"] == "kiln tune" and tune["candidate"] == stored["winner"]["name"]
    assert tune["from_candidates"] == len(ranked) + len(stored["rejected"]) and tune["why"] == stored["why"]
    code, text, err = run_cli("verify", out / "best", capsys=capsys)
    assert code == 0, err + text


def test_a_candidate_failing_parity_is_rejected_with_its_reason(tuned):
    _, board, _, _ = tuned
    rejected = {r["name"]: r["rejected"] for r in board["rejected"]}
    assert "parity failed" in rejected["onnx fp16"] and "cosine" in rejected["onnx fp16"]
    assert all(r["precision"] == "fp32" for r in board["candidates"])
    assert board["winner"]["precision"] == "fp32"


def test_a_killed_tune_resumes_without_rebuilding(tuned):
    out, _, text, finished = tuned
    assert finished, "the killed run had finished no build"
    assert f"{len(finished)} already done" in text
    after = read_results(out / "builds" / "results.jsonl")
    for key, result in finished.items():
        assert after[key].started_at == result.started_at  # not built again
    assert len(after) == 3  # fp32, fp16 and the plain fp32


def test_runtime_settings_reach_the_runtime_and_the_published_manifest(tuned, tmp_path, capsys):
    """A winner with a runtime setting is published with it in its runtime_config; verify loads it so."""
    from kiln.compiler.export.artifacts import Artifact, load_runner
    from kiln.compiler.perf.tune_candidates import Entry

    _, board, _, _ = tuned
    row = next(r for r in board["candidates"] if r["runtime_settings"] == {"graph_optimization": "basic"})
    directory = Path(row["directory"])
    settings = RuntimeSettings(graph_optimization="basic")
    runner = load_runner(Artifact.read(directory), settings=settings)
    assert runner.runtime_info()["graph_optimization"] == "basic"
    assert load_runner(Artifact.read(directory)).runtime_info()["graph_optimization"] == "all"
    build = CellResult("m/onnx/fp32", "m", MODEL, "onnx", "fp32", PASSED, min_cosine=1.0)
    entry = Entry(row["name"], "onnx", "fp32", False, settings, None, build, directory)
    publish(entry, tmp_path / "best", board | {"why": "test"})
    manifest = Manifest.read(tmp_path / "best")
    assert manifest.runtime_config["graph_optimization_level"] == "basic"
    assert manifest.target_info["tune"]["runtime_settings"] == {"graph_optimization": "basic"}
    code, text, err = run_cli("verify", tmp_path / "best", capsys=capsys)
    assert code == 0, err + text
    ov = get_target("openvino").with_runtime_settings(
        Manifest.read(tmp_path / "best"), RuntimeSettings(performance_hint="THROUGHPUT", inference_precision="default")
    )
    assert ov.runtime_config["PERFORMANCE_HINT"] == "THROUGHPUT" and "INFERENCE_PRECISION_HINT" not in ov.runtime_config


def _entry(name: str, precision: str, rounds: list[float], cosine: float):
    import statistics

    from kiln.compiler.perf.tune_candidates import Entry

    build = CellResult(f"m/onnx/{precision}", "m", "zoo:cnn", "onnx", precision, PASSED, min_cosine=cosine)
    p50 = statistics.median(rounds)
    timing = {"latency_ms": {"p50": p50, "p90": max(rounds)}, "round_medians_ms": rounds,
              "spread": max(rounds) / min(rounds), "throughput_items_per_s": 1000 / p50}  # fmt: skip
    return Entry(name, "onnx", precision, False, RuntimeSettings(), None, build, Path("."), timing=timing)


def test_a_winner_inside_the_noise_is_a_tie_and_the_simpler_one_wins():
    """int8 faster in most rounds but not all: a tie, fp32 (simpler, more accurate) wins; int8 faster in every
    round by more than the floor: int8 wins; a noisy slow fp32 is not tied with a steady fast int8."""
    int8, fp32 = _entry("int8", "int8", [0.95, 0.9, 1.05], 0.999), _entry("fp32", "fp32", [1.0, 1.0, 1.0], 1.0)
    tie = rank([int8, fp32], "latency")
    assert tie["winner"]["name"] == "fp32" and tie["why"].startswith("tie:")
    int8, fp32 = _entry("int8", "int8", [0.5, 0.6, 0.5], 0.999), _entry("fp32", "fp32", [1.0, 1.0, 1.0], 1.0)
    clear = rank([int8, fp32], "latency")
    assert clear["winner"]["name"] == "int8" and not clear["why"].startswith("tie")
    assert clear["pareto"] == ["int8", "fp32"]  # faster but less accurate, and slower but more accurate
    tflite, openvino = _entry("tflite", "fp32", [1.0, 1.3, 1.0], 0.99999990), _entry("ov", "fp32", [1.2, 1.2, 1.2], 1.0)
    assert rank([tflite, openvino], "latency")["winner"]["name"] == "tflite"  # a 1e-7 cosine is no reason to be slower
    noisy = _entry("fp32", "fp32", [0.3, 1.0, 3.0], 1.0)  # spread 10: within it, but slower in every round
    assert rank([_entry("int8", "int8", [0.1, 0.12, 0.1], 0.999), noisy], "latency")["winner"]["name"] == "int8"


def test_choose_applies_the_tie_rule_to_the_rows_of_one_precision():
    """What bench_tune reads from a leaderboard: the best fp32 row by the tie rule with the faster int8 left out;
    ort is within the noise of ov (tied, equally simple and accurate to 6 digits: the faster wins), slow is not."""
    rows = rank([_entry("int8", "int8", [0.5, 0.5, 0.5], 0.999), _entry("ov", "fp32", [1.0, 1.3, 1.0], 0.9999999),
                 _entry("ort", "fp32", [1.1, 1.1, 1.1], 1.0), _entry("slow", "fp32", [2.0, 2.0, 2.0], 1.0)],
                "latency")["candidates"]  # fmt: skip
    winner, tied = choose([r for r in rows if r["precision"] == "fp32"], "latency")
    assert winner["name"] == "ov" and [r["name"] for r in tied] == ["ov", "ort"]
    assert choose([r for r in rows if r["precision"] == "int8"], "latency")[0]["name"] == "int8"


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("zoo:cnn", ("--objective", "fastest"), "--objective 'fastest' is unknown"),
        ("zoo:cnn", ("--targets", "onnx", "--precisions", "int4"), "no candidates"),
        ("zoo:cnn", ("--min-cosine", "nan"), "--min-cosine nan"),
        ("zoo:cnn", ("--threads", "two"), "--threads 'two'"),
        ("zoo:nope", (), "no built-in model 'zoo:nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2(model, args, message, tmp_path, capsys):
    code, _, err = run_cli("tune", model, "--out", tmp_path / "o", *args, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "builds").exists()


def test_runtime_variants_default_first_and_only_what_applies():
    import openvino as ov

    onnx = get_target("onnx").runtime_variants("fp32")
    assert onnx[0].is_default and RuntimeSettings(graph_optimization="basic") in onnx
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    int8 = get_target("openvino").runtime_variants("int8")  # nncf.quantize's default: the rest in bf16
    assert int8[0].is_default and any(v.inference_precision == "default" for v in int8) == has_bf16
    bf16 = get_target("openvino").runtime_variants("bf16")  # already the CPU's own precision
    assert all(v.inference_precision is None for v in bf16)
    fp32 = get_target("openvino").runtime_variants("fp32")
    assert any(v.inference_precision == "default" for v in fp32) == has_bf16  # elsewhere it is f32 anyway
    assert {v.performance_hint for v in fp32} == {None, "LATENCY", "THROUGHPUT"}


def test_a_setting_rechecked_by_the_gate_reports_the_accuracy_it_measured(tuned):
    """A runtime setting that may change the numbers (OpenVINO's CPU-default precision) is validated again; the
    leaderboard and the tie rule must use that measurement, not the build's (bf16 showed cosine 1.000000)."""
    from kiln.compiler.perf.tune import _parity_with_settings
    from kiln.compiler.perf.tune_candidates import Entry
    from kiln.compiler.perf.tune_report import _row
    from kiln.compiler.progress import Progress

    _, board, _, _ = tuned
    row = next(r for r in board["candidates"] if r["runtime_settings"] == {"graph_optimization": "basic"})
    build = CellResult("m/onnx/fp32", "m", MODEL, "onnx", "fp32", PASSED, min_cosine=0.5, max_abs_error=9.0)
    entry = Entry(row["name"], "onnx", "fp32", False, RuntimeSettings(graph_optimization="basic"), None, build,
                  Path(row["directory"]))  # fmt: skip
    assert _parity_with_settings(entry, Progress(quiet=True)) is None
    measured = _row(entry)
    assert measured["min_cosine"] > 0.9999 and measured["max_abs_error"] < 1e-4
