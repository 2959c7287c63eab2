"""The documentation holds together: every relative link in README.md, examples/README.md and docs/*.md leads to
a file (and a heading) that exists, every repository path and dotted name they mention exists, and every flag of
the command line is documented somewhere under docs/."""

from __future__ import annotations

import argparse
import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kiln.cli_parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^()\s]*(?:\([^()\s]*\)[^()\s]*)*)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# A path in the repository: a top-level folder of the code, its subfolders, and a file with its extension (or
# nothing: the folder itself). `targets/precisions` in prose is only `targets/`.
REPO_PATH = re.compile(
    r"(?<![\w/.~$-])(?:compiler|passes|targets|tests|benchmarks|examples|docs|\.ci|\.github)/(?:[\w-]+/)*(?:[\w-]+\.\w+)?"
)
# ... and the name after it: `file.py:name`, or `file.py: name` closing a code span (not `file.py:17`, a line).
REPO_PATH_AND_NAME = re.compile(REPO_PATH.pattern + r"(?::[A-Za-z_]\w*|: \w+(?=`))?")
# A dotted name of the package: `compiler.x.y` (the repository's view) or `kiln.compiler.x.y` (the installed one).
DOTTED = re.compile(r"(?<![\w./-])(?:kiln\.)?(?:compiler|passes|targets|cli|cli_parser|cli_matrix)(?:\.\w+)+(?!\.?\w)")


def prose_lines(page: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text in lower case, punctuation but `-` and `_` dropped,
    spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings give, duplicates numbered as GitHub numbers them (`name`, `name-1`, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(page):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        base = anchor(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every Markdown link outside code (fenced blocks and inline code spans)."""
    for number, line in prose_lines(page):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, match.group(2)


def test_anchor_is_githubs() -> None:
    assert anchor("Dynamic dimensions (`--dynamic`, `--dynamic-batch`, `--buckets`)") == (
        "dynamic-dimensions---dynamic---dynamic-batch---buckets"
    )
    assert anchor("Security: what Kiln trusts") == "security-what-kiln-trusts"
    assert anchor("`report.json` (schema `kiln.matrix.report`, version 1)") == (
        "reportjson-schema-kilnmatrixreport-version-1"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not destination.exists():
            broken.append(f"{where}: no such file")
        elif fragment and (destination.suffix != ".md" or fragment not in anchors(destination)):
            broken.append(f"{where}: no heading #{fragment} in {destination.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_the_link_check_catches_a_broken_link(tmp_path: Path) -> None:
    """The check above is not vacuous: a wrong file and a wrong heading are both found."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [it](#title), [x](#nothing), [y](gone.md), and `[z](in-code.md)`.\n")
    assert [target for _, target in links(page)] == ["#title", "#nothing", "gone.md"]
    assert anchors(page) == {"title"}


def mentioned(pattern: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    """(where, text) of every match of `pattern` in the pages, code blocks included."""
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in pattern.finditer(line):
                yield f"{page.relative_to(ROOT)}:{number}", match.group(0)


def test_repository_paths_exist() -> None:
    """`compiler/perf/tune.py`, `benchmarks/`, `tests/models/planted.py:overflow` ...: each file or folder is there,
    and so is the name after a file's colon (placeholders such as `targets/NAME.py` are left out)."""
    missing = []
    for where, path in mentioned(REPO_PATH_AND_NAME):
        file, _, name = (part.strip() for part in path.partition(":"))
        if re.search(r"[A-Z]{3,}|<", path):
            continue
        if not (ROOT / file.rstrip("/.")).exists():
            missing.append(f"{where}: {file}")
        elif name and file.endswith(".py") and name not in defined_names(ROOT / file):
            missing.append(f"{where}: {name} is not defined in {file}")
    assert not missing, "\n".join(missing)


@functools.cache
def defined_names(module: Path) -> set[str]:
    """The names a module defines at its top level or on its classes (functions, classes, assignments)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def resolves(dotted: str) -> bool:
    """Whether `compiler.a.b.name` (or `kiln.compiler...`) is a module of the repository, or a name one defines."""
    if dotted.endswith(".py"):  # a file: `cli.py`
        return (ROOT / dotted).is_file()
    if dotted.endswith(".md"):  # a page, `passes.md`: the link test checks where pages lead
        return True
    parts = dotted.split(".")
    if parts[0] == "kiln":
        parts = parts[1:]
    for split in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:split])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            rest = parts[split:]
            return not rest or rest[0] in defined_names(module)
    return False


def test_dotted_names_exist() -> None:
    """`compiler.diagnose.cut.live_at`, `kiln.compiler.errors.InternalError` ...: each names a module of the
    repository or a name one of them defines, so a moved or renamed module is not left behind in the docs."""
    missing = [f"{where}: {name}" for where, name in mentioned(DOTTED) if not resolves(name)]
    assert not missing, "\n".join(missing)


def test_the_name_check_catches_a_moved_name() -> None:
    assert resolves("compiler.diagnose.cut.live_at") and resolves("kiln.compiler.export.pipeline")
    assert not resolves("compiler.divergence.localize")  # the module moved to compiler/diagnose/
    assert not resolves("compiler.load")  # the library's load is kiln.load


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand of `kiln` (and their own subcommands, `kiln matrix merge`), with its parser."""
    pending = [("kiln", build_parser())]
    while pending:
        name, parser = pending.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child, child_parser in action.choices.items():
                    pending.append((f"{name} {child}", child_parser))
                    yield f"{name} {child}", child_parser


def flag_documented(flag: str, text: str) -> bool:
    """`--dynamic` in the text as a flag of its own (not only as the start of `--dynamic-batch`); `-O` also as
    `-O2`."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![A-Za-z-])", text) is not None


def docs_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in sorted((ROOT / "docs").glob("*.md")))


def undocumented(command: str) -> list[str]:
    parser = dict(commands())[command]
    flags = [flag for action in parser._actions for flag in action.option_strings]
    text = docs_text()
    return [flag for flag in flags if not flag_documented(flag, text)]


def test_every_export_flag_is_documented() -> None:
    parser = dict(commands())["kiln export"]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {"--dynamic", "--trust-pickle", "-O", "-t"} <= flags  # the real parser, with every kind of flag
    assert undocumented("kiln export") == []


@pytest.mark.parametrize("command", [name for name, _ in commands() if name != "kiln export"])
def test_every_flag_of_the_other_commands_is_documented(command: str) -> None:
    assert undocumented(command) == []


def test_the_flag_check_catches_an_undocumented_flag() -> None:
    assert flag_documented("--dynamic", "`--dynamic NAME:AXIS=MIN:MAX`")
    assert not flag_documented("--dynamic", "`--dynamic-batch MIN:MAX`")
    assert flag_documented("-O", "`-O0..-O3`") and not flag_documented("-O", "`-Only`")
