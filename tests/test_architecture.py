"""The rules of docs/architecture.md, checked on the source itself: who may import what (by package prefix), no
import cycle, a name has one home (no re-export shims, no private name imported across files), the core never
switches on a target's name, and the size limits. Every import counts, at any depth: module level, inside a
function, under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "targets")
COMMAND_LINE = ("kiln.cli", "kiln.cli_parser", "kiln.cli_matrix")
OUTSIDE = ("tests", "benchmarks", "examples")  # code that uses the package from outside

# Module groups. A name ending in ".*" is a package with every module below it; any other name is one module.
LEAF = (  # import nothing of Kiln but each other
    "kiln.compiler.errors",
    "kiln.compiler.types",
    "kiln.compiler.metrics",
    "kiln.compiler.image_layout",
    "kiln.compiler.onnx_metadata",
    "kiln.compiler.ort_session",
    "kiln.compiler.large_graphs",
)
HELPERS = (  # the core's small services, above the leaves
    "kiln.compiler.progress",
    "kiln.compiler.limits",
    "kiln.compiler.safe_fs",
    "kiln.compiler.signals",
    "kiln.compiler.host",
    "kiln.compiler.processes",
    "kiln.compiler.backend_errors",
    "kiln.compiler.pages",
    "kiln.compiler.memory",
    "kiln.compiler.safetensors_file",
)
CAPTURE = ("kiln.compiler.capture.*",)
QUANTIZATION = ("kiln.compiler.quantization.*",)
PASSES = ("kiln.passes.*",)
REGISTRY = ("kiln.targets", "kiln.targets.base")  # how the core knows targets
FLOW = ("kiln.compiler.export.*", "kiln.compiler.parity.*", "kiln.compiler.diagnose.*", "kiln.compiler.generation.*")
TOOLS = ("kiln.compiler.perf.*", "kiln.compiler.matrix.*")

# Who may import what: each module follows the row of the longest prefix that names it (docs/architecture.md has the
# same table). Nothing but the command line imports the command line (kiln.cli*).
IMPORT_RULES: dict[str, tuple[str, ...]] = {
    "kiln": (*LEAF, *FLOW, *TOOLS),  # the library API: `kiln.export`, `kiln.load` and the steps, loaded on use
    "kiln.compiler": (),
    **{leaf: LEAF for leaf in LEAF},
    **{helper: (*LEAF, *HELPERS) for helper in HELPERS},
    "kiln.passes": (*LEAF, *PASSES),
    "kiln.compiler.capture": (*LEAF, *HELPERS, *CAPTURE, "kiln.compiler.generation.decoding"),
    "kiln.compiler.generation.decoding": LEAF,  # the decoding loop runs on numpy alone, on any runtime
    "kiln.compiler.quantization": (*LEAF, *HELPERS, *CAPTURE, *QUANTIZATION),
    "kiln.targets.base": (*LEAF, *HELPERS, *CAPTURE, *QUANTIZATION),
    "kiln.targets": (*LEAF, *HELPERS, *PASSES, *CAPTURE, *QUANTIZATION, "kiln.targets.*"),
    **{flow.removesuffix(".*"): (*LEAF, *HELPERS, *PASSES, *CAPTURE, *QUANTIZATION, *REGISTRY, *FLOW) for flow in FLOW},
    **{
        tool.removesuffix(".*"): ("kiln", *LEAF, *HELPERS, *PASSES, *CAPTURE, *QUANTIZATION, *REGISTRY, *FLOW, *TOOLS)
        for tool in TOOLS
    },
    **{command: ("kiln.*",) for command in COMMAND_LINE},
}
# Size rules that reward clarity: a file past this has stopped being one concept, a function past that one step.
# Below them, split a file where the concept splits, never to meet a number (docs/architecture.md).
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# Functions allowed past the limit, each with the reason its docstring gives.
LONG_FUNCTIONS: dict[str, str] = {}


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _kiln_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package `kiln` by import name: `kiln.compiler.capture.program` for
    compiler/capture/program.py, `kiln` for the root __init__.py."""
    paths = [p for package in PACKAGES for p in (root / package).rglob("*.py")]
    paths += [*root.glob("cli*.py"), root / "__init__.py"]
    return {_name(p, root): p for p in sorted(paths) if p.exists()}


