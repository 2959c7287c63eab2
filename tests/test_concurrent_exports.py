"""Concurrent exports to one --out, killed exports and what they leave: the output lock and staging directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import kiln
import pytest
from kiln.compiler.errors import KilnError, UsageError
from kiln.compiler.export.loading import verify
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.export.staging import (
    OLD,
    STAGING_OWNER,
    install_tree,
    lock_path,
    output_lock,
    owner_alive,
    process_start,
    staging_area,
)
from kiln.compiler.types import Manifest

from tests.conftest import ROOT, run_cli
from tests.test_cli_errors import assert_one_line_error


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """zoo:cnn and zoo:lstm exported to onnx: model name -> export directory."""
    root = tmp_path_factory.mktemp("onnx-exports")
    return {name: export_targets(f"zoo:{name}", "onnx", root / name)[0].directory for name in ("cnn", "lstm")}


def _export_process(*argv: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "export", *map(str, argv)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err.decode()


def _assert_consistent(out: Path) -> str:
    """The export at `out` is whole: its files match its manifest, and it computes what its manifest's source
    computes with that source's weights. Returns the source's description."""
    source = Manifest.read(out).source["description"]
    (checked,) = verify(out, model=source)
    assert checked.report.passed and checked.notes == [], checked.notes
    return source


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".kiln-"))


def test_two_exports_to_one_out_at_once_one_fails_naming_the_other(tmp_path):
    out = tmp_path / "o"
    first = _export_process("zoo:cnn", "--target", "onnx", "--out", out, "-q")
    second = _export_process("zoo:lstm", "--target", "onnx", "--out", out, "-q")
    results = {first.pid: _finish(first), second.pid: _finish(second)}
    (winner,) = [pid for pid, (code, _) in results.items() if code == 0]
    (loser,) = [pid for pid in results if pid != winner]
    code, err = results[loser]
    assert_one_line_error(code, err, f"another kiln export is writing to {out} (pid {winner} ")
    assert "cli.py export zoo:" in err and "--wait" in err
    expected = "zoo:cnn" if winner == first.pid else "zoo:lstm"
    assert _assert_consistent(out) == expected
    assert _leftovers(tmp_path) == []


def test_two_exports_to_one_out_with_wait_run_one_after_the_other(tmp_path):
    out = tmp_path / "o"
    first = _export_process("zoo:cnn", "--target", "onnx", "--out", out, "--wait", "--force")
    second = _export_process("zoo:lstm", "--target", "onnx", "--out", out, "--wait", "--force")
    results = {first.pid: _finish(first), second.pid: _finish(second)}
    assert [code for code, _ in results.values()] == [0, 0], results
    waited = [pid for pid, (_, err) in results.items() if f"waiting for the kiln export writing to {out}" in err]
    assert len(waited) == 1, results
    (other,) = [pid for pid in results if pid != waited[0]]
    assert f"(pid {other} " in results[waited[0]][1]
    # The one that waited published last: its export is the one in place, whole.
    assert _assert_consistent(out) == ("zoo:cnn" if waited[0] == first.pid else "zoo:lstm")
    assert _leftovers(tmp_path) == []


def test_an_export_to_a_locked_out_fails_at_once(tmp_path, capsys):
    out = tmp_path / "o"
    with output_lock(out):
        owner = json.loads(lock_path(out).read_text())
        assert owner["pid"] == os.getpid()
        started = time.monotonic()
        process = _export_process("zoo:cnn", "--target", "onnx", "--out", out)
        code, err = _finish(process)
        assert_one_line_error(code, err, f"(pid {os.getpid()} on ")
        # The same process, through the library: one lock per open file, not per process.
        with pytest.raises(UsageError, match=f"pid {os.getpid()} "):
            kiln.export("zoo:cnn", target="onnx", out=out)
        assert time.monotonic() - started < 120
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock


def test_the_lock_names_the_command_that_holds_it(tmp_path):
    """A tune holding --out: an export (or another tune) is told a kiln tune is writing there, not an export; a
    lock file that does not say which command (an older Kiln, or forged) is named neutrally."""
    out = tmp_path / "o"
    with output_lock(out, command="tune"):
        assert json.loads(lock_path(out).read_text())["kiln"] == "tune"
        with pytest.raises(UsageError, match=f"another kiln tune is writing to {out} \\(pid {os.getpid()} "):
            kiln.export("zoo:cnn", target="onnx", out=out)
        with pytest.raises(UsageError, match="another kiln tune is writing"), output_lock(out, command="tune"):
            pass
        owner = json.loads(lock_path(out).read_text())
        for forged in ({}, {"kiln": "tune; rm -rf /"}, {"kiln": ["tune"]}):
            lock_path(out).write_text(json.dumps({k: v for k, v in owner.items() if k != "kiln"} | forged))
            neutral = f"another Kiln run is writing to {out} \\(pid {os.getpid()} "
            with pytest.raises(UsageError, match=neutral), output_lock(out):
                pass
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_removes_the_lock_and_the_directories_it_made(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "o"
    code, _, err = run_cli("export", "zoo:resnet9000", "--target", "onnx", "--out", out, capsys=capsys)
    assert_one_line_error(code, err, "no built-in model")
    assert list(tmp_path.iterdir()) == []


def _staging_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.glob(f".kiln-{name}-*") if p.is_dir()]


def test_an_export_killed_mid_build_is_cleaned_by_the_next(tmp_path, capsys):
    out = tmp_path / "o"
    process = _export_process("zoo:cnn", "--target", "onnx", "--out", out)
    deadline = time.time() + 300
    while not _staging_dirs(tmp_path, "o"):
        assert process.poll() is None and time.time() < deadline, "the export ended before it was killed"
        time.sleep(0.02)
    time.sleep(0.5)  # into the capture, which takes seconds
    assert process.poll() is None, "the export ended before it was killed"
    process.kill()
    process.communicate(timeout=60)
    (stale,) = _staging_dirs(tmp_path, "o")
    owner = json.loads((stale / STAGING_OWNER).read_text())
    assert owner["pid"] == process.pid and not owner_alive(owner)
    code, _, err = run_cli("verify", stale, capsys=capsys)
    assert_one_line_error(code, err, "staging directory of an unfinished export")

    code, _, err = run_cli("export", "zoo:cnn", "--target", "onnx", "--out", out, "-q", capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    _assert_consistent(out)


KILLED_WHILE_STAGED = """
import os, shutil, signal, sys
from pathlib import Path
from kiln.compiler.export.staging import staging_area
out, export, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with staging_area(out) as staging:
    shutil.copytree(export, staging / "tree")  # a whole export, manifest and all, not yet moved into place
    if step == "mid-swap":
        out.rename(staging / "old")  # install_tree's first move: the export it replaces
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_while_staged(out: Path, export: Path, step: str) -> Path:
    """Run a real staging area in a process that copies `export` into it and is SIGKILLed; its staging dir."""
    script = textwrap.dedent(KILLED_WHILE_STAGED)
    process = subprocess.run([sys.executable, "-c", script, out, export, step], cwd=ROOT, timeout=120)
    assert process.returncode == -signal.SIGKILL
    (staging,) = _staging_dirs(out.parent, out.name)
    return staging


