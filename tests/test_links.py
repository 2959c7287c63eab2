"""Kiln never follows a link that leads out of a directory it reads from or writes into (compiler/safe_fs.py).

Every command runs over a directory seeded with links to files and directories outside it. Nothing outside
may change (names, contents, modification times), be read (access times, where this filesystem keeps them:
a read after the access time was set before the modification time updates it, under `relatime` too), or
show up in what the command prints or writes (a secret that only the outside files hold).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from kiln.compiler.errors import UsageError
from kiln.compiler.safe_fs import check_tree, copy_tree, read_bytes, regular_files, within, write_file

from tests.conftest import run_cli
from tests.test_cli_errors import assert_one_line_error

SECRET = f"kiln-secret-{uuid.uuid4().hex}"
OLD_ATIME_NS = 10**9  # 1970: before every modification time, so that any read moves it (relatime included)
REFUSED = "refused, not followed"


class Outside:
    """A directory outside the one a command works in: what it holds, and proof that nothing touched it."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.file("victim.txt", "a file a link leads to: must stay as it is\n")
        self.file("secret.txt", SECRET + "\n")
        self.file("dir/keep.txt", "a directory a link leads to: must stay as it is\n")

    def file(self, relative: str, data: str | bytes) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def snapshot(self) -> dict[str, tuple]:
        """Every entry: its kind, contents, mtime and atime (read without moving the atime)."""
        seen: dict[str, tuple] = {}
        for path in sorted(self.root.rglob("*")):
            info = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            if data is not None:  # reading it moved its atime: put it back
                os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
            seen[str(path.relative_to(self.root))] = (
                stat.S_IFMT(info.st_mode),
                data,
                info.st_mtime_ns,
                info.st_atime_ns,
            )
        return seen

    def age(self) -> dict[str, tuple]:
        """Set every file's atime before its mtime; the snapshot to compare with."""
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                os.utime(path, ns=(OLD_ATIME_NS, path.stat().st_mtime_ns))
        return self.snapshot()

    def assert_untouched(self, before: dict[str, tuple]) -> None:
        after = self.snapshot()
        assert sorted(after) == sorted(before), "entries added or removed outside"
        for name, (kind, data, mtime, atime) in before.items():
            assert after[name][:3] == (kind, data, mtime), f"{name} outside was changed"
            if ATIME_WORKS:
                assert after[name][3] == atime, f"{name} outside was read"


def _reads_move_atime(directory: Path) -> bool:
    probe = directory / "atime-probe"
    probe.write_bytes(b"probe")
    os.utime(probe, ns=(OLD_ATIME_NS, probe.stat().st_mtime_ns))
    probe.read_bytes()
    return probe.stat().st_atime_ns != OLD_ATIME_NS


ATIME_WORKS = False


@pytest.fixture(scope="module", autouse=True)
def _atime(tmp_path_factory):
    global ATIME_WORKS
    ATIME_WORKS = _reads_move_atime(tmp_path_factory.mktemp("probe"))


@pytest.fixture
def outside(tmp_path) -> Outside:
    return Outside(tmp_path / "outside")


@pytest.fixture
def work(tmp_path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def assert_no_secret(work: Path, *texts: str) -> None:
    """The secret is in no text printed and in no file under `work` (links not followed)."""
    for text in texts:
        assert SECRET not in text
    for directory, _, files in os.walk(work):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), f"the secret was copied into {path}"


def _copy(export: Path, destination: Path) -> Path:
    shutil.copytree(export, destination)
    return destination


def _moved_out(export: Path, relative: str, outside: Outside) -> None:
    """Replace a file of `export` by a link to an identical copy outside: followed, the command would succeed."""
    copy = outside.file(f"copies/{relative}", (export / relative).read_bytes())
    (export / relative).unlink()
    link(export / relative, copy)


# --- export: the lock and the staging directories beside --out ---------------------------------------------


def test_export_refuses_a_link_planted_as_its_lock(work, outside, capsys):
    link(work / ".kiln-out.lock", outside.root / "victim.txt")
    before = outside.age()
    code, _, err = run_cli("export", "zoo:cnn", "--target", "onnx", "--out", work / "out", capsys=capsys)
    assert_one_line_error(code, err, f".kiln-out.lock is a symbolic link: {REFUSED}")
    outside.assert_untouched(before)
    assert not (work / "out").exists()


