"""A compile cache on disk: slow builds (AOTInductor packages) kept under a key of everything that shapes them.

The cache lives in `$KILN_CACHE_DIR` (default `~/.cache/kiln`), one subdirectory per kind of build and one
per key. An entry is written in a temporary directory and renamed into place, so a reader never sees half
of one. What comes out of the cache is still validated for parity like a fresh build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.safe_fs import regular_files

CACHE_ENV = "KILN_CACHE_DIR"
ENTRY_FILE = "entry.json"


def cache_root() -> Path:
    """Where Kiln keeps its caches: `$KILN_CACHE_DIR`, else `~/.cache/kiln`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kiln"


@dataclass(frozen=True)
class CacheEntry:
    """One cached build: its key and the directory holding its files."""

    key: str
    directory: Path


class CompileCache:
    """Cached build outputs of one kind (e.g. `aoti`), looked up by a key derived from what produced them."""

    def __init__(self, kind: str, root: Path | None = None):
        self.directory = (root or cache_root()) / kind

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        """A stable key (sha256) of everything that determines a build's output."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def lookup(self, key: str) -> CacheEntry | None:
        """The complete entry stored under `key`, or None (also for one holding a link or a special file, which
        Kiln never stores: its files would be copied into an export from wherever the link leads)."""
        directory = self.directory / key
        try:
            files = regular_files(directory)
        except (UsageError, OSError):
            return None
        return CacheEntry(key, directory) if directory / ENTRY_FILE in files else None

    def store(self, key: str, parts: dict[str, Any], files: list[Path]) -> CacheEntry | None:
        """Copy `files` into a new entry under `key`; None when the cache cannot be written (the build still counts)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=self.directory))
        except OSError:
            return None
        try:
            for file in files:
                shutil.copy2(file, staging / file.name)
            (staging / ENTRY_FILE).write_text(json.dumps({"key": key, "parts": parts}, indent=2, default=str))
            staging.rename(self.directory / key)
        except OSError:
            # Another process stored the same key first, or the disk is full: keep whichever entry exists.
            shutil.rmtree(staging, ignore_errors=True)
        return self.lookup(key)
