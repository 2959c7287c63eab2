"""The cell cache: results of earlier runs by cell key, in a directory shared between runs and output directories.

Each entry is `{"schema", "sha256", "result"}`, the digest being sha256 of the result's canonical JSON (sorted
keys, no spaces). An entry is used only when it parses, its digest matches, it is a well-formed result and it
is the result of the key asked for; anything else (a torn write, an edit by hand, an entry of an older Kiln) is
reported in one line and the cell runs again.

A plain digest, not an HMAC with a per-cache key: the key would have to be stored beside the entries, where
anyone who can edit an entry can read it, so an HMAC would stop no more than a digest does. Both catch tearing
and careless edits; neither stops someone who can write the cache and means to forge it (who could as well edit
`results.jsonl` or the code). The cache is trusted as far as the directory it lives in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError
from kiln.compiler.matrix.results import PARITY_FAILED, PASSED, CellResult
from kiln.compiler.safe_fs import read_bytes, write_file

CACHE_SCHEMA = "kiln.matrix.cache/2"


def _digest(result: dict[str, Any]) -> str:
    """sha256 of a result's canonical JSON."""
    return hashlib.sha256(json.dumps(result, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Untrusted(ValueError):
    """A cache entry that must not be used, and why."""


class CellCache:
    """Results of earlier runs by cell key, each stored with its sha256; `warn` hears of entries not used."""

    def __init__(self, directory: Path, warn: Callable[[str], None] | None = None):
        self.directory = directory
        self.warn = warn

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str, cell_id: str = "") -> CellResult | None:
        """The cached result of this key, if there is one and it checks out (else None, and a warning)."""
        path = self._path(key)
        try:
            return self._check(json.loads(read_bytes(path)), key)
        except OSError:
            return None  # not cached
        except UsageError:
            problem = "is a link or not a regular file"
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = str(exc) if isinstance(exc, _Untrusted) else "is not JSON (torn or edited)"
        if self.warn is not None:
            self.warn(f"the cache entry of {cell_id or key} ({path}) {problem}: not using it, the cell runs again")
        return None

    @staticmethod
    def _check(entry: Any, key: str) -> CellResult:
        """The result in a cache entry; _Untrusted (saying what is wrong) for one that must not be used."""
        if not isinstance(entry, dict) or entry.get("schema") != CACHE_SCHEMA:
            raise _Untrusted("is not a Kiln cache entry of this version")
        data = entry.get("result")
        if not isinstance(data, dict) or entry.get("sha256") != _digest(data):
            raise _Untrusted("does not match its sha256 (edited or torn)")
        try:
            result = CellResult.parse(data)
        except ValueError as exc:
            raise _Untrusted(f"is not a well-formed cell result ({exc})") from None
        if result.key != key:
            raise _Untrusted("holds the result of another key")
        return result

    def put(self, result: CellResult) -> None:
        """Keep a result whose outcome a re-run would repeat: not crashes, timeouts or unavailable targets."""
        if result.status not in (PASSED, PARITY_FAILED) and result.failure != "error":
            return
        path = self._path(result.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = result.to_dict()
        write_file(path, json.dumps({"schema": CACHE_SCHEMA, "sha256": _digest(data), "result": data}))
