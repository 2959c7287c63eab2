"""`kiln tune` timed where the artifact will run: `--build-only` here, the directory moved (as if copied to the
deployment machine), `--time-only` (or a plain resume) there; results.jsonl treated as hostile; builds on Ray.

One build is shared: a tiny model (a copy of tests/models/matrix_models.py:tiny in a temporary directory, so that
the deployment step can run without it), onnx fp32 only, no plain -O0 build: one cell."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from kiln import cli
from kiln.compiler.matrix.results import read_results
from kiln.compiler.types import Manifest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
ARGS = ("--targets", "onnx", "--precisions", "fp32", "--no-plain", "--rounds", "2", "--runs", "3", "--warmup", "1")
TIMING = ("--rounds", "2", "--runs", "3", "--warmup", "1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the model source, the --build-only directory, its exit code)."""
    base = tmp_path_factory.mktemp("deploy")
    shutil.copy(ROOT / "tests" / "models" / "matrix_models.py", base / "deploy_model.py")
    model = f"{base / 'deploy_model.py'}:tiny"
    out = base / "build-machine" / "tuned"
    code = cli.main(["tune", model, "--out", str(out), *ARGS, "--build-only", "-q"])
    return model, out, code


@pytest.fixture(scope="module")
def moved(built, tmp_path_factory):
    """The built directory moved elsewhere (what copying it to the deployment machine does to its paths)."""
    model, out, _ = built
    target = tmp_path_factory.mktemp("deployment-machine") / "copied"
    shutil.move(out, target)
    return model, target


def _board(out: Path) -> dict:
    return json.loads((out / "leaderboard.json").read_text())


def test_build_only_builds_and_gates_but_times_nothing_and_publishes_no_best(built):
    _, out, code = built
    assert code == 0  # a candidate passed
    assert not (out / "best").exists()
    board = _board(out)
    assert board["timed"] is False and board["winner"] is None and board["timed_on"] is None
    assert board["candidates"] and all(r["p50_ms"] is None and r["status"] == "built, not timed"
                                       for r in board["candidates"])  # fmt: skip
    assert {r["name"] for r in board["candidates"]} == {"onnx fp32", "onnx fp32 [graph-optimization=basic]"}
    assert [m["host"] for m in board["built_on"]] == [socket.gethostname()]
    (result,) = read_results(out / "builds" / "results.jsonl").values()
    assert result.host["host"] == socket.gethostname() and "cpu_flags" in result.host
    text = (out / "leaderboard.md").read_text()
    assert "built, not timed" in text and "Not timed (--build-only)" in text and "| rank |" not in text
    assert "built, not timed" in (out / "leaderboard.html").read_text()


def test_the_moved_directory_is_timed_there_without_the_model_and_publishes_best(moved, capsys):
    """--time-only on the copy: nothing rebuilt, the candidates timed, best/ published and verified; the model's
    file is not needed there (moved away while it runs)."""
    model, out = moved
    model_file = Path(model.rpartition(":")[0])
    os.replace(model_file, model_file.with_suffix(".away"))
    try:
        code, text, err = run_cli("tune", "--time-only", "--out", out, *TIMING, "--threads", "1", capsys=capsys)
    finally:
        os.replace(model_file.with_suffix(".away"), model_file)
    assert code == 0, err
    assert "time-only: 1 build in" in err and "none is rebuilt" in err and "matrix:" not in err
    board = _board(out)
    assert board["winner"] is not None and board["candidates"][0]["p50_ms"] > 0
    assert all(str(out) in r["directory"] for r in board["candidates"])  # found where they are now
    assert board["timed_on"]["host"] == socket.gethostname() and board["timed_on"]["threads"] == [1]
    assert board["built_elsewhere"] is False and "Built on the same machine." in text
    assert Manifest.read(out / "best").target_info["tune"]["candidate"] == board["winner"]["name"]
    code, text, err = run_cli("verify", out / "best", capsys=capsys)
    assert code == 0, err + text


def test_the_moved_directory_resumes_a_plain_tune_with_nothing_to_run(moved, capsys):
    model, out = moved
    before = read_results(out / "builds" / "results.jsonl")
    code, _, err = run_cli("tune", model, "--out", out, *ARGS, capsys=capsys)
    assert code == 0, err
    assert "1 already done, 0 from the cache, 0 to run" in err
    assert read_results(out / "builds" / "results.jsonl") == before  # nothing rebuilt, nothing appended
    assert _board(out)["winner"] is not None and (out / "best" / "manifest.json").is_file()


def test_a_tune_that_chooses_nothing_withdraws_an_earlier_best(moved, tmp_path, capsys):
    """--build-only again where an earlier tune published best/: the new leaderboard has no winner, so the old
    best/ must not stay for a script to deploy."""
    model, out = moved
    if not (out / "best").is_dir():
        assert run_cli("tune", "--time-only", "--out", out, *TIMING, capsys=capsys)[0] == 0
    again = tmp_path / "again"
    shutil.copytree(out, again)
    code, _, err = run_cli("tune", model, "--out", again, *ARGS, "--build-only", capsys=capsys)
    assert code == 0, err
    assert "0 to run" in err and "removed" in err and "chose no winner" in err
    assert not (again / "best").exists() and _board(again)["winner"] is None


