"""Kiln never follows a symbolic link out of a directory it reads from or writes into.

The directories Kiln works in are the user's (`--out` and its parent, a matrix or tune directory, an export it
verifies, runs, benchmarks or debugs) and may hold links planted there, or copied in with the rest: following
one would truncate, overwrite or delete a file elsewhere, or read one into a report or an artifact. The rule,
in this one module:

- a file Kiln (re)writes whole is written to a new temporary file beside it and renamed over its name
  (`write_file`): a link with that name is replaced, never followed;
- a file Kiln opens in place (a lock, a log it appends to, a record it reads back) is opened with O_NOFOLLOW
  and must be a regular file (`open_file`, `read_bytes`): a link, a FIFO or a device there is refused;
- a path under a root (a cell directory under a matrix's `--out`) is used only when, every link followed, it
  stays inside that root (`within`); a directory Kiln made is recognised only as itself, never through a link
  (`is_directory`), and removed only as itself, a link in its place only unlinked (`remove_tree`);
- a tree Kiln reads (an export) holds no link leading outside it and no special file (`check_tree`); a tree
  Kiln wrote, when it hashes (`regular_files`) or copies it (`copy_tree`), holds no link at all.

A refusal is a UsageError (exit 2) that names the path. The checks guard against what a directory holds when
Kiln comes to it, not against someone swapping its files while Kiln works (who can write there can change
the export itself).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from kiln.compiler.errors import UsageError

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def refused(path: Path, why: str = "a symbolic link", root: Path | None = None) -> UsageError:
    """The error for a path Kiln will not follow or open."""
    where = f" leading outside {root}" if root is not None else ""
    return UsageError(
        f"{path} is {why}{where}: refused, not followed",
        "remove it (Kiln writes only regular files and directories there), or choose another directory",
    )


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def open_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` that never follows a link at `path` and opens only a regular file (created if `flags` say so):
    a link, a FIFO or a device there is a UsageError; other OS errors pass through."""
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK, mode)  # O_NONBLOCK: a FIFO must not block the open
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refused(path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise refused(path, _kind(info.st_mode))
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: Path) -> bytes:
    """The contents of the regular file `path`, never through a link (see `open_file`)."""
    with os.fdopen(open_file(path, os.O_RDONLY), "rb") as handle:
        return handle.read()


def read_text(path: Path) -> str:
    """`read_bytes` as UTF-8 text."""
    return read_bytes(path).decode()


def write_file(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `path` whole: a new temporary file in its directory, renamed over `path`, so that a link named
    `path` is replaced, never followed, and a reader never sees half a file."""
    payload = data.encode() if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.chmod(temporary, mode)  # mkstemp's 0600 would hide it from other users of the directory
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def within(path: Path, root: Path) -> Path:
    """`path`, if with every link on the way followed it stays inside `root`; else a UsageError."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(root)):
        raise refused(_first_link(path, root) or path, root=root)
    return path


def _first_link(path: Path, root: Path) -> Path | None:
    """The first link on the way from `root` down to `path` (for the message)."""
    try:
        parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).parts
    except ValueError:
        return None
    current = Path(root)
    for part in parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def is_directory(path: Path) -> bool:
    """Whether `path` is a directory itself, not a link to one (nor a file)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_tree(path: Path) -> None:
    """Remove `path`: a directory with what it holds (a link inside it is removed, never followed), or a link
    or a file in its place; nothing when it does not exist."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)  # removes links inside as links (fd-based where the platform allows)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _entries(tree: Path) -> Iterator[tuple[Path, int]]:
    """Every path under `tree` (links not followed) with its lstat mode."""
    for directory, subdirectories, files in os.walk(tree):
        for name in subdirectories + files:
            path = Path(directory) / name
            yield path, os.lstat(path).st_mode


def check_tree(tree: Path, root: Path | None = None) -> None:
    """Refuse a tree (an export) holding a link that leads outside `root` (default: the tree itself), or a
    FIFO, a socket or a device file; `tree` itself must lie inside `root`."""
    root = tree if root is None else root
    within(tree, root)
    real_root = os.path.realpath(root)
    for path, mode in _entries(tree):
        if stat.S_ISLNK(mode):
            if not Path(os.path.realpath(path)).is_relative_to(real_root):
                raise refused(path, root=root)
        elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise refused(path, _kind(mode))


def regular_files(tree: Path) -> list[Path]:
    """Every file under a tree Kiln wrote, sorted; as Kiln writes only regular files and directories, a link
    (even one leading inside) or a special file anywhere in it is refused."""
    if os.path.islink(tree):
        raise refused(tree)
    found = []
    for path, mode in _entries(tree):
        if stat.S_ISREG(mode):
            found.append(path)
        elif not stat.S_ISDIR(mode):
            raise refused(path, _kind(mode))
    return sorted(found)


def copy_tree(source: Path, destination: Path, ignore: Callable[[str, list[str]], set[str]] | None = None) -> None:
    """Copy a tree Kiln wrote; a link or a special file in it is refused before anything is copied."""
    regular_files(source)
    shutil.copytree(source, destination, ignore=ignore)
