"""`kiln matrix`: real cell processes (crashing, hanging, out of memory), resume after a real kill, shards and
merge, the cache, baselines, the four reports (the HTML in a real headless browser) and the Ray executor."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from kiln.compiler.matrix.cell_cache import CellCache
from kiln.compiler.matrix.results import CellResult, append_result, read_results, repair_results
from kiln.compiler.pages import STYLE

from tests.browser import fits_the_window, render
from tests.conftest import ROOT, run_cli

MODELS = ROOT / "tests" / "models" / "matrix_models.py"
FAST = ["--repeat", "3", "--warmup", "1"]
CONFIG = f"""
targets = ["onnx", "pt2"]
jobs = 2

[[models]]
source = "{MODELS}:tiny"

[[models]]
source = "{MODELS}:crash"
targets = ["onnx"]

[[models]]
source = "{MODELS}:hang"
targets = ["onnx"]
timeout = 15

[[models]]
source = "{MODELS}:memory_hog"
targets = ["onnx"]
memory_limit_gb = 4

[[models]]
source = "{MODELS}:drifting"
targets = ["pt2"]

[[models]]
source = "@ONNX@"
name = "tinyonnx"

[[cells]]
match = "drifting/*"
expect = "fail"
"""
UNEXPECTED = {"crash/onnx/fp32", "hang/onnx/fp32", "memory_hog/onnx/fp32"}
ALL_CELLS = {
    "crash/onnx/fp32",
    "drifting/pt2/fp32",
    "hang/onnx/fp32",
    "memory_hog/onnx/fp32",
    "tiny/onnx/fp32",
    "tiny/pt2/fp32",
    "tinyonnx/onnx/fp32",
    "tinyonnx/pt2/fp32",
}


def _write_onnx(path: Path) -> None:
    """A small ONNX model (MatMul + Relu), written with onnx.helper: an .onnx source."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "matrix", "--config", str(config), "--out", str(out), *FAST, *extra]


