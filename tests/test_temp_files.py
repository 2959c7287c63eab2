"""Converters' own temporary files go into the export's staging directory: an export killed with SIGKILL
leaves nothing in the system's temporary directory, and the next export to the same output removes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.export.staging import converter_temp_files

from tests.conftest import ROOT

# A real export whose onnx build, once done, makes temporary files as converters do (Python's tempfile and a
# native tool reading TMPDIR), then is killed before it can clean anything.
KILLED_AFTER_CONVERTING = """
import os, signal, subprocess, sys, tempfile
from pathlib import Path
import kiln.targets.onnxrt as onnxrt
from kiln.compiler.export.pipeline import export_targets

real_build = onnxrt.OnnxRuntimeTarget.build

def build(self, model, directory, request):
    built = real_build(self, model, directory, request)
    tempfile.mkdtemp(prefix="converter-python-")
    subprocess.run(["mktemp", "-d", "-t", "converter-native-XXXX"], check=True, capture_output=True)
    os.kill(os.getpid(), signal.SIGKILL)

onnxrt.OnnxRuntimeTarget.build = build
export_targets("zoo:cnn", "onnx", Path(sys.argv[1]))
"""


def test_a_killed_export_leaves_no_temporary_files_outside_its_staging_dir(tmp_path):
    system_tmp, out = tmp_path / "tmp", tmp_path / "exports" / "cnn"
    system_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(system_tmp), TEMP=str(system_tmp), TMP=str(system_tmp))
    script = textwrap.dedent(KILLED_AFTER_CONVERTING)
    process = subprocess.run([sys.executable, "-c", script, out], cwd=ROOT, env=env, timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert list(system_tmp.iterdir()) == []
    (staging,) = out.parent.glob(".kiln-cnn-*")
    left = [p.name for p in (staging / "tmp").iterdir()]
    assert {name.rsplit("-", 1)[0] for name in left} >= {"converter-python", "converter-native"}, left

    (result,) = export_targets("zoo:cnn", "onnx", out)  # the next export removes the killed one's staging
    assert result.published and sorted(p.name for p in out.parent.iterdir()) == ["cnn"]


def test_temporary_files_are_redirected_for_the_block_only(tmp_path):
    before, variables = tempfile.gettempdir(), {n: os.environ.get(n) for n in ("TMPDIR", "TEMP", "TMP")}
    with converter_temp_files(tmp_path / "outer") as outer:
        assert tempfile.gettempdir() == str(outer) and os.environ["TMPDIR"] == str(outer)
        with converter_temp_files(tmp_path / "inner"):  # nested: the outer directory stays
            assert tempfile.gettempdir() == str(outer)
        assert tempfile.gettempdir() == str(outer)
    assert tempfile.gettempdir() == before
    assert {n: os.environ.get(n) for n in ("TMPDIR", "TEMP", "TMP")} == variables
