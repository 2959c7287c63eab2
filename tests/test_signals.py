"""SIGTERM (what `kill`, systemd, Kubernetes and CI runners send) cleans up like Ctrl-C and exits 143.

Each command runs as a real process, gets one SIGTERM mid-work, and must exit 143 with one line, leave no
staging directory, lock file or temporary file, and leave no process of its own running (worker and cell
processes included: every process it started carries a marker in its environment).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kiln.compiler.errors import EXIT_TERMINATED

from tests.conftest import ROOT

MARK = "KILN_SIGNAL_TEST"
B = ("--targets", "onnx", "--precisions", "fp32", "--no-plain", "--no-runtime-search", "--io", "nchw")


def _default_signals() -> None:
    """In the child: the default actions, even when this test runs where they are ignored (a shell's
    background job ignores SIGINT, and Python keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _marked(mark: str) -> list[int]:
    """The live processes whose environment carries `mark`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{MARK}={mark}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _terminate(argv: list, tmp: Path, started: bytes, children: bool) -> tuple[int, str, str]:
    """Run `kiln ARGV`, wait for `started` on its stderr (and, with `children`, for a process it started), send
    SIGTERM once; its exit code, its stderr, and the marker of its processes."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp), **{MARK: mark})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *map(str, argv)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )
    seen = b""
    deadline = time.monotonic() + 240
    while started not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += os.read(process.stderr.fileno(), 1)
    while children and len(_marked(mark)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    assert process.poll() is None, f"ended before it was sent SIGTERM: {seen.decode()}"
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=180)[1]
    return process.returncode, (seen + err).decode(), mark


def _assert_terminated(code: int, err: str, mark: str) -> None:
    assert code == EXIT_TERMINATED, err
    assert "kiln: terminated (SIGTERM)" in err and "Traceback" not in err, err
    for _ in range(50):  # killed and reaped before Kiln exits; /proc may lag a moment
        if not _marked(mark):
            break
        time.sleep(0.1)
    assert not _marked(mark), "a process Kiln started is still running"


@pytest.fixture
def child_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("child-tmp")


def test_sigterm_mid_export_cleans_up(tmp_path, child_tmp):
    code, err, mark = _terminate(["export", "zoo:cnn", "--target", "onnx", "--out", tmp_path / "o"], child_tmp,
                                 b"capture", children=False)  # fmt: skip
    _assert_terminated(code, err, mark)
    assert "nothing was published" in err
    assert list(tmp_path.iterdir()) == [], "no staging directory, no lock file"
    assert list(child_tmp.iterdir()) == [], "no temporary file"


def test_sigterm_mid_bench_stops_its_workers(cnn_onnx_export, tmp_path, child_tmp):
    export = shutil.copytree(cnn_onnx_export, tmp_path / "cnn")
    argv = ["bench", export, "--rounds", "1000", "--runs", "50", "--warmup", "1"]
    code, err, mark = _terminate(argv, child_tmp, b"round 1/", children=True)
    _assert_terminated(code, err, mark)
    assert not (export / "bench.json").exists(), "an interrupted run writes no report"


def test_sigterm_mid_matrix_stops_its_cells(tmp_path, child_tmp):
    out = tmp_path / "m"
    argv = ["matrix", "--models", "zoo:cnn", "--targets", "onnx", "--precisions", "fp32", "--no-cache", "--out", out]
    code, err, mark = _terminate(argv, child_tmp, b"matrix: 1 cells", children=True)
    _assert_terminated(code, err, mark)
    assert "run the same command again to resume" in err
    assert not (out / "results.jsonl").is_file() or not (out / "results.jsonl").read_text().strip()


def test_sigterm_mid_tune_stops_its_builds(tmp_path, child_tmp):
    out = tmp_path / "t"
    code, err, mark = _terminate(["tune", "zoo:cnn", "--out", out, *B, "--build-only"], child_tmp, b"",
                                 children=True)  # fmt: skip
    _assert_terminated(code, err, mark)
    assert not (out / "best").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".kiln-")]
