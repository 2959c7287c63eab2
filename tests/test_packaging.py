"""Kiln installs as one import name, `kiln`: a deployment script in a folder holding its own `targets.py`,
`cli.py` and `compiler/` exports a model (the old generic top-level names broke it), the wheel holds `kiln` alone,
and `python cli.py` still runs from a checkout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile

from tests.conftest import ROOT

DEPLOY = """\
import kiln
import targets  # the deployment's own list of environments, not Kiln's

assert targets.ENVIRONMENTS == ["staging", "production"]
result = kiln.export("zoo:cnn", target="onnx", out="exported")
print("published" if result.published else "rejected", result.target)
"""


def test_a_deployment_folder_with_its_own_targets_cli_and_compiler_exports(tmp_path):
    (tmp_path / "targets.py").write_text('ENVIRONMENTS = ["staging", "production"]\n')
    (tmp_path / "cli.py").write_text("raise SystemExit('the deployment's own cli.py must not be imported')\n")
    (tmp_path / "compiler").mkdir()
    (tmp_path / "compiler" / "__init__.py").write_text("raise ImportError('the deployment's own compiler/')\n")
    (tmp_path / "deploy.py").write_text(DEPLOY)
    run = subprocess.run([sys.executable, "deploy.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "published onnx"
    assert (tmp_path / "exported" / "model.onnx").is_file()


def test_the_wheel_installs_one_top_level_name(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("kiln-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"kiln"}
    assert {"kiln/__init__.py", "kiln/cli.py", "kiln/compiler/export/pipeline.py", "kiln/targets/onnxrt.py"} <= set(
        names
    )
    assert not [n for n in names if n.startswith(("kiln/tests/", "kiln/benchmarks/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kiln = kiln.cli:main_entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_python_cli_py_runs_from_a_checkout(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys
        sys.exit(subprocess.run([sys.executable, {str(ROOT / "cli.py")!r}, "targets"]).returncode)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]
    assert "onnx" in run.stdout and "openvino" in run.stdout
