"""`kiln tune` on a directory that may be moved, shared, edited or forged (issue 24): a relative --out finds its
builds; every build is checked against its manifest before it is timed or wins; no link is followed out of the
directory; a directory or a best/ tune did not make is refused without --force; two runs into one --out are
locked against each other; bad numbers and forged records are one-line errors or rejected builds; a stopped or
killed timing worker fails its candidate alone.

One build is shared: zoo:cnn on onnx at fp32 and nothing else (`B`), built once with --build-only; each test
times (`T`) or resumes a copy of it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kiln import cli
from kiln.compiler.types import Manifest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
B = ("--targets", "onnx", "--precisions", "fp32", "--no-plain", "--no-runtime-search", "--io", "nchw")
R = ("--rounds", "1", "--runs", "2", "--warmup", "1")  # timing flags of kiln bench and kiln tune
T = (*R, "--confirm-budget", "5")  # kiln tune's: a short confirmation
CELL = Path("builds", "cells", "cnn__onnx__fp32", "export")  # the one build's export, under the tune directory


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "base"
    assert cli.main(["tune", "zoo:cnn", "--out", str(out), *B, "--build-only", "-q"]) == 0
    return out


@pytest.fixture
def copy(base, tmp_path):
    """A copy of the built tune directory, links kept as links."""
    target = tmp_path / "tuned"
    shutil.copytree(base, target, symlinks=True)
    return target


def _board(out: Path) -> dict:
    return json.loads((out / "leaderboard.json").read_text())


def _kiln(*argv: object, cwd: Path, **popen) -> subprocess.CompletedProcess[str]:
    """The command line in a process of its own, in `cwd`."""
    command = [sys.executable, str(ROOT / "cli.py"), *map(str, argv)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **popen)


def test_a_relative_out_finds_its_builds_from_any_working_folder(tmp_path):
    """The README's form (`--out tuned/cnn`), in a working folder reached through a symbolic link, then timed
    with `./` and `..` in the path and resumed; a matrix resumes with a relative --out too. Before, every build
    was refused ("is not its own") and tune found no winner."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    built = _kiln("tune", "zoo:cnn", "--out", "tuned/cnn", *B, *T, cwd=link)
    assert built.returncode == 0, built.stderr
    assert "**Winner: onnx fp32**" in built.stdout and (real / "tuned" / "cnn" / "best" / "manifest.json").is_file()
    timed = _kiln("tune", "--time-only", "--out", "../tuned/./cnn", *T, cwd=link / "sub")
    assert timed.returncode == 0, timed.stderr
    assert _board(real / "tuned" / "cnn")["winner"]["name"] == "onnx fp32"
    resumed = _kiln("tune", "zoo:cnn", "--out", "./sub/../tuned/cnn", *B, *T, cwd=link)
    assert resumed.returncode == 0 and "1 already done, 0 from the cache, 0 to run" in resumed.stderr, resumed.stderr
    matrix = ("matrix", "--models", "zoo:cnn", "--targets", "onnx", "--precisions", "fp32", "--keep-artifacts",
              "--no-cache", "--repeat", "2", "--warmup", "1")  # fmt: skip
    assert _kiln(*matrix, "--out", "m", cwd=link).returncode == 0
    again = _kiln(*matrix, "--out", "./sub/../m", cwd=link)
    assert again.returncode == 0 and "1 already done" in again.stderr, again.stderr


def _change_a_weight(model_file: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(model_file)
    weight = model.graph.initializer[0]
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, model_file)