def test_a_leaderboard_timed_elsewhere_says_where_it_was_built():
    from kiln.compiler.perf.leaderboard import where_lines

    here = {"host": "deploy", "cpu": "Xeon", "cpu_flags": ["avx512_vnni"], "cores": 8, "threads": [4]}
    there = {"host": "builder", "cpu": "EPYC", "cpu_flags": ["avx2"], "cores": 2}
    lines = where_lines({"timed_on": here, "built_on": [there], "built_elsewhere": True})
    assert lines[0] == "Timed on deploy (Xeon; CPU flags: avx512_vnni; 8 cores), threads: [4]."
    assert lines[1].startswith("Built elsewhere, on builder (EPYC; CPU flags: avx2; 2 cores)")


def _forge(out: Path, copy: Path, cell_dir: str | None = None) -> Path:
    """A copy of the tune directory whose results.jsonl records `cell_dir` for every cell."""
    shutil.copytree(out, copy, symlinks=True)
    results = copy / "builds" / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    results.write_text("".join(json.dumps(d | ({"cell_dir": cell_dir} if cell_dir else {})) + "\n" for d in lines))
    shutil.rmtree(copy / "best", ignore_errors=True)
    return copy


@pytest.mark.parametrize(
    ("cell_dir", "message"),
    [
        ("/etc", "its recorded build directory '/etc' is not its own"),
        ("../../x", "its recorded build directory '../../x' is not its own"),
        ("../../cells/tiny__onnx__fp32", "is not its own"),  # the right name, but outside builds/
        ("/etc/cells/tiny__onnx__fp32", "is not its own"),  # not a builds directory
    ],
)
def test_a_cell_dir_outside_the_builds_is_refused_not_followed(moved, tmp_path, capsys, cell_dir, message):
    _, out = moved
    copy = _forge(out, tmp_path / "forged", cell_dir)
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *TIMING, capsys=capsys)
    assert code == 1, err  # no candidate left, no winner
    (rejected,) = _board(copy)["rejected"]
    assert message in rejected["rejected"] and "refused, not followed" in rejected["rejected"]
    assert not (copy / "best").exists()


def test_a_cell_directory_linked_outside_is_refused_and_a_missing_one_is_gone(moved, tmp_path, capsys):
    _, out = moved
    copy = _forge(out, tmp_path / "linked")
    (cell,) = (copy / "builds" / "cells").iterdir()
    shutil.move(cell, tmp_path / "elsewhere")
    cell.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *TIMING, capsys=capsys)
    (rejected,) = _board(copy)["rejected"]
    assert code == 1 and "leading outside" in rejected["rejected"] and "refused, not followed" in rejected["rejected"]
    cell.unlink()
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *TIMING, capsys=capsys)
    (rejected,) = _board(copy)["rejected"]
    assert code == 1 and "is gone" in rejected["rejected"], err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("zoo:cnn", "--time-only"), "--time-only times the builds already in OUT/builds: MODEL"),
        (("--time-only", "--targets", "onnx", "--calib", "x.npz"), "--targets, --calib only apply when building"),
        (("--time-only", "--build-only"), "--build-only and --time-only together"),
        (("--build-only",), "kiln tune needs MODEL"),
        (("--time-only",), "holds no builds of `kiln tune`"),
    ],
)
def test_bad_build_and_time_flags_are_one_line_exit_2(argv, message, tmp_path, capsys):
    code, _, err = run_cli("tune", *argv, "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_ray_builds_the_cells_and_the_tune_publishes_a_winner(built, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install .[ray])")
    model, _, _ = built
    out = tmp_path / "on-ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, _, err = run_cli("tune", model, "--out", out, *ARGS, "--no-runtime-search", "--executor", "ray",
                               capsys=capsys)  # fmt: skip
    finally:
        ray.shutdown()
    assert code == 0, err
    assert "0 already done, 0 from the cache, 1 to run (ray)" in err
    (result,) = read_results(out / "builds" / "results.jsonl").values()
    assert result.status == "passed" and not result.cached and result.host["host"] == socket.gethostname()
    assert json.loads((out / "builds" / "plan.json").read_text())["settings"]["executor"] == "ray"
    board = _board(out)
    assert board["winner"] is not None and board["timed_on"] is not None
    assert Manifest.read(out / "best").target_info["tune"]["candidate"] == board["winner"]["name"]


@pytest.mark.parametrize(
    "forged",
    [{"batch": 0}, {"batch": "4"}, {"variants": {"m-nhwc": {"layout": "nhwc;rm", "batch_range": None, "plain": False}}},
     {"variants": {"m": {"layout": None, "batch_range": "1:x", "plain": False}}}, {"variants": []}],
)  # fmt: skip
def test_the_builds_record_keeps_each_variant_and_refuses_a_forged_one(tmp_path, forged):
    """`--time-only` has no model to plan from: the layout and batch range of each build and the batch to time at
    come back from builds/tune.json, as they were planned; a record whose fields are not what tune writes is refused."""
    from kiln.compiler.errors import UsageError
    from kiln.compiler.perf.tune_candidates import Plan, Variant
    from kiln.compiler.perf.tune_files import STATE_FILE, plan_of, read_state, save_builds

    variants = {
        "m": Variant("nchw"),
        "m-nhwc": Variant("nhwc", precisions=("fp32",)),
        "m-dynbatch": Variant(None, "1:4"),
    }
    save_builds(tmp_path, "zoo:cnn", Plan(None, [], variants, 4), "local")
    back = plan_of(read_state(tmp_path))
    assert back is not None and back.batch == 4
    assert {n: (v.layout, v.batch_range, v.plain) for n, v in back.variants.items()} == {
        "m": ("nchw", None, False), "m-nhwc": ("nhwc", None, False), "m-dynbatch": (None, "1:4", False)}  # fmt: skip
    state = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps(state | forged))
    with pytest.raises(UsageError, match="is not a record of `kiln tune`'s builds"):
        read_state(tmp_path)