def _name(path: Path, root: Path = ROOT) -> str:
    return ".".join(("kiln", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


@dataclass(frozen=True)
class Import:
    """One `import` or `from ... import` of a Kiln module: the module it loads, and the name taken from it (None:
    the module itself)."""

    module: str
    name: str | None
    line: int


def _imports(path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a Kiln module in `path`, at any depth, resolved to the module file it loads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = alias.name
                while module and module not in modules:
                    module = module.rpartition(".")[0]
                if module:
                    found.append(Import(module, None, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    found.append(Import(f"{node.module}.{alias.name}", None, node.lineno))
                elif node.module in modules:
                    found.append(Import(node.module, alias.name, node.lineno))
    return found


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        package = pattern.removesuffix(".*")
        return module == package or module.startswith(package + ".")
    return module == pattern


def _row(module: str) -> str:
    """The IMPORT_RULES row `module` follows: the longest prefix naming it."""
    rows = [r for r in IMPORT_RULES if module == r or module.startswith(r + ".")]
    assert rows, f"{module} has no row in IMPORT_RULES: add its package to the table (and to docs/architecture.md)"
    return max(rows, key=len)


def import_violations(modules: dict[str, Path]) -> list[str]:
    """Each import that the IMPORT_RULES row of its module does not allow."""
    bad = []
    for module, path in modules.items():
        allowed = IMPORT_RULES[_row(module)]
        for found in _imports(path, modules):
            if found.module != module and not any(_matches(found.module, p) for p in allowed):
                bad.append(f"{module}:{found.line} imports {found.module} (row {_row(module)})")
    return bad


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The import cycles between modules (Tarjan's strongly connected components of more than one module)."""
    graph = {m: sorted({i.module for i in _imports(p, modules)} - {m}) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def _bound_at_top(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names a module defines, names it only imports) at its top level, `if` and `try` blocks included."""
    defined: set[str] = set()
    imported: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                imported.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return defined, imported - defined


def _exported(tree: ast.Module) -> set[str]:
    """The names in `__all__`."""
    names: set[str] = set()
    for node in tree.body:
        if (
            isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
            and "__all__" in ast.unparse(node).split("=")[0]
        ):
            names |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return names


def shims(modules: dict[str, Path]) -> list[str]:
    """Names a module re-exports: imported from another Kiln module and listed in its `__all__`, or imported at
    its top level and never used in it. The root `kiln` is the library API and may (its `__all__`)."""
    found = []
    for module, path in modules.items():
        if module == "kiln":
            continue
        tree = ast.parse(path.read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        exported = _exported(tree)
        top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        top += [n for b in tree.body if isinstance(b, ast.If) for n in b.body if isinstance(n, ast.ImportFrom)]
        for node in top:
            if not (node.module or "").startswith("kiln"):
                continue
            for alias in node.names:
                bound = alias.asname or alias.name
                if bound in exported or bound not in used:
                    found.append(f"{module}:{node.lineno} re-exports {node.module}.{alias.name}")
    return found


def imports_away_from_home(importers: dict[str, Path], modules: dict[str, Path]) -> list[str]:
    """`from M import name` where M does not define `name` but imports it from its home (and `M.name` uses)."""
    bound = {m: _bound_at_top(ast.parse(p.read_text())) for m, p in modules.items()}
    api = _exported(ast.parse(modules["kiln"].read_text()))
    found = []
    for importer, path in importers.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
                for alias in node.names:
                    module = f"{node.module}.{alias.name}"
                    if module in modules:
                        aliases[alias.asname or alias.name] = module
                    elif alias.name in bound[node.module][1] and not _public_api(
                        importer, node.module, alias.name, api
                    ):
                        found.append(f"{importer}:{node.lineno} imports {alias.name} from {node.module}, not its home")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                module = aliases[node.value.id]
                if node.attr in bound[module][1]:
                    found.append(f"{importer}:{node.lineno} uses {module}.{node.attr}, not its home")
    return found


def _public_api(importer: str, module: str, name: str, api: set[str]) -> bool:
    """Code outside the package (tests, examples, benchmarks) may take the library API from `kiln`."""
    return module == "kiln" and name in api and not importer.startswith("kiln")


def private_imports(modules: dict[str, Path]) -> list[str]:
    """A private `_name` imported from another module, or used as `module._name`."""
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for found_import in _imports(path, modules):
            name = found_import.name or ""
            if name.startswith("_") and not name.startswith("__") and found_import.module != module:
                found.append(f"{module}:{found_import.line} imports {found_import.module}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


# What names a target in the core's code: `x.name`, `x.target` (an artifact's, a manifest's), or a variable so named.
TARGET_NAME_ATTRIBUTES = {"name", "target"}
TARGET_NAME_VARIABLES = {"target", "target_name", "name"}


def _target_names() -> set[str]:
    from kiln.targets import TARGETS

    return {name for target in TARGETS for name in (target.name, *target.aliases)}


def _strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("frozenset", "set", "tuple"):
        return [s for arg in node.args for s in _strings(arg)]
    return []


def _names_a_target(node: ast.expr) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in TARGET_NAME_ATTRIBUTES
    return isinstance(node, ast.Name) and node.id in TARGET_NAME_VARIABLES


def name_switches(path: Path, targets: set[str]) -> list[str]:
    """Comparisons (==, !=, in, not in) of a target's name with a string literal naming a target or an alias, and
    module-level collections of target names: what a target can do belongs on the target."""
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_a_target(a) for a in sides) and any(set(_strings(b)) & targets for b in sides):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            values = _strings(node.value) if not isinstance(node.value, ast.Constant) else []
            if values and set(values) <= targets:
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_imports_follow_the_table_by_package_prefix():
    assert import_violations(_kiln_files()) == []


def test_nothing_imports_the_command_line():
    modules = _kiln_files()
    found = [
        f"{m} imports {i.module}"
        for m, p in modules.items()
        if m not in COMMAND_LINE
        for i in _imports(p, modules)
        if i.module in COMMAND_LINE
    ]
    assert found == []


def test_no_import_cycle():
    assert import_cycles(_kiln_files()) == []


def test_a_name_has_one_home():
    modules = _kiln_files()
    outside = {
        str(p.relative_to(ROOT)): p for d in ("tests", "benchmarks", "examples") for p in (ROOT / d).rglob("*.py")
    }
    assert shims(modules) == []
    assert imports_away_from_home({**modules, **outside}, modules) == []


def test_no_private_name_crosses_a_file():
    assert private_imports(_kiln_files()) == []


def test_the_core_never_switches_on_a_target_name():
    targets = _target_names()
    assert {"onnx", "openvino", "ort", "cpu"} <= targets  # names and aliases, from the registry
    assert [s for path in _sources("compiler") for s in name_switches(path, targets)] == []


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return _kiln_files(tmp_path)


def test_the_rules_can_fail(tmp_path):
    modules = _package(
        tmp_path,
        {
            "__init__.py": "",
            "cli.py": "",
            "compiler/__init__.py": "",
            "compiler/errors.py": "from kiln.compiler.types import Feeds\n",
            "compiler/types.py": "def _hidden():\n    from kiln.compiler.errors import x\n",
            "compiler/capture/__init__.py": "",
            "compiler/capture/program.py": (
                "from kiln.compiler.types import _hidden\nfrom kiln.compiler.errors import Feeds\n__all__ = ['Feeds']\n"
            ),
            "passes/__init__.py": (
                "def run():\n    from kiln.targets.onnxrt import OnnxRuntimeRunner\n    import kiln.cli\n"
            ),
            "targets/__init__.py": "",
            "targets/onnxrt.py": "",
        },
    )
    assert [i.module for i in _imports(modules["kiln.passes"], modules)] == ["kiln.targets.onnxrt", "kiln.cli"]
    assert import_violations(modules) == [
        "kiln.passes:2 imports kiln.targets.onnxrt (row kiln.passes)",
        "kiln.passes:3 imports kiln.cli (row kiln.passes)",
    ]
    assert import_cycles(modules) == [["kiln.compiler.errors", "kiln.compiler.types"]]
    assert private_imports(modules) == ["kiln.compiler.capture.program:1 imports kiln.compiler.types._hidden"]
    assert shims(modules) == [
        "kiln.compiler.capture.program:1 re-exports kiln.compiler.types._hidden",  # imported, never used
        "kiln.compiler.capture.program:2 re-exports kiln.compiler.errors.Feeds",  # in __all__
        "kiln.compiler.errors:1 re-exports kiln.compiler.types.Feeds",
    ]
    assert imports_away_from_home(modules, modules) == [
        "kiln.compiler.capture.program:2 imports Feeds from kiln.compiler.errors, not its home"
    ]


def test_a_name_switch_is_found(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'FAST = ("onnx", "openvino")\n'
        'KINDS = ("fp32", "int8")\n'
        "def f(artifact, target, t):\n"
        '    if artifact.target == "ort" or target in ("tflite", "x"):\n'
        "        return t.kv_cache == 'static' and t.consumes == 'onnx'\n"
    )
    assert name_switches(sample, _target_names()) == [
        "sample.py:4 artifact.target == 'ort'",
        "sample.py:4 target in ('tflite', 'x')",
        "sample.py:1 FAST = ('onnx', 'openvino')",
    ]


def package_totals() -> dict[str, tuple[int, int]]:
    """Modules and lines of each package (and its subpackages), for the report at the end of a test run."""
    totals: dict[str, tuple[int, int]] = {}
    for path in _sources(*PACKAGES):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        modules, lines = totals.get(package, (0, 0))
        totals[package] = (modules + 1, lines + len(path.read_text().splitlines()))
    return dict(sorted(totals.items()))


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    yield from (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_stay_small(package):
    too_long = []
    for path in _sources(package):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{_name(path)}: {len(text.splitlines())} lines")
        for node in _functions(ast.parse(text)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            key = f"{_name(path)}.{node.name}"
            if length > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                too_long.append(f"{key}: {length} lines")
    assert too_long == []
