"""Facts about this machine and toolchain that belong in every manifest."""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

INTERESTING_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    "f16c",
)


@functools.cache
def host_info() -> dict[str, Any]:
    """CPU model, the ISA flags that change runtime behaviour, and core count."""
    import os

    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and model in ("", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags": [f for f in INTERESTING_CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
    }


def this_machine() -> dict[str, Any]:
    """Which machine this is, as reports that may move between machines record it: its host name, CPU, the CPU
    flags of `host_info` and its core count."""
    import socket

    info = host_info()
    return {"host": socket.gethostname(), "cpu": info["cpu"], "cpu_flags": info["cpu_flags"], "cores": info["cores"]}


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of Kiln, Python, torch and the given packages."""
    found = {"python": platform.python_version()}
    for package in ("kiln", "torch", "onnx", *packages):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
