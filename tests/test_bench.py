"""`kiln bench`: real exports timed in worker processes, interleaved rounds, bench.json, and its errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from kiln.compiler.export.options import ExportOptions, export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.perf.bench_report import SPREAD_LIMIT, latency_stats, spread, too_wide
from kiln.compiler.perf.bench_worker import WorkerFailed
from kiln.compiler.perf.benchmark import MAX_RUNS, BenchOptions, interleave, rotation, runs_per_round
from kiln.compiler.types import BENCH_FILE, MANIFEST_NAME

from tests.conftest import run_cli

QUICK = ("--rounds", "3", "--runs", "5", "--warmup", "2")


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    """zoo:cnn exported to onnx and openvino (static batch)."""
    out = tmp_path_factory.mktemp("bench") / "cnn"
    results = export_targets("zoo:cnn", "onnx,openvino", out, ExportOptions())
    assert all(r.published for r in results)
    return out


@pytest.fixture(scope="module")
def dynamic_cnn(tmp_path_factory):
    """zoo:cnn exported to onnx with --dynamic-batch 1:8."""
    out = tmp_path_factory.mktemp("bench-dynamic") / "cnn"
    (result,) = export_targets("zoo:cnn", "onnx", out, export_options(dynamic_batch="1:8"))
    assert result.published
    return out


def test_bench_json_report_and_verify_after(cnn_export, tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("not kiln's")
    planted = cnn_export / "onnx" / BENCH_FILE
    planted.symlink_to(outside)  # a link leading out of the export: the export is refused, nothing written through
    code, _, err = run_cli("bench", cnn_export, "--json", "--threads", "1", *QUICK, capsys=capsys)
    assert code == 2 and f"{planted} is a symbolic link leading outside" in err, err
    planted.unlink()
    manifest = (cnn_export / "onnx" / "manifest.json").read_text()
    planted.symlink_to("manifest.json")  # one that stays inside: replaced, never written through
    code, out, err = run_cli("bench", cnn_export, "--json", "--threads", "1", *QUICK, capsys=capsys)
    assert code == 0, err
    assert (cnn_export / "onnx" / "manifest.json").read_text() == manifest
    result = json.loads(out)
    assert result["settings"] == {"threads": 1, "rounds": 3, "runs": 5, "min_round_ms": 0.0, "warmup": 2, "batch": None}
    assert result["timed_on"]["cores"] and result["built_on"]["cpu"]
    records = {r["name"]: r for r in result["candidates"]}
    assert set(records) == {"onnx", "openvino"}
    for record in records.values():
        latency = record["latency_ms"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"]
        assert latency["mean"] > 0 and record["timed_runs"] == 15 and len(record["round_medians_ms"]) == 3
        assert record["spread"] >= 1.0 and record["spread_too_wide"] == (record["spread"] > SPREAD_LIMIT)
        assert record["threads_asked"] == 1 and record["thread_control"]
        assert record["load_s"] > 0 and record["first_inference_ms"] > 0 and record["peak_rss_mib"] > 0
        assert record["artifact_bytes"] > 0 and record["batch"] == 1 and record["throughput_items_per_s"] > 0
        assert record["failure"] is None
    assert records["openvino"]["runtime_info"]["threads"] == 1  # the runtime's own report of the threads it used
    assert records["openvino"]["runtime_info"]["inference_precision"] == "f32"
    assert "round 3/3" in err
    written = json.loads((cnn_export / "onnx" / BENCH_FILE).read_text())
    assert written["candidate"] == "onnx" and not (cnn_export / "onnx" / BENCH_FILE).is_symlink()
    assert outside.read_text() == "not kiln's"
    assert [p.name for p in (cnn_export / "openvino").iterdir() if p.name.startswith(".")] == []  # no temp files
    code, out, _ = run_cli("verify", cnn_export, capsys=capsys)
    assert code == 0 and out.count("PASSED") == 2


def test_verify_still_refuses_other_unlisted_files(cnn_export, tmp_path, capsys):
    copy = tmp_path / "onnx"
    shutil.copytree(cnn_export / "onnx", copy)
    (copy / "bench.json.bak").write_text("{}")
    code, _, err = run_cli("verify", copy, capsys=capsys)
    assert code == 2 and "bench.json.bak is not in the manifest" in err


def test_table_on_the_terminal(cnn_export, capsys):
    code, out, err = run_cli("bench", cnn_export / "openvino", "--no-write", *QUICK, capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("kiln bench on ") and "threads: runtime default" in lines[0]
    assert lines[1].split()[:4] == ["candidate", "p50", "ms", "p90"]
    assert lines[2].startswith("openvino ") and "via openvino INFERENCE_NUM_THREADS" in out
    code, out, err = run_cli("bench", cnn_export / "onnx", "-q", "--no-write", *QUICK, capsys=capsys)
    assert code == 0 and out == "" and err == ""


def test_compare_eager_gives_a_ratio_per_candidate(cnn_export, capsys):
    code, out, err = run_cli(
        "bench", cnn_export, "--compare-eager", "--threads", "2", "--json", "--no-write", *QUICK, capsys=capsys
    )
    assert code == 0, err
    records = {r["name"]: r for r in json.loads(out)["candidates"]}
    assert set(records) == {"onnx", "openvino", "pytorch eager", "torch.compile"}
    assert records["pytorch eager"]["speedup_vs_eager"] == 1.0
    assert records["pytorch eager"]["runtime_info"]["threads"] == 2 and records["pytorch eager"]["model"] == "zoo:cnn"
    for name in ("onnx", "openvino"):
        assert records[name]["speedup_vs_eager"] > 0
    compiled = records["torch.compile"]
    assert compiled["failure"] or compiled["speedup_vs_eager"] > 0  # timed, or left out with the reason


def test_batch_inside_and_outside_the_dynamic_range(dynamic_cnn, cnn_export, capsys):
    code, out, err = run_cli("bench", dynamic_cnn, "--batch", "8", "--json", "--no-write", *QUICK, capsys=capsys)
    assert code == 0, err
    (record,) = json.loads(out)["candidates"]
    assert record["batch"] == 8
    assert record["throughput_items_per_s"] == pytest.approx(8000 / record["latency_ms"]["p50"])
    code, _, err = run_cli("bench", dynamic_cnn, "--batch", "9", capsys=capsys)
    assert code == 2 and "outside the dynamic batch range 1:8" in err and "hint" in err and len(err.splitlines()) == 1
    code, _, err = run_cli("bench", cnn_export, "--batch", "4", capsys=capsys)
    assert code == 2 and "static input shapes" in err and "--dynamic-batch" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--threads", "0"), "--threads 0: must be at least 1"),
        (("--runs", "0"), "--runs 0: must be at least 1"),
        (("--rounds", "0"), "--rounds 0: must be at least 1"),
        (("--model", "zoo:cnn"), "--model is only used with --compare-eager"),
    ],
)
def test_bad_counts_are_usage_errors(cnn_export, argv, message, capsys):
    code, _, err = run_cli("bench", cnn_export, *argv, capsys=capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_not_an_export_or_rejected_or_missing_backend(cnn_export, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli("bench", tmp_path / "nothing", capsys=capsys)
    assert code == 2 and "does not exist" in err
    rejected = tmp_path / "out" / ".rejected" / "onnx"
    shutil.copytree(cnn_export / "onnx", rejected)
    manifest = json.loads((rejected / MANIFEST_NAME).read_text())
    (rejected / MANIFEST_NAME).write_text(json.dumps(manifest | {"published": False}))
    code, _, err = run_cli("bench", rejected, capsys=capsys)
    assert code == 2 and "rejected build" in err
    code, _, err = run_cli("bench", tmp_path / "out", capsys=capsys)
    assert code == 2 and "only rejected builds" in err
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on a machine without the package
    code, _, err = run_cli("bench", cnn_export, capsys=capsys)
    assert code == 3 and "cannot run the openvino export" in err and len(err.splitlines()) == 1


def test_compare_eager_needs_a_loadable_source(cnn_export, tmp_path, capsys):
    copy = tmp_path / "onnx"
    shutil.copytree(cnn_export / "onnx", copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["source"]["description"] = str(tmp_path / "gone.py:build")
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = run_cli("bench", copy, "--compare-eager", capsys=capsys)
    assert code == 2 and "pass --model SOURCE" in err and len(err.splitlines()) == 1


def test_compare_eager_never_runs_python_code_named_only_by_the_manifest(cnn_export, tmp_path, capsys):
    planted = tmp_path / "planted.py"
    planted.write_text("open(__file__ + '.ran', 'w').close()\n")
    copy = tmp_path / "onnx"
    shutil.copytree(cnn_export / "onnx", copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["source"]["description"] = f"{planted}:build"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = run_cli("bench", copy, "--compare-eager", capsys=capsys)
    assert code == 2 and f"pass --model {planted}:build" in err
    assert not (tmp_path / "planted.py.ran").exists()


def test_torch_compile_too_slow_is_left_out_and_the_rest_goes_on(cnn_export, capsys):
    code, out, err = run_cli(
        "bench",
        cnn_export / "onnx",
        "--compare-eager",
        "--compile-timeout",
        "0.5",
        "--json",
        "--no-write",
        *QUICK,
        capsys=capsys,
    )
    assert code == 0, err
    records = {r["name"]: r for r in json.loads(out)["candidates"]}
    assert records["torch.compile"]["failure"] == "too slow to compile (over 0.5 s)"
    assert "latency_ms" not in records["torch.compile"] and "torch.compile left out: too slow" in err
    assert records["onnx"]["speedup_vs_eager"] > 0


class Recording:
    """A scheduler-side stand-in for a worker process: records the order its calls arrive in."""

    def __init__(self, name: str, calls: list[str], fail_at: int | None = None):
        self.name, self.calls, self.fail_at = name, calls, fail_at

    def time(self, runs: int, warmup: int = 0) -> list[float]:
        if self.fail_at is not None and sum(c == self.name for c in self.calls) == self.fail_at:
            raise WorkerFailed("its process exited with status -9")
        self.calls.append(self.name)
        return [1.0] * runs


def test_interleaving_rotates_the_order_every_round():
    calls: list[str] = []
    workers = [Recording(n, calls) for n in "abc"]
    times, failed = interleave(workers, rounds=4, runs=2)
    assert calls == list("abcbcacababc")
    assert failed == {} and [len(t) for t in times] == [4, 4, 4] and times[0][0] == [1.0, 1.0]
    assert rotation(3, 5) == [2, 0, 1]


def test_a_worker_failing_mid_run_is_skipped_and_reported():
    calls: list[str] = []
    workers = [Recording("a", calls), Recording("b", calls, fail_at=1)]
    times, failed = interleave(workers, rounds=3, runs=1)
    assert calls == ["a", "b", "a", "a"]
    assert failed == {1: "its process exited with status -9"} and [len(t) for t in times] == [3, 1]


def test_a_minimum_round_time_gives_a_fast_model_more_runs():
    tune = BenchOptions(runs=10, min_round_ms=50.0)
    assert runs_per_round(0.1, tune) == 500 and runs_per_round(20.0, tune) == 10  # never fewer than --runs
    assert runs_per_round(1e-6, tune) == MAX_RUNS and runs_per_round(float("nan"), tune) == 10
    assert runs_per_round(0.1, BenchOptions(runs=10)) == 10  # kiln bench: exactly --runs


def test_spread_and_its_flag():
    assert spread([2.0]) is None and not too_wide(None)
    assert spread([1.0, 1.1, 1.2]) == pytest.approx(1.2) and not too_wide(1.2)
    assert too_wide(SPREAD_LIMIT + 0.01) and not too_wide(SPREAD_LIMIT)
    drifted = latency_stats([[1.65] * 5, [2.0] * 5, [2.66] * 5])  # the drift seen on this machine in one minute
    assert drifted["spread"] == pytest.approx(2.66 / 1.65) and drifted["spread_too_wide"]
    steady = latency_stats([[1.0, 1.1, 3.0], [1.05, 1.0, 1.1]])
    assert steady["spread_too_wide"] is False and steady["latency_ms"]["p50"] == pytest.approx(1.075)
    assert steady["latency_ms"]["p99"] <= 3.0 and steady["timed_runs"] == 6


def test_a_worker_dying_in_the_middle_of_the_rounds_fails_the_command(cnn_export, monkeypatch, capsys):
    """Regression: the report recorded the failure but `kiln bench` exited 0. The first worker's real process is
    killed before its second timed round; the others finish, the report is printed, and the exit code is 1 (the
    candidate failed, as one that fails parity; it was 4, an internal error, before issue 24)."""
    from kiln.compiler.perf.bench_worker import Worker

    original, calls = Worker.time, {}

    def time_then_die(self, runs, warmup=0):
        calls[id(self)] = calls.get(id(self), 0) + 1
        if id(self) == next(iter(calls)) and calls[id(self)] == 3:  # warm-up, round 1, killed before round 2
            self.kill()
        return original(self, runs, warmup)

    monkeypatch.setattr(Worker, "time", time_then_die)
    code, out, err = run_cli("bench", cnn_export, *QUICK, "--json", "--no-write", capsys=capsys)
    assert code == 1, err
    records = {r["name"]: r for r in json.loads(out)["candidates"]}
    failed = [r for r in records.values() if r["failure"]]
    assert len(failed) == 1 and failed[0]["failure"].startswith("failed while timed: its process exited")
    assert f"kiln: error: {failed[0]['name']}: failed while timed" in err
    assert all("latency_ms" in r for r in records.values() if not r["failure"])


def test_bench_passes_calls_a_level_slower_than_O0_only_outside_the_noise():
    from benchmarks.bench_passes import slower_check, verdict

    assert verdict([1.20, 1.15, 1.30]) == "slower"  # slower in every round, by more than the noise
    assert verdict([1.20, 0.98, 1.30]) == "within noise"  # one round says faster: the rounds disagree
    assert verdict([1.02, 1.03, 1.01]) == "within noise"  # always slower, but by less than NOISE
    assert verdict([0.80, 0.85, 0.90]) == "faster" and verdict([1.5]) == "one round: no verdict"
    rows = [
        {"model": "m", "runtime": "onnx", "level": 0, "ratio_rounds": [1.0, 1.0], "verdict_vs_O0": "within noise"},
        {"model": "m", "runtime": "onnx", "level": 2, "ratio_rounds": [1.2, 1.3], "verdict_vs_O0": "slower"},
    ]
    lines, ok = slower_check(rows)
    assert not ok and lines == ["m onnx -O2: ms/-O0 median 1.250 [1.200, 1.300] over 2 rounds: slower"]
    rows[1] |= {"ratio_rounds": [0.7, 0.8], "verdict_vs_O0": "faster"}
    assert slower_check(rows)[1]
