"""The import rules of docs/architecture.md, and the size limits of the code, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "targets")
# The modules of `compiler` that `passes` may use: leaf modules that import nothing else of Kiln.
LEAF_MODULES = {"kiln.compiler.errors", "kiln.compiler.types", "kiln.compiler.image_layout", "kiln.compiler.metrics"}
# The export flow of `compiler`: targets are called by it and must not call back into it.
FLOW_MODULES = ("kiln.compiler.export", "kiln.compiler.parity.reference", "kiln.compiler.matrix")
# Size rules that reward clarity: a file past this has stopped being one concept, a function past that one step.
# Below them, split a file where the concept splits, never to meet a number (docs/architecture.md).
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# Functions allowed past the limit, each with the reason its docstring gives.
LONG_FUNCTIONS: dict[str, str] = {}


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, at any depth (functions and TYPE_CHECKING blocks included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _name(path: Path) -> str:
    """The module's import name: `kiln.compiler.capture.program` for compiler/capture/program.py."""
    return ".".join(("kiln", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def _violations(packages: tuple[str, ...], forbidden: callable) -> list[str]:  # type: ignore[valid-type]
    return [f"{_name(p)} imports {m}" for p in _sources(*packages) for m in _imports(p) if forbidden(m)]


def test_no_package_imports_the_command_line():
    command_line = ("kiln.cli", "kiln.cli_parser", "kiln.cli_matrix")
    assert (
        _violations(PACKAGES, lambda m: m in command_line or m.startswith(tuple(c + "." for c in command_line))) == []
    )


def test_the_core_knows_targets_only_through_the_registry():
    def forbidden(module: str) -> bool:
        if not module.startswith("kiln.targets."):
            return False
        allowed = (
            "kiln.targets.base",
            "kiln.targets.get_target",
            "kiln.targets.TARGETS",
            "kiln.targets.resolve_targets",
        )
        return not module.startswith(allowed) and module not in {
            "kiln.targets.Target",
            "kiln.targets.Runner",
            "kiln.targets.BuildRequest",
            "kiln.targets.BuildOutput",
            "kiln.targets.onnx_reference_runner",
        }

    assert _violations(("compiler",), forbidden) == []


def test_passes_use_only_the_leaf_modules_of_the_core():
    def forbidden(module: str) -> bool:
        if module.startswith("kiln.targets"):
            return True
        if not module.startswith("kiln.compiler"):
            return False
        return not any(module == leaf or module.startswith(leaf + ".") for leaf in LEAF_MODULES)

    assert _violations(("passes",), forbidden) == []


def test_leaf_modules_import_nothing_else_of_kiln():
    for module in LEAF_MODULES:
        path = ROOT / Path(*module.split(".")[1:]).with_suffix(".py")
        kiln = [m for m in _imports(path) if m.startswith("kiln.")]
        assert all(any(m == leaf or m.startswith(leaf + ".") for leaf in LEAF_MODULES) for m in kiln), (module, kiln)


def test_targets_do_not_call_back_into_the_export_flow():
    assert _violations(("targets",), lambda m: m.startswith(FLOW_MODULES)) == []


def test_the_rules_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from kiln.targets.onnxrt import OnnxRuntimeRunner\n    import kiln.cli\n")
    assert _imports(sample) == ["kiln.targets.onnxrt", "kiln.targets.onnxrt.OnnxRuntimeRunner", "kiln.cli"]


def package_totals() -> dict[str, tuple[int, int]]:
    """Modules and lines of each package (and its subpackages), for the report at the end of a test run."""
    totals: dict[str, tuple[int, int]] = {}
    for path in _sources(*PACKAGES):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        modules, lines = totals.get(package, (0, 0))
        totals[package] = (modules + 1, lines + len(path.read_text().splitlines()))
    return dict(sorted(totals.items()))


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_stay_small(package):
    too_long = []
    for path in _sources(package):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{_name(path)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                key = f"{_name(path)}.{node.name}"
                if length > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    too_long.append(f"{key}: {length} lines")
    assert too_long == []