def _list_a_wrong_size(export: Path) -> None:
    """The manifest edited to list model.onnx as -5 bytes (its sha256 kept): it would win --objective size."""
    manifest = json.loads((export / "manifest.json").read_text())
    for listed in manifest["files"]:
        if listed["path"] == "model.onnx":
            listed["size"] = -5
    (export / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda export: _change_a_weight(export / "model.onnx"), "model.onnx changed since export (sha256 differs)"),
        (lambda export: (export / "extra.bin").write_bytes(b"\0"), "file extra.bin is not in the manifest"),
        (lambda export: (export / "parity" / "reference.npz").unlink(), "parity/reference.npz is missing"),
        (_list_a_wrong_size, "model.onnx changed since export ("),
        (lambda export: (export / "manifest.json").write_text("[" * 200_000 + "]" * 200_000), "cannot read"),
    ],
    ids=["weight-changed", "file-added", "file-missing", "size-forged", "manifest-nested-too-deep"],
)
@pytest.mark.parametrize("how", [("--time-only",), ("zoo:cnn", *B)], ids=["time-only", "resume"])
def test_a_tampered_build_is_rejected_and_never_published(copy, capsys, tamper, reason, how):
    """A build whose files are not what its manifest lists is rejected with the reason, in --time-only and in a
    resume alike; before, the changed weight was timed, won and published, and `kiln verify best` failed."""
    tamper(copy / CELL)
    code, _, err = run_cli("tune", *how, "--out", copy, *T, capsys=capsys)
    assert code == 1, err
    (rejected,) = _board(copy)["rejected"]
    assert reason in rejected["rejected"] and "never published" in rejected["rejected"]
    assert not (copy / "best").exists()