def _lines(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def _cells(out: Path) -> dict[str, dict]:
    return {c["cell_id"]: c for c in json.loads((out / "report.json").read_text())["cells"]}


def _comparable(report: dict) -> dict:
    """A report without what changes from run to run (timings, clocks, places, how it was sharded)."""
    return {
        "summary": report["summary"],
        "models": report["models"],
        "columns": report["columns"],
        "cells": [CellResult.from_dict(c).comparable() | {"allowed": c["allowed_to_fail"]} for c in report["cells"]],
    }


def _own_processes(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (a path unique to one test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory):
    """The test matrix run as CI would: killed (SIGKILL) once two cells have finished, then re-run to the end."""
    root = tmp_path_factory.mktemp("matrix")
    _write_onnx(root / "tiny.onnx")
    config = root / "matrix.toml"
    config.write_text(CONFIG.replace("@ONNX@", str(root / "tiny.onnx")))
    out, cache = root / "out", root / "cache"
    command = _command(config, out, "--cache-dir", str(cache))
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # the not-applicable cell (tinyonnx on pt2) is recorded at once; wait for two cells that really ran
    while len(_lines(out)) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.kill()
    first.wait()
    before_kill = _lines(out)
    time.sleep(0.5)
    orphans = _own_processes(str(out))
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {
        "root": root,
        "config": config,
        "out": out,
        "cache": cache,
        "before_kill": before_kill,
        "orphans": orphans,
        "second": second,
        "report": json.loads((out / "report.json").read_text()),
    }


def test_every_cell_ends_in_a_status_and_the_run_completes(matrix_run):
    report = matrix_run["report"]
    cells = {c["cell_id"]: c for c in report["cells"]}
    assert set(cells) == ALL_CELLS
    assert cells["tiny/onnx/fp32"]["status"] == "passed" and cells["tiny/pt2/fp32"]["status"] == "passed"
    assert cells["tinyonnx/onnx/fp32"]["status"] == "passed"
    assert cells["tinyonnx/onnx/fp32"]["reference"].startswith("onnxruntime")
    assert cells["tinyonnx/pt2/fp32"]["status"] == "unavailable"
    assert "needs a PyTorch model" in cells["tinyonnx/pt2/fp32"]["reason"]
    assert cells["drifting/pt2/fp32"]["status"] == "parity_failed" and cells["drifting/pt2/fp32"]["allowed_to_fail"]
    assert report["summary"]["passed"] == 3 and report["summary"]["unexpected_failures"] == 3
    assert set(report["summary"]["unexpected_failure_ids"]) == UNEXPECTED
    assert matrix_run["second"].returncode == 1, matrix_run["second"].stderr


def test_figures_of_a_passed_cell(matrix_run):
    cell = _cells(matrix_run["out"])["tiny/onnx/fp32"]
    assert 0 <= cell["max_abs_error"] < 1e-5 and cell["min_cosine"] > 0.9999
    assert cell["artifact_bytes"] > 8 * 16 * 4  # at least the weights of fc1
    assert cell["latency_ms"] > 0 and cell["reference_ms"] > 0
    assert cell["speedup"] == pytest.approx(cell["reference_ms"] / cell["latency_ms"])
    assert cell["threads"] == 2 and cell["runtime"]["runtime"].startswith("onnxruntime")
    assert cell["versions"]["onnxruntime"] != "not installed"
    assert re.fullmatch(r"[0-9a-f]{64}", cell["state_hash"]) and re.fullmatch(r"[0-9a-f]{64}", cell["key"])


def test_a_crashing_converter_fails_its_own_cell(matrix_run):
    cell = _cells(matrix_run["out"])["crash/onnx/fp32"]
    assert cell["status"] == "conversion_failed" and cell["failure"] == "crash"
    assert cell["exit_code"] == -signal.SIGSEGV
    assert "SIGSEGV" in cell["reason"] and "capture" in cell["reason"]
    assert "[kiln] capture" in cell["stderr_tail"]


def test_a_hanging_converter_is_killed_at_its_time_limit(matrix_run):
    cell = _cells(matrix_run["out"])["hang/onnx/fp32"]
    assert cell["status"] == "conversion_failed" and cell["failure"] == "timeout"
    assert "timed out after 15s during: capture" in cell["reason"]
    assert 15 <= cell["duration_s"] < 40
    assert not _own_processes(str(matrix_run["out"]))  # nothing of the run is left behind
    cell_dir = Path(cell["cell_dir"])
    assert {p.name for p in cell_dir.iterdir()} == {"job.json", "cell.log"}  # nor its temporary files


def test_the_memory_limit_fails_a_cell_that_maps_too_much(matrix_run):
    cell = _cells(matrix_run["out"])["memory_hog/onnx/fp32"]
    assert cell["status"] == "conversion_failed" and cell["failure"] == "out_of_memory"
    assert "limit 4 GiB" in cell["reason"] and "MemoryError" in cell["reason"]


def test_a_killed_run_resumes_without_rerunning_finished_cells(matrix_run):
    before = {line["cell_id"]: line for line in matrix_run["before_kill"]}
    assert 3 <= len(before) < len(ALL_CELLS)  # killed midway
    assert matrix_run["orphans"] == []  # the cells running at the kill died with the run
    after = _lines(matrix_run["out"])
    ids = [line["cell_id"] for line in after]
    assert sorted(ids) == sorted(ALL_CELLS)  # every cell exactly once: none finished before the kill re-ran
    for cell_id, line in before.items():
        assert after[ids.index(cell_id)]["finished_at"] == line["finished_at"]
    assert f"{len(before)} already done" in matrix_run["second"].stderr


def test_rerunning_the_finished_command_runs_nothing(matrix_run, capsys):
    out, config = matrix_run["out"], matrix_run["config"]
    lines = len(_lines(out))
    code, _, err = run_cli("matrix", "--config", config, "--out", out, *FAST, "--cache-dir", matrix_run["cache"],
                           capsys=capsys)  # fmt: skip
    assert code == 1
    assert f"{len(ALL_CELLS)} already done" in err and "0 to run" in err
    assert len(_lines(out)) == lines


def _copy_out(matrix_run, name: str) -> Path:
    out = matrix_run["root"] / name
    shutil.copytree(matrix_run["out"], out)
    return out


def test_a_torn_last_line_is_dropped_and_its_cell_runs_again(matrix_run, capsys):
    out = _copy_out(matrix_run, "torn")
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    torn = next(line for line in lines if json.loads(line)["cell_id"] == "tiny/onnx/fp32")
    # a run killed while appending tiny/onnx/fp32: half of its line, no newline
    path.write_text("".join(line + "\n" for line in lines if line != torn) + torn[: len(torn) // 2])
    code, _, err = run_cli("matrix", "--config", matrix_run["config"], "--out", out, *FAST, "--no-cache",
                           capsys=capsys)  # fmt: skip
    assert code == 1
    assert "its last line was cut short" in err and "dropped it: cell tiny/onnx/fp32 will run again" in err
    assert f"{len(ALL_CELLS) - 1} already done, 0 from the cache, 1 to run" in err
    after = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert path.read_text().endswith("\n")
    assert sorted(line["cell_id"] for line in after) == sorted(ALL_CELLS)
    rerun = after[-1]
    assert rerun["cell_id"] == "tiny/onnx/fp32" and rerun["status"] == "passed" and not rerun["cached"]
    assert rerun["finished_at"] != json.loads(torn)["finished_at"]
    assert _cells(out)["tiny/onnx/fp32"]["status"] == "passed"


def test_results_lines_of_the_wrong_shape_are_ignored_with_a_warning(matrix_run, capsys):
    out = _copy_out(matrix_run, "hostile")
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["cell_id"] != "tinyonnx/pt2/fp32"]
    forged = json.loads(next(line for line in lines if json.loads(line)["cell_id"] == "tinyonnx/pt2/fp32"))
    forged["status"] = 7
    slow = json.loads(next(line for line in lines if json.loads(line)["cell_id"] == "tiny/pt2/fp32"))
    slow |= {"duration_s": "slow", "max_abs_error": "big"}  # a later line of a finished cell, wrong types
    hostile = ["[1, 2]", '"text"', '{"cell_id": "tiny/pt2/fp32"}', json.dumps(forged), json.dumps(slow),
               "[" * 100_000 + "]" * 100_000, "\x00\xff garbage"]  # fmt: skip
    path.write_text("".join(line + "\n" for line in kept + hostile))
    code, _, err = run_cli("matrix", "--config", matrix_run["config"], "--out", out, *FAST, "--no-cache",
                           capsys=capsys)  # fmt: skip
    assert code == 1 and "internal error" not in err and "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("[kiln] WARNING:")]
    assert len(warnings) == len(hostile)
    assert "(cell tinyonnx/pt2/fp32): not a cell result: status = 7 is not a string; ignored it" in err
    assert "(cell tiny/pt2/fp32): not a cell result: max_abs_error = 'big' is not a number or null" in err
    assert "not a cell result: no model, source, target, precision, status" in err
    assert "not a cell result: not a JSON object but a list" in err
    assert f"{len(ALL_CELLS) - 1} already done, 0 from the cache, 0 to run" in err  # tinyonnx/pt2 settled again
    cells = _cells(out)
    assert cells["tinyonnx/pt2/fp32"]["status"] == "unavailable" and cells["tiny/pt2/fp32"]["status"] == "passed"
    code, _, err = run_cli("matrix", "merge", out, "--out", matrix_run["root"] / "hostile-merged", capsys=capsys)
    assert code == 1 and "internal error" not in err and "not a cell result" in err


def _cache_entry(cache: Path, cell_id: str) -> Path:
    return next(p for p in cache.rglob("*.json") if json.loads(p.read_text())["result"]["cell_id"] == cell_id)


def test_a_tampered_cache_entry_is_recomputed(matrix_run, capsys):
    cache = matrix_run["root"] / "tampered-cache"
    shutil.copytree(matrix_run["cache"], cache)
    command = ["matrix", "--models", f"{MODELS}:tiny", "--targets", "onnx", *FAST, "--cache-dir", cache]
    code, _, err = run_cli(*command, "--out", matrix_run["root"] / "untampered", capsys=capsys)
    assert code == 0 and "tiny/onnx/fp32: passed" in err and "(cached)" in err  # an intact entry is used
    entry = _cache_entry(cache, "tiny/onnx/fp32")
    data = json.loads(entry.read_text())
    data["result"]["max_abs_error"] = 1.2e4  # edited by hand; its sha256 left as it was
    entry.write_text(json.dumps(data))
    out = matrix_run["root"] / "tampered"
    code, _, err = run_cli(*command, "--out", out, capsys=capsys)
    assert code == 0 and "WARNING: the cache entry of tiny/onnx/fp32" in err and "does not match its sha256" in err
    assert "(cached)" not in err and "1.2e+04" not in err
    cell = _cells(out)["tiny/onnx/fp32"]
    assert cell["status"] == "passed" and not cell["cached"] and cell["max_abs_error"] < 1e-5
    assert json.loads(entry.read_text())["result"]["max_abs_error"] < 1e-5  # the entry holds the real figures again


def test_allow_fail_turns_the_run_green(matrix_run, capsys):
    out = matrix_run["root"] / "allowed"
    shutil.copytree(matrix_run["out"], out)
    allow = ["--allow-fail", "crash/onnx,hang/*/*", "--allow-fail", "memory_hog/*"]
    code, _, _ = run_cli("matrix", "--config", matrix_run["config"], "--out", out, *FAST, "--no-cache", *allow,
                         capsys=capsys)  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["ok"] and report["summary"]["allowed_failures"] == 4
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("skipped") == "5"  # 4 allowed failures, 1 unavailable


def test_a_parity_failure_links_its_divergence_record(matrix_run):
    """The failed cell's divergence record (kept in the cell's directory when the export is not) is linked from
    report.json, report.md and report.html; a passed cell has none."""
    from kiln.compiler.matrix.plan import safe_name

    out = matrix_run["out"]
    cells = _cells(out)
    cell = cells["drifting/pt2/fp32"]
    assert cell["divergence"] == f"cells/{safe_name('drifting/pt2/fp32')}/divergence.json"
    record = json.loads((out / cell["divergence"]).read_text())
    assert record["target"] == "pt2" and cell["divergence_summary"] == record["summary"]
    page = cell["divergence"].removesuffix(".json") + ".html"
    assert (out / page).is_file()
    assert f"]({cell['divergence']})" in (out / "report.md").read_text()
    assert f'href="{page}"' in (out / "report.html").read_text()
    assert cells["tiny/onnx/fp32"]["divergence"] == ""


def test_localize_false_turns_localization_off_in_a_cell(tmp_path):
    """`localize = false` (config) reaches the cell's export: a parity failure without a divergence record."""
    from kiln.compiler.errors import UsageError
    from kiln.compiler.matrix.cell import run_cell
    from kiln.compiler.matrix.config import CellOptions, CellSpec

    with pytest.raises(UsageError, match="localize"):
        CellOptions().merged({"localize": "no"}, "defaults")
    options = CellOptions().merged({"localize": False}, "defaults")
    cell = CellSpec(f"{MODELS}:drifting", "drifting", "pt2", "fp32", options)
    job = {"cell": cell.to_dict(), "threads": 1, "export_dir": str(tmp_path / "export"), "repeat": 1, "warmup": 0}
    outcome, code = run_cell(job)
    assert code == 1 and outcome["status"] == "parity_failed" and "divergence" not in outcome
    assert not list((tmp_path / "export").rglob("divergence.json"))


def test_reports_agree_with_each_other(matrix_run):
    out, report = matrix_run["out"], matrix_run["report"]
    assert report["schema"] == "kiln.matrix.report" and report["schema_version"] == 1
    assert report["columns"] == ["onnx/fp32", "pt2/fp32"]
    markdown = (out / "report.md").read_text()
    assert "| model | onnx fp32 | pt2 fp32 |" in markdown
    for model in report["models"]:
        assert re.search(rf"^\| {model} \|", markdown, re.MULTILINE)
    assert "Legend:" in markdown and "## Failures" in markdown and "## Unavailable here" in markdown
    assert "**crash/onnx/fp32** (conversion failed, crash): crashed: killed by SIGSEGV" in markdown
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    cases = {f"{c.get('classname').removeprefix('kiln.matrix.')}/{c.get('name')}": c for c in suite.iter("testcase")}
    assert set(cases) == ALL_CELLS
    assert {i for i, c in cases.items() if c.find("failure") is not None} == UNEXPECTED
    assert cases["tinyonnx/pt2/fp32"].find("skipped") is not None
    assert cases["drifting/pt2/fp32"].find("skipped").get("message").startswith("allowed to fail")
    assert "SIGSEGV" in cases["crash/onnx/fp32"].find("failure").get("message")


def test_html_report_renders_in_a_headless_browser(matrix_run, tmp_path):
    """report.html in chromium: the table, both plotly charts drawn, in the look the three pages share
    (`kiln.compiler.pages.STYLE`), nothing but its table's own scrolling box wider than the window."""
    page = matrix_run["out"] / "report.html"
    html = page.read_text()
    assert "<script" in html and "cdn." not in html.split("<script", 1)[0]  # plotly is inlined: works offline
    assert STYLE in html
    dom, measured = render(page, tmp_path)
    fits_the_window(measured, scrolling=True)
    table = re.search(r'<table id="matrix-table">.*?</table>', dom, re.DOTALL)
    assert table is not None
    for model in matrix_run["report"]["models"]:
        assert f"<th>{model}</th>" in table[0]
    for chart in ("latency-chart", "error-heatmap"):  # plotly ran: it drew SVG into both chart elements
        rendered = re.search(rf'<div id="{chart}" class="[^"]*js-plotly-plot[^"]*".*?class="main-svg"', dom,
                             re.DOTALL)  # fmt: skip
        assert rendered is not None, f"{chart} was not drawn"
    assert 'class="xtick"' in dom and "tiny" in dom


def test_sharded_runs_merge_into_the_unsharded_report(matrix_run, capsys):
    root, config = matrix_run["root"], matrix_run["config"]
    shards = [root / "shard1", root / "shard2"]
    listed = []
    for index, out in enumerate(shards, 1):
        code, listing, _ = run_cli("matrix", "--config", config, "--shard", f"{index}/2", "--list", "--json",
                                   capsys=capsys)  # fmt: skip
        listed.append({cell["cell_id"] for cell in json.loads(listing)})
        # with the first run's cache: cells with a lasting outcome come from it, crashes and hangs run again
        code, _, _ = run_cli("matrix", "--config", config, "--out", out, *FAST, "--shard", f"{index}/2",
                             "--cache-dir", matrix_run["cache"], capsys=capsys)  # fmt: skip
        assert code == 1
    assert listed[0].isdisjoint(listed[1]) and listed[0] | listed[1] == ALL_CELLS
    for out, ids in zip(shards, listed):
        assert {line["cell_id"] for line in _lines(out)} == ids
    ran = {line["cell_id"]: line for out in shards for line in _lines(out)}
    cached = {i for i, line in ran.items() if line["cached"]}
    assert cached == {"tiny/onnx/fp32", "tiny/pt2/fp32", "tinyonnx/onnx/fp32", "drifting/pt2/fp32"}
    merged = root / "merged"
    code, _, _ = run_cli("matrix", "merge", *shards, "--out", merged, capsys=capsys)
    assert code == 1
    report = json.loads((merged / "report.json").read_text())
    assert report["shards"] == ["1/2", "2/2"]
    assert _comparable(report) == _comparable(matrix_run["report"])
    # --allow-fail given to the shards holds in the merge too (re-running the shards only rewrites their plans)
    for index, out in enumerate(shards, 1):
        code, _, err = run_cli("matrix", "--config", config, "--out", out, *FAST, "--shard", f"{index}/2",
                               "--no-cache", "--allow-fail", "crash,hang,memory_hog", capsys=capsys)  # fmt: skip
        assert code == 0 and "0 to run" in err
    code, _, _ = run_cli("matrix", "merge", *shards, "--out", root / "merged-allowed", capsys=capsys)
    assert code == 0
    # a missing shard leaves its cells "not run", which fails the merged run
    code, _, _ = run_cli("matrix", "merge", shards[0], "--out", root / "half", capsys=capsys)
    half = json.loads((root / "half" / "report.json").read_text())
    assert code == 1 and half["summary"]["not_run"] == len(listed[1])


def test_baseline_flags_regressions(matrix_run, capsys):
    report = json.loads(json.dumps(matrix_run["report"]))
    for cell in report["cells"]:
        if cell["cell_id"] == "tiny/onnx/fp32":
            cell["latency_ms"] /= 2  # it was twice as fast
            cell["max_abs_error"] = cell["max_abs_error"] / 100 if cell["max_abs_error"] > 1e-6 else 1e-9
        if cell["cell_id"] == "crash/onnx/fp32":
            cell["status"] = "passed"  # it passed before
    baseline = matrix_run["root"] / "baseline.json"
    baseline.write_text(json.dumps(report))
    out = matrix_run["root"] / "with-baseline"
    shutil.copytree(matrix_run["out"], out)
    allow = ["--allow-fail", "crash,hang,memory_hog"]
    code, stdout, _ = run_cli("matrix", "--config", matrix_run["config"], "--out", out, *FAST, "--no-cache",
                              "--baseline", baseline, *allow, capsys=capsys)  # fmt: skip
    assert code == 1  # allowed to fail, but a regression
    found = {(r["cell_id"], r["kind"]) for r in json.loads((out / "report.json").read_text())["regressions"]}
    assert ("tiny/onnx/fp32", "slower") in found and ("crash/onnx/fp32", "now_fails") in found
    assert "regression: tiny/onnx/fp32: latency" in stdout
    assert "## Regressions against" in (out / "report.md").read_text()
    same = matrix_run["root"] / "same-baseline"
    shutil.copytree(matrix_run["out"], same)
    code, _, _ = run_cli("matrix", "--config", matrix_run["config"], "--out", same, *FAST, "--no-cache",
                         "--baseline", same / "report.json", *allow, capsys=capsys)  # fmt: skip
    assert code == 0  # against itself: no regression


def test_ray_executor_matches_the_local_run(matrix_run, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install .[ray])")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, _, _ = run_cli("matrix", "--models", f"{MODELS}:tiny", "--targets", "onnx,pt2", "--out",
                             tmp_path / "ray", *FAST, "--no-cache", "--executor", "ray", capsys=capsys)  # fmt: skip
    finally:
        ray.shutdown()
    assert code == 0
    on_ray = {r.cell_id: r for r in read_results(tmp_path / "ray" / "results.jsonl").values()}
    local = {r.cell_id: r for r in read_results(matrix_run["out"] / "results.jsonl").values()}
    assert set(on_ray) == {"tiny/onnx/fp32", "tiny/pt2/fp32"}
    for cell_id, result in on_ray.items():
        assert not result.cached and result.latency_ms is not None
        assert result.comparable() == local[cell_id].comparable()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "zoo:nope"], "no built-in model 'nope'"),
        (["--targets", "onnxx"], "unknown target 'onnxx'"),
        (["--shard", "3/2"], "--shard 3/2"),
        (["--precisions", "int3"], "the matrix has no cells"),
    ],
)
def test_bad_matrix_arguments_are_one_line_errors(argv, message, capsys):
    code, _, err = run_cli("matrix", "--list", *argv, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('models = ["zoo:cnn"]\n[[cells]]\nmatch = "cnn/*"\natol_typo = 1\n', "unknown option 'atol_typo'"),
        ('models = [{source = "zoo:cnn", timeout = "long"}]\n', "timeout = 'long' is not valid"),
        ("jobs = 0\n", "jobs 0: must be at least 1"),
        ('models = ["zoo:cnn"\n', "cannot read"),
    ],
)
def test_bad_config_is_a_one_line_error(text, message, tmp_path, capsys):
    config = tmp_path / "matrix.toml"
    config.write_text(text)
    code, _, err = run_cli("matrix", "--config", config, "--list", capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_zoo_all_on_all_targets_plans_every_registered_target(capsys):
    from kiln.compiler.capture.zoo import ZOO
    from kiln.targets import TARGETS

    code, listing, _ = run_cli("matrix", "--models", "zoo:all", "--targets", "all", "--list", capsys=capsys)
    assert code == 0
    cells = set(listing.split())
    assert cells == {f"{m}/{t.name}/{t.default_precision}" for m in ZOO for t in TARGETS}
    code, listing, _ = run_cli("matrix", "--models", "zoo:cnn", "--targets", "all", "--precisions", "all", "--list",
                               capsys=capsys)  # fmt: skip
    assert set(listing.split()) == {f"cnn/{t.name}/{p}" for t in TARGETS for p in t.precisions}


def _result(cell_id: str = "m/onnx/fp32", key: str = "ab" * 32, **fields) -> CellResult:
    model, target, precision = cell_id.split("/")
    return CellResult(cell_id, model, "zoo:m", target, precision, fields.pop("status", "passed"), key=key, **fields)


def test_repair_results_completes_a_whole_last_line_and_drops_a_torn_one(tmp_path):
    path, warnings = tmp_path / "results.jsonl", []
    append_result(path, _result("a/onnx/fp32", "a" * 64, max_abs_error=1e-7))
    whole = path.read_text()
    path.write_text(whole + whole.rstrip("\n"))  # killed just before the newline: the line itself is whole
    repair_results(path, warnings.append)
    assert warnings == [] and path.read_text() == whole * 2
    path.write_text(whole + '{"cell_id": "b/pt2/fp32", "max_ab')  # killed mid-line
    repair_results(path, warnings.append)
    assert path.read_text() == whole
    assert len(warnings) == 1 and "dropped it: cell b/pt2/fp32 will run again" in warnings[0]
    append_result(path, _result("b/pt2/fp32", "b" * 64))
    assert [r.cell_id for r in read_results(path).values()] == ["a/onnx/fp32", "b/pt2/fp32"]
    repair_results(path, warnings.append)  # a sound file is left alone
    assert len(warnings) == 1 and path.read_text().count("\n") == 2


def test_cell_result_parse_checks_shapes_and_restores_non_finite_numbers():
    data = _result(max_abs_error=float("nan"), min_cosine=float("-inf")).to_dict()
    assert data["max_abs_error"] == "nan"
    parsed = CellResult.parse(data)
    assert parsed.max_abs_error != parsed.max_abs_error and parsed.min_cosine == float("-inf")
    for bad, message in [
        (data | {"latency_ms": "fast"}, "latency_ms = 'fast' is not a number or null"),
        (data | {"exit_code": True}, "exit_code = true is not a whole number or null"),
        (data | {"outputs": {}}, "outputs = {} is not a list"),
        (data | {"status": "great"}, "unknown status 'great'"),
        ({k: v for k, v in data.items() if k != "target"}, "no target"),
        (["a"], "not a JSON object but a list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            CellResult.parse(bad)


def test_the_cache_uses_only_entries_that_check_out(tmp_path):
    warnings: list[str] = []
    cache = CellCache(tmp_path, warnings.append)
    result = _result(max_abs_error=2e-7)
    cache.put(result)
    assert cache.get(result.key, result.cell_id) == result and warnings == []
    assert cache.get("cd" * 32) is None and warnings == []  # not cached: no warning
    (entry,) = tmp_path.rglob("*.json")
    data = json.loads(entry.read_text())
    good = entry.read_text()
    forged = dict(data, result=dict(data["result"], max_abs_error=1.2e4))  # numbers edited, digest not
    wrong_shape = dict(data, result=dict(data["result"], status=None))
    wrong_shape["sha256"] = hashlib.sha256(
        json.dumps(wrong_shape["result"], sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()  # recomputed: the digest matches, the shape does not
    cases = [
        (json.dumps(forged), "does not match its sha256"),
        (json.dumps(wrong_shape), "is not a well-formed cell result (status = null is not a string)"),
        (json.dumps(data["result"]), "is not a Kiln cache entry of this version"),  # an old-style bare entry
        (good[: len(good) // 2], "is not JSON"),  # torn
    ]
    for text, message in cases:
        entry.write_text(text)
        assert cache.get(result.key, result.cell_id) is None
        assert message in warnings[-1] and "m/onnx/fp32" in warnings[-1] and "the cell runs again" in warnings[-1]
    other = tmp_path / "cd" / f"{'cd' * 32}.json"
    other.parent.mkdir()
    other.write_text(good)  # an intact entry under another key
    assert cache.get("cd" * 32) is None and "holds the result of another key" in warnings[-1]
    assert len(warnings) == len(cases) + 1


def test_merge_of_a_plan_of_the_wrong_shape_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "plan.json").write_text('{"shard": "1/1", "cells": [{"cell": {"name": "x"}}]}')
    code, _, err = run_cli("matrix", "merge", tmp_path, "--out", tmp_path / "merged", capsys=capsys)
    assert code == 2 and "is not a plan of `kiln matrix`" in err and len(err.strip().splitlines()) == 1
