"""Build in a staging directory beside the output, then move the finished tree into place.

One Kiln run at a time per output path: `output_lock` holds an `fcntl.flock` lock on
`OUT_PARENT/.kiln-OUTNAME.lock` for the whole export (or tune: `kiln.compiler.perf.tune_files.tune_directory`). Each
staging directory carries an owner file
(`STAGING_OWNER`: PID, process start time, host, output path), which marks it as unfinished (nothing
under it is accepted as an export, see `staging_root_of`) and lets a later export to the same output
remove it once its owner is gone (killed with SIGKILL, or a crash of the machine).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln.compiler.errors import KilnError, UsageError
from kiln.compiler.safe_fs import is_directory, open_file, read_text, remove_tree

REJECTED = ".rejected"
STAGING_OWNER = ".kiln-staging.json"  # in every staging directory: who builds there, for which output
OLD = "old"  # inside a staging directory: the export being replaced, until the new one is in place
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output directory unless `force` (one holding only rejected builds is reused);
    refuse a path that exists and is not a directory even with `force`."""
    if os.path.lexists(out) and not out.is_dir():
        kind = "file" if out.is_file() else "symbolic link to nothing" if out.is_symlink() else "special file"
        raise UsageError(
            f"--out {out} is a {kind}, not a directory", "choose another --out (--force replaces only directories)"
        )
    if out.exists() and not force:
        if {p.name for p in out.iterdir()} <= {REJECTED}:
            return
        raise UsageError(
            f"output directory {out} already exists", "pass --force to replace it, or choose another --out"
        )


def lock_path(out: Path) -> Path:
    """The lock file of output path `out`: beside it, so that every process exporting there finds the same."""
    return out.parent / f".kiln-{out.name}.lock"