def test_a_killed_runs_staged_export_is_not_an_export(tmp_path, capsys, onnx_exports):
    export = onnx_exports["cnn"]
    out = tmp_path / "o"
    staging = _killed_while_staged(out, export, "staged")
    assert (staging / "tree" / "manifest.json").is_file() and (staging / "tree" / "model.onnx").is_file()
    for path in (staging, staging / "tree"):
        code, _, err = run_cli("verify", path, capsys=capsys)
        assert_one_line_error(code, err, "staging directory of an unfinished export")
        code, _, err = run_cli("run", path, "--inputs", export / "parity" / "inputs.npz", capsys=capsys)
        assert_one_line_error(code, err, "staging directory of an unfinished export")
        with pytest.raises(UsageError, match="staging directory"):
            kiln.load(path)
    with output_lock(out):  # what every export to `out` takes first
        pass
    assert list(tmp_path.iterdir()) == []


def test_an_export_killed_mid_swap_gets_the_old_export_back(tmp_path, onnx_exports):
    out = tmp_path / "o"
    shutil.copytree(onnx_exports["cnn"], out)
    staging = _killed_while_staged(out, onnx_exports["lstm"], "mid-swap")
    assert not out.exists() and (staging / OLD / "manifest.json").is_file()
    with output_lock(out):
        assert _assert_consistent(out) == "zoo:cnn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_old_style_leftover_of_a_killed_swap(tmp_path, onnx_exports):
    """Kiln before the owner files left `.kiln-old-OUT-.kiln-OUT-XXXX` beside `out` when killed mid-swap."""
    out = tmp_path / "o"
    shutil.copytree(onnx_exports["cnn"], tmp_path / ".kiln-old-o-.kiln-o-abc123")
    with output_lock(out):
        assert _assert_consistent(out) == "zoo:cnn"
    shutil.copytree(onnx_exports["lstm"], tmp_path / ".kiln-old-o-.kiln-o-def456")
    with output_lock(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert Manifest.read(out).source["description"] == "zoo:cnn"


def test_a_live_or_foreign_staging_dir_is_kept(tmp_path):
    out = tmp_path / "o"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with staging_area(out) as mine:
            owners = {}
            for name, change in {
                "live": {"pid": sleeper.pid, "start_ticks": None},
                "other-host": {"host": "another-host", "pid": 1},
                "other-out": {"out": str(tmp_path / "o2"), "pid": 2**22 + 1},
            }.items():
                owner = json.loads((mine / STAGING_OWNER).read_text()) | change
                owners[name] = tmp_path / f".kiln-o-{name}"
                owners[name].mkdir()
                (owners[name] / STAGING_OWNER).write_text(json.dumps(owner))
            live = json.loads((mine / STAGING_OWNER).read_text())
            live |= {"pid": sleeper.pid, "start_ticks": process_start(sleeper.pid)}
            assert owner_alive(live)
            reused = live | {"start_ticks": "1"}  # the PID of a live process, but not the process that staged
            (tmp_path / ".kiln-o-reused").mkdir()
            (tmp_path / ".kiln-o-reused" / STAGING_OWNER).write_text(json.dumps(reused))
            with output_lock(out):
                assert mine.is_dir()  # this process's own
                assert all(d.is_dir() for d in owners.values())
                assert not (tmp_path / ".kiln-o-reused").exists()
            sleeper.kill()
            sleeper.wait()
            assert not owner_alive(live)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_install_keeps_the_old_export_when_the_new_cannot_move_in(tmp_path, onnx_exports):
    out = tmp_path / "o"
    shutil.copytree(onnx_exports["cnn"], out)
    with staging_area(out) as staging:
        with pytest.raises(KilnError, match="previous export is unchanged"):
            install_tree(staging / "tree", out)  # no tree: it cannot be moved in
        assert not (staging / OLD).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert _assert_consistent(out) == "zoo:cnn"


def test_ctrl_c_between_the_swaps_two_renames_keeps_the_old_export(tmp_path, onnx_exports):
    out = tmp_path / "o"
    shutil.copytree(onnx_exports["cnn"], out)
    with pytest.raises(KeyboardInterrupt), staging_area(out) as staging:
        shutil.copytree(onnx_exports["lstm"], staging / "tree")
        out.rename(staging / OLD)  # install_tree's first rename, as Ctrl-C arrives before its second
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert _assert_consistent(out) == "zoo:cnn"


@pytest.mark.parametrize("force", [False, True])
def test_out_naming_a_file_is_refused_even_with_force(tmp_path, capsys, force):
    out = tmp_path / "model.onnx"
    out.write_text("mine")
    code, _, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx", "--out", out, *(["--force"] if force else []), capsys=capsys
    )
    assert_one_line_error(code, err, f"--out {out} is a file, not a directory")
    assert out.read_text() == "mine"
    assert list(tmp_path.iterdir()) == [out]
