"""Build in a temporary directory beside the output, then move the finished tree into place."""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compiler.errors import KilnError, UsageError

REJECTED = ".rejected"
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output directory unless `force` (one holding only rejected builds is reused)."""
    if out.exists() and not force:
        if out.is_dir() and {p.name for p in out.iterdir()} <= {REJECTED}:
            return
        raise UsageError(
            f"output directory {out} already exists", "pass --force to replace it, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", "choose another --out")


@contextmanager
def staging_area(out: Path) -> Iterator[Path]:
    """A temporary directory on the same filesystem as `out`, removed however the block ends."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f".kiln-{out.name}-", dir=out.parent))
    except OSError as exc:
        raise UsageError(
            f"cannot create the output directory {out}: {exc.strerror}", "choose a writable --out"
        ) from None
    try:
        yield root
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise KilnError(
                f"writing the export failed: {exc.strerror} ({exc.filename or out})",
                "free disk space or choose another --out; nothing was left behind",
            ) from None
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def install_tree(tree: Path, out: Path) -> None:
    """Move a finished `tree` to `out`, removing an old export only once the new one is in place."""
    if out.exists():
        trash = out.with_name(f".kiln-old-{out.name}-{tree.parent.name}")
        out.rename(trash)
        tree.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tree.rename(out)