def test_export_leaves_links_named_like_its_staging_directories_alone(work, outside, capsys):
    """A link named like a staging directory (with a dead owner, and an export `old/` to put back), and one
    named like the staging of an older Kiln: neither is a directory Kiln made, so neither is followed."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"pid": int(finished.stdout), "host": socket.gethostname(), "out": str(work.resolve() / "out")}
    outside.file("dir/.kiln-staging.json", json.dumps(owner))
    outside.file("dir/old/manifest.json", SECRET)
    outside.file("old-export/keep.txt", "an older Kiln's replaced export, or so its name says")
    link(work / ".kiln-out-abcd1234", outside.root / "dir")
    link(work / ".kiln-old-out-.kiln-out-abcd1234", outside.root / "old-export")
    before = outside.age()
    code, out, err = run_cli("export", "zoo:cnn", "--target", "onnx", "--out", work / "out", capsys=capsys)
    assert code == 0, err
    assert (work / "out").is_dir() and not (work / "out").is_symlink()
    outside.assert_untouched(before)
    assert_no_secret(work, out, err)


# --- the commands that read an export --------------------------------------------------------------------


def _inputs_file(work: Path) -> Path:
    path = work / "inputs.npz"
    np.savez(path, image=np.zeros((1, 3, 32, 32), np.float32))
    return path


READERS = {
    # command -> (the export file replaced by a link to an identical copy outside, the command's arguments)
    "verify": ("parity/reference.npz", lambda export, work: ["verify", export]),
    "run": (
        "model.onnx",
        lambda export, work: ["run", export, "--inputs", _inputs_file(work), "--output", work / "outputs.npz"],
    ),
    "debug": ("parity/inputs.npz", lambda export, work: ["debug", export, "--model", "zoo:cnn"]),
    "bench": ("model.onnx", lambda export, work: ["bench", export, "--rounds", "1", "--runs", "2", "--warmup", "1"]),
    "quant-report": ("manifest.json", lambda export, work: ["quant-report", export]),
}


@pytest.mark.parametrize("command", list(READERS))
def test_readers_refuse_an_export_file_that_links_outside(command, cnn_onnx_export, work, outside, capsys):
    relative, argv = READERS[command]
    export = _copy(cnn_onnx_export, work / "export")
    _moved_out(export, relative, outside)
    before = outside.age()
    code, _, err = run_cli(*argv(export, work), capsys=capsys)
    assert_one_line_error(code, err, f"{export / relative} is a symbolic link leading outside {export}: {REFUSED}")
    outside.assert_untouched(before)
    assert not (export / "bench.json").exists() and not (work / "outputs.npz").exists()


def test_bench_refuses_a_target_directory_that_links_outside(cnn_onnx_export, work, outside, capsys):
    """`kiln bench OUT` of a multi-target OUT whose `onnx/` links to an export elsewhere: neither timed nor
    written into (bench.json)."""
    elsewhere = _copy(cnn_onnx_export, outside.root / "export")
    link(work / "out" / "onnx", elsewhere)
    before = outside.age()
    code, _, err = run_cli("bench", work / "out", "--rounds", "1", "--runs", "2", "--warmup", "1", capsys=capsys)
    assert_one_line_error(code, err, f"{work / 'out' / 'onnx'} is a symbolic link leading outside {work / 'out'}")
    outside.assert_untouched(before)


def test_verify_notices_what_was_added_to_an_export(cnn_onnx_export, work, capsys):
    """A nested manifest.json, a FIFO and a linked directory (even one inside) are not the export's."""
    cases = {
        "nested manifest": (lambda e: shutil.copy(e / "manifest.json", (e / "sub").mkdir() or e / "sub"),
                            "file sub/manifest.json is not in the manifest"),
        "FIFO": (lambda e: os.mkfifo(e / "parity" / "pipe"), f"parity{os.sep}pipe is a FIFO: {REFUSED}"),
        "linked directory": (lambda e: link(e / "more", e / "parity"), f"more is a symbolic link: {REFUSED}"),
    }  # fmt: skip
    for name, (add, expected) in cases.items():
        export = _copy(cnn_onnx_export, work / name.replace(" ", "-"))
        add(export)
        code, _, err = run_cli("verify", export, capsys=capsys)
        assert_one_line_error(code, err, expected)


# --- matrix: its output directory, its cells, and the shard directories it merges ------------------------

MATRIX = ("matrix", "--models", "zoo:cnn", "--targets", "onnx", "--precisions", "fp32", "--repeat", "2",
          "--warmup", "1", "--no-cache", "--no-localize")  # fmt: skip


def test_matrix_refuses_links_it_would_follow_out_of_its_directory(work, outside, capsys):
    out = work / "m"
    link(out / "cells", outside.root / "dir")
    link(out / "plan.json", outside.root / "victim.txt")
    before = outside.age()
    code, _, err = run_cli(*MATRIX, "--out", out, capsys=capsys)
    assert_one_line_error(code, err, f"{out / 'cells'} is a symbolic link leading outside {out}: {REFUSED}")
    outside.assert_untouched(before)

    (out / "cells").unlink()
    link(out / "results.jsonl", outside.root / "victim.txt")  # read back, then appended to: refused
    code, _, err = run_cli(*MATRIX, "--out", out, capsys=capsys)
    assert_one_line_error(code, err, f"{out / 'results.jsonl'} is a symbolic link: {REFUSED}")
    outside.assert_untouched(before)
    assert not (out / "plan.json").is_symlink(), "a file Kiln rewrites whole replaces the link"