def test_a_link_in_a_build_is_refused_and_never_copied_into_best(copy, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("the content of a file outside")
    (copy / CELL / "parity" / "secret.txt").symlink_to(secret)
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *T, capsys=capsys)
    assert code == 1, err
    (rejected,) = _board(copy)["rejected"]
    assert "secret.txt is a symbolic link" in rejected["rejected"] and "not followed" in rejected["rejected"]
    copied = [p for p in copy.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not any(b"the content of a file outside" in p.read_bytes() for p in copied)


@pytest.mark.parametrize(
    "name",
    ["leaderboard.md", "leaderboard.json", "leaderboard.html", "builds/tune.json", "builds/results.jsonl",
     "builds/plan.json", "builds/report.md", "builds/best.json"],
)  # fmt: skip
def test_a_link_where_tune_reads_or_writes_is_refused_and_nothing_outside_changes(copy, tmp_path, capsys, name):
    """Before, tune wrote the leaderboards, tune.json, plan.json and the reports through the link, and read and
    appended to a linked results.jsonl."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not Kiln's")
    (copy / name).unlink(missing_ok=True)
    (copy / name).symlink_to(outside)
    code, _, err = run_cli("tune", "zoo:cnn", "--out", copy, *B, *T, capsys=capsys)
    assert code == 2 and f"{copy / name} is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert outside.read_text() == "not Kiln's"


def test_links_beside_best_are_never_followed(copy, tmp_path, capsys):
    """best.old, best.partial and best.stale linked to a directory outside: before, publishing a second time
    failed with exit 4 (a raw FileExistsError or NotADirectoryError); now tune stages best/ elsewhere."""
    assert run_cli("tune", "--time-only", "--out", copy, *T, capsys=capsys)[0] == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    for name in ("best.old", "best.partial", "best.stale"):
        (copy / name).symlink_to(outside, target_is_directory=True)
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *T, capsys=capsys)
    assert code == 0, err
    assert [p.name for p in outside.iterdir()] == ["keep.txt"] and (outside / "keep.txt").read_text() == "keep"
    assert Manifest.read(copy / "best").target_info["tune"]["candidate"] == "onnx fp32"
    assert run_cli("verify", copy / "best", capsys=capsys)[0] == 0


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: a file's bytes, a link's target, a directory's name."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return found


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tune directory of two builds: onnx fp32 and its plain -O0 export."""
    out = tmp_path_factory.mktemp("hostile-two") / "two"
    argv = ["tune", "zoo:cnn", "--out", str(out), "--targets", "onnx", "--precisions", "fp32", "--no-runtime-search",
            "--io", "nchw", "--build-only", "-q"]  # fmt: skip
    assert cli.main(argv) == 0
    return out


@pytest.mark.parametrize(
    "how",
    [("--time-only", "--no-runtime-search"), ("zoo:cnn", *B[:4], "--no-runtime-search", "--io", "nchw")],
    ids=["time-only", "resume"],
)
def test_a_build_linked_outside_is_rejected_alone_and_the_others_go_on(two, tmp_path, capsys, how):
    """One build's cell directory replaced by a link to its copy outside: that build is rejected with the reason,
    never opened; the other is timed and wins. Before, a resume stopped the whole tune with exit 2 (while
    --time-only rejected the build alone); a link at tune's own files still stops it (above)."""
    copy = tmp_path / "tuned"
    shutil.copytree(two, copy, symlinks=True)
    cell = copy / "builds" / "cells" / "cnn__onnx__fp32"
    outside = tmp_path / "outside"
    shutil.move(cell, outside)
    cell.symlink_to(outside, target_is_directory=True)
    before = _snapshot(outside)
    code, _, err = run_cli("tune", *how, "--out", copy, *T, capsys=capsys)
    assert code == 0, err
    board = _board(copy)
    assert board["winner"]["name"] == "onnx fp32 -O0"
    (rejected,) = board["rejected"]
    assert rejected["name"] == "onnx fp32", rejected
    assert f"{cell} is a symbolic link leading outside {copy / 'builds'}: refused, not followed" in rejected["rejected"]
    assert _snapshot(outside) == before and cell.is_symlink()
    assert Manifest.read(copy / "best").target_info["tune"]["candidate"] == "onnx fp32 -O0"


def test_planted_staging_directories_of_best_are_never_followed(copy, tmp_path, capsys):
    """Beside best/, named like its staging directories (a dead owner naming DIR/best, a replaced best/ `old/` to
    put back): a link to a directory outside, a real one whose `old` links outside, and a link named like an
    older Kiln's staging. None is followed: nothing outside is moved into best/, changed or removed."""
    from kiln.compiler.export.staging import OLD, STAGING_OWNER

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "out": str(copy.resolve() / "best")})
    outside = tmp_path / "outside"
    for name in ("linked", "old-of-real", "legacy"):
        (outside / name / OLD).mkdir(parents=True)
        (outside / name / STAGING_OWNER).write_text(owner)
        (outside / name / OLD / "manifest.json").write_text("not Kiln's")
    (copy / ".kiln-best-aaaa1111").symlink_to(outside / "linked", target_is_directory=True)
    real = copy / ".kiln-best-bbbb2222"
    real.mkdir()
    (real / STAGING_OWNER).write_text(owner)
    (real / OLD).symlink_to(outside / "old-of-real", target_is_directory=True)
    (copy / ".kiln-old-best-.kiln-best-cccc3333").symlink_to(outside / "legacy", target_is_directory=True)
    before = _snapshot(outside)
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *T, capsys=capsys)
    assert code == 0, err
    assert _snapshot(outside) == before
    assert not os.path.lexists(real), "a real staging directory of a dead owner is removed (its link as a link)"
    assert (copy / ".kiln-best-aaaa1111").is_symlink() and (copy / ".kiln-old-best-.kiln-best-cccc3333").is_symlink()
    assert (copy / "best").is_dir() and not (copy / "best").is_symlink()
    assert run_cli("verify", copy / "best", capsys=capsys)[0] == 0


def test_a_directory_tune_did_not_make_is_refused_without_force(tmp_path, capsys):
    """Before, tune built into it and removed its best/ ("an earlier tune published it")."""
    out = tmp_path / "mine"
    (out / "best").mkdir(parents=True)
    (out / "best" / "notes.txt").write_text("notes")
    code, _, err = run_cli("tune", "zoo:cnn", "--out", out, *B, "--build-only", capsys=capsys)
    assert code == 2 and "is not a kiln tune directory" in err and "--force" in err, err
    assert (out / "best" / "notes.txt").read_text() == "notes" and sorted(p.name for p in out.iterdir()) == ["best"]
    (out / "best" / "notes.txt").unlink()
    (out / "best").rmdir()
    code, _, err = run_cli("tune", "zoo:cnn", "--out", tmp_path, *B, "--build-only", capsys=capsys)
    assert code == 2 and "is not a kiln tune directory" in err, err  # holds `mine`: not empty


