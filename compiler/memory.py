"""This process's memory: its peak resident set (recorded in every manifest as `host.peak_rss`), and giving back the
resident pages of memory-mapped weight files between the steps that read them.

An export reads the same weights in turn through several mappings: the model's checkpoint (safetensors, mapped by
transformers), the ONNX external data the passes read, the runtime's copy (ONNX Runtime's prepacked weights,
OpenVINO's mapped `.bin`). Each mapping's pages stay in the process's resident set once touched, so the resident
set would grow by one copy of the weights per step. `release_pages` drops the resident pages of such mappings when
the step that reads them is over (`madvise(MADV_DONTNEED)`): the data stays in the page cache (nothing is copied
or lost) and comes back on the next read. Only pages that equal their file are dropped: a mapping that can be
written to is released only when none of its pages was (its `Anonymous` count in /proc/self/smaps is 0), so a
weight changed in memory is never undone. `pages_released` does the same every fraction of a second while a
runtime reads a mapped file to make its own copy (OpenVINO repacks every MatMul weight as it compiles, its
converter transposes them): those pages would otherwise stay resident beside the copy. It touches read-only
mappings only, which nobody can write to meanwhile. Elsewhere than Linux nothing is released.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def peak_rss() -> int:
    """The peak resident set size of this process so far, in bytes (Linux: `VmHWM`)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def current_rss() -> int | None:
    """The resident set size of this process now, in bytes (None off Linux)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def _status_kib(field: str) -> int | None:
    """A `Field:  1234 kB` line of /proc/self/status, in KiB (None where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class Mapping:
    """One file-backed memory mapping of this process."""

    start: int
    end: int
    writable: bool
    path: str


def file_mappings() -> list[Mapping]:
    """The file-backed mappings of this process (/proc/self/maps), empty off Linux."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[5].startswith("/"):
                    continue
                low, high = (int(x, 16) for x in parts[0].split("-"))
                found.append(Mapping(low, high, "w" in parts[1], parts[5].rstrip("\n").removesuffix(" (deleted)")))
    except OSError:
        return []
    return found


def _modified_pages(mappings: list[Mapping]) -> dict[int, int]:
    """For writable mappings: their start -> kB of pages written since mapping (smaps' `Anonymous`)."""
    wanted = {m.start for m in mappings if m.writable}
    if not wanted:
        return {}
    found: dict[int, int] = {}
    current = None
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    start = int(first.split("-")[0], 16)
                    current = start if start in wanted else None
                elif current is not None and first == "Anonymous:":
                    found[current] = int(line.split()[1])
    except (OSError, ValueError):
        return {}
    return found


def release_pages(paths: Iterable[Path | str] = (), addresses: Iterable[int] = (), read_only: bool = False) -> int:
    """Drop the resident pages of the file mappings of this process that map a file under one of `paths` (a file
    or a directory) or hold one of `addresses` (e.g. tensors' `data_ptr()`), when those pages equal their file
    (`read_only`: of read-only mappings only); the bytes of address space released (resident or not)."""
    roots = [os.path.realpath(p) for p in paths]
    points = sorted(set(addresses))
    if sys.platform != "linux" or (not roots and not points):
        return 0
    chosen = []
    for mapping in file_mappings():
        under = any(mapping.path == r or mapping.path.startswith(r.rstrip("/") + "/") for r in roots)
        holds = any(mapping.start <= a < mapping.end for a in points)
        if (under or holds) and not (read_only and mapping.writable):
            chosen.append(mapping)
    modified = _modified_pages(chosen)
    libc = ctypes.CDLL(None, use_errno=True)
    released = 0
    for mapping in chosen:
        if mapping.writable and modified.get(mapping.start, 1) != 0:
            continue  # a page differs from the file (or smaps could not say): keep it
        if (
            libc.madvise(ctypes.c_void_p(mapping.start), ctypes.c_size_t(mapping.end - mapping.start), MADV_DONTNEED)
            == 0
        ):
            released += mapping.end - mapping.start
    return released


@contextmanager
def pages_released(paths: Iterable[Path | str], interval: float = 0.25) -> Iterator[None]:
    """While the block runs, drop every `interval` seconds the resident pages of the read-only mappings of files
    under `paths` (see the module's note), and once more at its end."""
    roots = [Path(p) for p in paths]
    if sys.platform != "linux" or not roots:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            release_pages(roots, read_only=True)

    watcher = threading.Thread(target=loop, name="kiln-pages-released", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        release_pages(roots, read_only=True)


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's `malloc_trim`), where there is such a call: a
    runtime's freed weights can otherwise stay in this process's resident set."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