@contextmanager
def output_lock(
    out: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None, command: str = "export"
) -> Iterator[None]:
    """Hold the lock of `out` for the block (taken by `kiln COMMAND`: export, tune): another process holding it
    makes this raise UsageError at once naming that process and its command, or, with `wait`, block until it is
    done (`on_wait` is told whom we wait for).

    The lock is an `fcntl.flock` on `lock_path(out)`; the file holds the owner's Kiln command, PID, host, start
    time and command line, and is removed at the end. The kernel releases the lock when its owner dies, even by
    SIGKILL, so a lock file left behind by a killed run never blocks anyone. Once the lock is held, staging
    directories of `out` left by dead processes are removed (see `remove_stale_staging`).

    On NFS: Linux emulates flock with whole-file POSIX (fcntl) locks, which NFSv4 and NFSv3 with lockd carry
    to the server, so exports to one NFS directory from several hosts exclude each other. A filesystem
    mounted with `nolock` or `local_lock=flock|all` keeps locks on the client: they then exclude only
    processes on the same host, and two hosts can still overwrite each other's export. Owner liveness
    (stale staging directories) is judged only for processes of this host.
    """
    created = _make_parents(out.parent)
    try:
        fd = _acquire(out, wait, on_wait)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        with contextlib.suppress(OSError):  # who holds it is for messages only: a full disk must not stop us
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_owner_record(out) | {"kiln": command}).encode())
        remove_stale_staging(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path(out).unlink()  # while still held: a process that opened it re-opens a fresh one
        os.close(fd)
        _remove_empty(created)


def _acquire(out: Path, wait: bool, on_wait: Callable[[str], None] | None) -> int:
    """An open descriptor of the lock file of `out`, locked; see `output_lock`."""
    path = lock_path(out)
    told = False
    while True:
        try:
            fd = open_file(path, os.O_RDWR | os.O_CREAT)  # a link planted there is refused, never followed
        except OSError as exc:
            raise UsageError(
                f"cannot create the output directory {out}: {exc.strerror}", "choose a writable --out"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, owner = _describe_owner(path)
                if not wait:
                    raise UsageError(
                        f"another {holder} is writing to {out} ({owner})",
                        "wait for it to finish, or pass --wait (wait=True) to start when it is done",
                    ) from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for the {holder} writing to {out} ({owner})")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder removes the file before releasing it: a lock on a removed file locks nothing.
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _describe_owner(path: Path) -> tuple[str, str]:
    """Which Kiln command holds the lock file `path` ("kiln tune"; "Kiln run" when it does not say) and who runs
    it, from what it wrote there (a moment after it took the lock)."""
    for _ in range(40):
        try:
            owner = json.loads(read_text(path))
            kiln = owner.get("kiln")
            named = isinstance(kiln, str) and re.fullmatch(r"[a-z][a-z-]{0,19}", kiln)
            holder = f"kiln {kiln}" if named else "Kiln run"
            command = str(owner.get("command", ""))
            command = command if len(command) <= 120 else command[:117] + "..."
            started = owner.get("started", "?")
            return holder, f"pid {owner['pid']} on {owner.get('host', '?')}, started {started}: {command}"
        except (OSError, ValueError, KeyError, AttributeError, UsageError):
            time.sleep(0.05)
    return "Kiln run", "a process that did not say who it is"


def _owner_record(out: Path) -> dict[str, Any]:
    """Who this process is, for a lock file or a staging directory's owner file."""
    pid = os.getpid()
    return {
        "pid": pid,
        "start_ticks": process_start(pid),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "out": str(_canonical(out)),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None if unknown.
    With the PID, it names one process: a PID reused by a later process has another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished already


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process an owner record names may still run (a process of another host: assume so)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        pid = int(owner["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by another user
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    recorded = owner.get("start_ticks")
    start = process_start(pid)
    if start is None and Path("/proc/self/stat").exists():
        return False  # /proc works but has no live process `pid` (a zombie)
    return recorded is None or start is None or start == recorded


def _read_owner(root: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(read_text(root / STAGING_OWNER))
    except (OSError, ValueError, UsageError):
        return None
    return owner if isinstance(owner, dict) else None


def remove_stale_staging(out: Path) -> None:
    """Remove the staging directories of `out` whose owner process is gone. One killed while replacing an
    earlier export may hold it (`OLD`) with `out` missing: that export is put back first. Call with the
    output lock held."""
    target = str(_canonical(out))
    for root in out.parent.glob(f".kiln-{glob.escape(out.name)}-*"):
        if not is_directory(root):
            continue  # a link (or a file) is no staging directory: Kiln never follows a link it did not make
        owner = _read_owner(root)
        if owner is None or owner.get("out") != target or owner_alive(owner):
            continue
        with contextlib.suppress(OSError):  # cannot: left for later, this export goes on
            _put_back(root, out)
            remove_tree(root)
    # Kiln before the owner files moved a replaced export to `.kiln-old-OUT-STAGING`, beside `out`.
    for old in out.parent.glob(f".kiln-old-{glob.escape(out.name)}-.kiln-{glob.escape(out.name)}-*"):
        if not is_directory(old):
            continue
        with contextlib.suppress(OSError):
            if not os.path.lexists(out):
                old.rename(out)
            else:
                remove_tree(old)


def staging_root_of(path: Path) -> Path | None:
    """The staging directory `path` lies in (itself or an ancestor holding `STAGING_OWNER`), if any."""
    path = Path(os.path.abspath(path))
    for directory in (path, *path.parents):
        if (directory / STAGING_OWNER).is_file():
            return directory
    return None


@contextmanager
def staging_area(out: Path) -> Iterator[Path]:
    """A staging directory beside `out` (same filesystem), marked with its owner, removed however the block
    ends (but by SIGKILL: then the next export to `out` removes it)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f".kiln-{out.name}-", dir=out.parent))
    except OSError as exc:
        raise UsageError(
            f"cannot create the output directory {out}: {exc.strerror}", "choose a writable --out"
        ) from None
    try:
        (root / STAGING_OWNER).write_text(json.dumps(_owner_record(out)))
        yield root
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise KilnError(
                f"writing the export failed: {exc.strerror} ({exc.filename or out})",
                "free disk space or choose another --out; nothing was left behind",
            ) from None
        raise
    finally:
        _put_back(root, out)  # a swap cut short (Ctrl-C between its two renames) keeps the previous export
        with contextlib.suppress(OSError):
            remove_tree(root)


TEMP_VARIABLES = ("TMPDIR", "TEMP", "TMP")  # what tempfile and C/C++ converters (TensorFlow, OpenVINO) read


@contextmanager
def converter_temp_files(directory: Path) -> Iterator[Path]:
    """Point every temporary file of the block into `directory` (made here; inside a staging directory, so
    removed with it, and by the next export to the same output after a SIGKILL): `tempfile.tempdir` for Python
    converters (litert-torch, TensorFlow's Python side) and TMPDIR/TEMP/TMP for native code and child
    processes; all restored after. Process-wide: a block nested in another (or run beside it in another
    thread) keeps the outer one's directory."""
    global _redirected
    directory.mkdir(parents=True, exist_ok=True)
    with _redirect_lock:
        outer = _redirected
        if not outer:
            saved = tempfile.tempdir, {name: os.environ.get(name) for name in TEMP_VARIABLES}
            os.environ.update(dict.fromkeys(TEMP_VARIABLES, str(directory)))
            tempfile.tempdir = str(directory)
            _redirected = True
    try:
        yield directory
    finally:
        if not outer:
            with _redirect_lock:
                for name, value in saved[1].items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
                tempfile.tempdir = saved[0]
                _redirected = False


_redirect_lock = threading.Lock()
_redirected = False


def _put_back(root: Path, out: Path) -> bool:
    """Move the export being replaced (`root/OLD`) back to `out` if nothing took its place; whether it did."""
    if is_directory(root / OLD) and not os.path.lexists(out):
        (root / OLD).rename(out)
        return True
    return False


def install_tree(tree: Path, out: Path) -> None:
    """Move a finished `tree` (in a staging directory) to `out`. An old export at `out` is moved into the
    staging directory first and removed with it only once the new one is in place; if the new one cannot
    be moved in, the old one is put back (here on an OS error; by `staging_area` on Ctrl-C; by the next
    export to `out` after SIGKILL)."""
    old = tree.parent / OLD
    if os.path.lexists(out):
        try:
            out.rename(old)
        except FileNotFoundError:
            pass  # removed meanwhile by someone else: nothing to keep
        except OSError as exc:
            raise KilnError(f"cannot replace {out}: {exc.strerror}", "check its permissions") from None
    try:
        tree.rename(out)
    except OSError as exc:
        kept = ""
        if _put_back(tree.parent, out):
            kept = "; the previous export is unchanged"
        elif old.exists():
            previous = out.with_name(f"{out.name}.previous-{os.getpid()}")
            old.rename(previous)
            kept = f"; the previous export is kept as {previous}"
        raise KilnError(
            f"cannot move the new export into {out}: {exc.strerror}{kept}",
            "something else wrote there during the export; export again",
        ) from None


def _canonical(out: Path) -> Path:
    return Path(os.path.realpath(out.parent)) / out.name


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; the ones created, deepest first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the output directory {directory}: {exc.strerror}", "choose a writable --out"
        ) from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return