def test_a_best_tune_did_not_publish_is_kept_unless_forced(copy, capsys):
    (copy / "best").mkdir()
    (copy / "best" / "notes.txt").write_text("notes")
    code, _, err = run_cli("tune", "zoo:cnn", "--out", copy, *B, "--build-only", capsys=capsys)
    assert code == 2 and "best is not an export published by kiln tune" in err, err
    assert (copy / "best" / "notes.txt").read_text() == "notes"
    code, _, err = run_cli("tune", "zoo:cnn", "--out", copy, *B, *T, "--force", capsys=capsys)
    assert code == 0, err  # --force: replaced by the winner
    assert not (copy / "best" / "notes.txt").exists() and (copy / "best" / "manifest.json").is_file()
    (copy / "best" / "notes.txt").write_text("notes")  # added to a best/ tune published
    code, _, err = run_cli("tune", "zoo:cnn", "--out", copy, *B, "--build-only", capsys=capsys)
    assert code == 2 and "has changed since kiln tune published it" in err and "notes.txt" in err, err
    (copy / "best" / "notes.txt").unlink()
    code, _, err = run_cli("tune", "zoo:cnn", "--out", copy, *B, "--build-only", capsys=capsys)
    assert code == 0 and "removed" in err and not (copy / "best").exists(), err  # proven tune's: withdrawn


def test_two_tunes_into_one_out_are_locked_against_each_other(tmp_path):
    """A second tune into the same --out fails at once naming the first, or with --wait runs after it; before,
    both ran at once (one crashed on best.partial/manifest.json, or best/ held another winner than printed)."""
    out = tmp_path / "shared"
    command = [sys.executable, str(ROOT / "cli.py"), "tune", "zoo:cnn", "--out", str(out), *B, *T, "-q"]
    first = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / ".kiln-shared.lock").exists() or (out / "builds").exists()):
            assert first.poll() is None and time.monotonic() < deadline, "the first tune did not start"
            time.sleep(0.05)
        second = _kiln("tune", "zoo:cnn", "--out", out, *B, *T, cwd=tmp_path)
        assert first.poll() is None, "the first tune ended before the second tried: the test proves nothing"
        assert second.returncode == 2 and f"another kiln tune is writing to {out}" in second.stderr, second.stderr
        queued = _kiln("tune", "zoo:cnn", "--out", out, *B, *T, "--wait", cwd=tmp_path)
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0, first.stderr.read() if first.stderr else ""
    assert queued.returncode == 0 and f"waiting for the kiln tune writing to {out}" in queued.stderr, queued.stderr
    assert "1 already done, 0 from the cache, 0 to run" in queued.stderr
    winner = _board(out)["winner"]["name"]
    assert Manifest.read(out / "best").target_info["tune"]["candidate"] == winner


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--threads", "99999999999999999999"), "--threads 99999999999999999999: must be at most 1024"),
        (("--min-cosine", "-0.5"), "--min-cosine -0.5: a threshold must be a finite number >= 0"),
        (("--round-timeout", "nan"), "--round-timeout nan: must be a finite number of seconds > 0"),
    ],
)
def test_bad_tune_numbers_are_one_line_exit_2(tmp_path, capsys, argv, message):
    """--min-cosine -0.5 passed tune's own check and then failed every build (the export's check refuses it)."""
    code, _, err = run_cli("tune", "zoo:cnn", "--out", tmp_path / "o", *B, *T, *argv, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--threads", "99999999999999999999"), "--threads 99999999999999999999: must be at most 1024"),
        (("--compile-timeout", "nan"), "--compile-timeout nan: must be a finite number of seconds > 0"),
        (("--round-timeout", "0"), "--round-timeout 0.0: must be a finite number of seconds > 0"),
    ],
)
def test_bad_bench_numbers_are_one_line_exit_2(base, capsys, argv, message):
    code, _, err = run_cli("bench", base / CELL, *R, "--no-write", *argv, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_tune_into_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("tune", "zoo:cnn", "--out", tmp_path / "file", *B, capsys=capsys)
    assert code == 2 and "is a file, not a directory" in err, err


def test_a_forged_layout_is_rejected_not_published_as_nhwc(copy, capsys):
    state = json.loads((copy / "builds" / "tune.json").read_text())
    state["variants"]["cnn"]["layout"] = "nhwc"
    (copy / "builds" / "tune.json").write_text(json.dumps(state))
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *T, capsys=capsys)
    assert code == 1, err
    (rejected,) = _board(copy)["rejected"]
    assert "its I/O layout is NHWC, its manifest says NCHW" in rejected["rejected"], rejected
    assert not (copy / "best").exists()