def test_matrix_replaces_links_it_rewrites_and_merge_reads_none(work, outside, capsys):
    out = work / "m"
    link(out / "cells" / "cnn__onnx__fp32", outside.root / "dir")  # a cell's directory is removed and remade
    for name in ("report.md", "report.json", "junit.xml", "report.html"):
        link(out / name, outside.root / "victim.txt")
    before = outside.age()
    code, _, err = run_cli(*MATRIX, "--out", out, capsys=capsys)
    assert code == 0, err
    outside.assert_untouched(before)
    assert (out / "cells" / "cnn__onnx__fp32" / "result.json").is_file()
    assert not any((out / name).is_symlink() for name in ("report.md", "junit.xml"))

    # A shard directory whose results.jsonl links to a file outside: its lines would reach the merged report.
    (line,) = (out / "results.jsonl").read_text().splitlines()
    outside.file("results.jsonl", json.dumps(json.loads(line) | {"reason": SECRET}) + "\n")
    shard = work / "shard"
    shard.mkdir()
    shutil.copy(out / "plan.json", shard / "plan.json")
    link(shard / "results.jsonl", outside.root / "results.jsonl")
    before = outside.age()
    code, out_text, err = run_cli("matrix", "--out", work / "merged", "merge", shard, capsys=capsys)
    assert_one_line_error(code, err, f"{shard / 'results.jsonl'} is a symbolic link: {REFUSED}")
    outside.assert_untouched(before)
    assert_no_secret(work, out_text, err)


# --- tune (its internals: tests/test_tune*.py) ------------------------------------------------------------


def test_tune_does_not_follow_links_out_of_its_directory(work, outside, capsys):
    out = work / "t"
    link(out / "builds" / "plan.json", outside.root / "victim.txt")
    link(out / "builds" / "results.jsonl", outside.root / "secret.txt")
    before = outside.age()
    code, out_text, err = run_cli("tune", "zoo:cnn", "--out", out, "--targets", "onnx", "--precisions", "fp32",
                                  "--no-plain", "--no-runtime-search", "--io", "nchw", "--build-only",
                                  capsys=capsys)  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("kiln: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kiln: error: "), err  # which refusal: tune's own
    outside.assert_untouched(before)
    assert_no_secret(work, out_text, err)


# --- the rule itself ---------------------------------------------------------------------------------------


def test_safe_fs_rules(tmp_path, outside):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a")
    link(tree / "inside", tree / "sub" / "a.txt")
    check_tree(tree)  # a link that stays inside is no escape
    with pytest.raises(UsageError, match="is a symbolic link: refused"):
        regular_files(tree)  # ... but a tree Kiln wrote holds none
    with pytest.raises(UsageError, match="is a symbolic link: refused"):
        copy_tree(tree, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    (tree / "inside").unlink()
    copy_tree(tree, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "a.txt").read_text() == "a"
    link(tree / "sub" / "out", outside.root / "dir")
    with pytest.raises(UsageError, match=f"leading outside {tree}"):
        check_tree(tree)
    with pytest.raises(UsageError, match=f"{tree / 'sub'}/out is a symbolic link leading outside"):
        within(tree / "sub" / "out" / "keep.txt", tree)
    os.mkfifo(tree / "results.jsonl")  # opened in place: a FIFO is refused at once, not waited on
    with pytest.raises(UsageError, match=r"results\.jsonl is a FIFO: refused"):
        read_bytes(tree / "results.jsonl")
    before = outside.age()
    write_file(tree / "sub" / "out", "replaced")  # a link where Kiln writes a whole file is replaced
    assert (tree / "sub" / "out").read_text() == "replaced" and not (tree / "sub" / "out").is_symlink()
    outside.assert_untouched(before)


def test_a_compile_cache_entry_holding_a_link_is_not_used(tmp_path, outside):
    """An aoti cache entry's package is copied into the export: one that links elsewhere is a miss, not a copy."""
    from kiln.targets.compile_cache import CompileCache

    cache = CompileCache("aoti", tmp_path / "cache")
    package = outside.file("model.pt2", SECRET)
    (tmp_path / "model.pt2").write_bytes(b"a package")
    entry = cache.store("k" * 64, {"what": "test"}, [tmp_path / "model.pt2"])
    assert entry is not None and cache.lookup(entry.key) == entry
    (entry.directory / "model.pt2").unlink()
    link(entry.directory / "model.pt2", package)
    assert cache.lookup(entry.key) is None
