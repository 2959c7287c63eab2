"""Shared fixtures: exports of the zoo models built once per session, and CLI helpers."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiln import cli  # noqa: E402
from kiln.compiler.export.options import ExportOptions, Shapes  # noqa: E402
from kiln.compiler.export.pipeline import export_targets  # noqa: E402
from kiln.compiler.export.result import ExportResult  # noqa: E402

USER_MODELS = ROOT / "tests" / "models" / "user_models.py"
ZOO_MODELS = ("cnn", "mobilenet", "transformer", "lstm", "decoder", "unet", "detector", "multimodal")
CPU_TARGETS = "onnx,openvino,pt2"

warnings.filterwarnings("ignore")
logging.getLogger("torch").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def kiln_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Compile caches (aoti packages) go to a temporary directory for the session, never to ~/.cache/kiln."""
    from kiln.targets.compile_cache import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("kiln-cache"))
    yield Path(os.environ[CACHE_ENV])
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def zoo_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, ExportResult]]:
    """Every zoo model exported once to every CPU target: model -> target -> result."""
    root = tmp_path_factory.mktemp("zoo")
    exports = {}
    for name in ZOO_MODELS:
        results = export_targets(f"zoo:{name}", CPU_TARGETS, root / name, ExportOptions())
        exports[name] = {r.target: r for r in results}
    return exports


@pytest.fixture(scope="session")
def dynamic_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """The transformer exported with a dynamic batch of 1..8 to ONNX and OpenVINO."""
    out = tmp_path_factory.mktemp("dynamic") / "transformer"
    from kiln.compiler.capture.dynamic import DynamicBatch

    results = export_targets("zoo:transformer", "onnx,openvino", out, ExportOptions(shapes=Shapes(DynamicBatch(1, 8))))
    return {r.target: r for r in results}


@pytest.fixture(scope="session")
def cnn_onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zoo:cnn exported to onnx alone (a few seconds): a small export for tests to copy and tamper with."""
    out = tmp_path_factory.mktemp("cnn-onnx") / "cnn"
    (result,) = export_targets("zoo:cnn", "onnx", out, ExportOptions())
    assert result.published
    return out


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The size of each package at the end of every run (tests/test_architecture.py keeps files under 600 lines and
    functions under 80; the totals show where the code grows)."""
    from tests.test_architecture import package_totals

    terminalreporter.section("package totals")
    for package, (modules, lines) in package_totals().items():
        terminalreporter.write_line(f"{package:<24} {modules:>3} modules {lines:>6} lines")