def test_forged_figures_in_results_never_reach_the_leaderboard(copy, capsys):
    """A NaN cosine and a negative size written into results.jsonl: the leaderboard shows what the checked
    manifest says (a negative size would have won --objective size)."""
    results = copy / "builds" / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    forged = {"min_cosine": "nan", "artifact_bytes": -5, "max_abs_error": -1.0}
    results.write_text("".join(json.dumps(d | forged) + "\n" for d in lines))
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *T, "--objective", "size", capsys=capsys)
    assert code == 0, err
    row = _board(copy)["winner"]
    manifest = Manifest.read(copy / "best")
    assert row["artifact_bytes"] == sum(f.size for f in manifest.files if not f.path.startswith("parity/")) > 0
    assert math.isfinite(row["min_cosine"]) and row["min_cosine"] > 0.9999 and 0 <= row["max_abs_error"] < 1e-4


def test_a_plan_nested_too_deep_is_one_line_exit_2(copy, capsys):
    (copy / "builds" / "plan.json").write_text('{"cells": ' + "[" * 200_000 + "]" * 200_000 + "}")
    code, _, err = run_cli("tune", "--time-only", "--out", copy, *T, capsys=capsys)
    assert code == 2 and "cannot read" in err and "plan.json" in err and len(err.strip().splitlines()) == 1, err


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the benchmark's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize(
    ("sent", "failure"),
    [(signal.SIGSTOP, "no answer in 3 s (--round-timeout): stopped or hung; killed it"),
     (signal.SIGKILL, "its process exited with status -9")],
    ids=["stopped", "killed"],
)  # fmt: skip
def test_a_stopped_or_killed_worker_fails_its_candidate_alone(base, tmp_path, sent, failure):
    """Two copies of one export timed; one worker is stopped (SIGSTOP) or killed during the rounds. Before, a
    stopped worker stalled the run for 900 s and a killed one ended it with exit 4; now that candidate fails
    with the reason, the other keeps its figures, and the exit code is 1."""
    for name in ("a", "b"):
        shutil.copytree(base / CELL, tmp_path / name)
    command = [sys.executable, str(ROOT / "cli.py"), "bench", "a", "b", "--rounds", "12", "--runs", "1500",
               "--warmup", "1", "--round-timeout", "3", "--no-write", "--json"]  # fmt: skip
    bench = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert bench.stderr is not None
    for line in bench.stderr:
        if "round 1/" in line:
            break
    workers = _children(bench.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], sent)
    done = threading.Event()

    def kept_stopped() -> None:
        """The bench itself stops and wakes (SIGCONT) its workers between their turns, which would undo one stop:
        a hung worker is one that stays stopped."""
        while not done.wait(0.05):
            try:
                os.kill(workers[0], signal.SIGSTOP)
            except ProcessLookupError:
                return

    if sent == signal.SIGSTOP:
        threading.Thread(target=kept_stopped, daemon=True).start()
    try:
        out, err = bench.communicate(timeout=300)
    finally:
        done.set()
    assert bench.returncode == 1, err
    records = {r["name"]: r for r in json.loads(out)["candidates"]}
    failed = [r for r in records.values() if r.get("failure")]
    assert len(failed) == 1 and failure in failed[0]["failure"], records
    (kept,) = [r for r in records.values() if not r.get("failure")]
    assert kept["latency_ms"]["p50"] > 0 and len(kept["round_medians_ms"]) == 12
    assert f"kiln: error: {failed[0]['name']}: " in err
