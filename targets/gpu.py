"""Whether this machine can compile for and run on a CUDA GPU, and which GPU it is.

`cuda_unavailable_reason` does not import torch unless something already did, so that
`kiln targets` stays fast: it reads torch's build facts from `torch/version.py` and asks the
NVIDIA driver for devices through `libcuda`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Any


@functools.cache
def torch_build() -> tuple[str, str | None]:
    """The installed torch's version and the CUDA version it was built with (None: a CPU-only build)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return "not installed", None
    facts = runpy.run_path(str(Path(spec.origin).parent / "version.py"))
    return str(facts.get("__version__", "unknown")), facts.get("cuda")


@functools.cache
def driver_device_count() -> tuple[int, str]:
    """How many CUDA devices the NVIDIA driver reports, and why none when it is 0."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    status = cuda.cuInit(0)
    if status != 0:
        return 0, f"the NVIDIA driver found no usable GPU (cuInit error {status})"
    count = ctypes.c_int(0)
    status = cuda.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count.value, ""


def cuda_unavailable_reason() -> str | None:
    """None when torch can run on a CUDA GPU here, else what is missing, in words."""
    version, cuda = torch_build()
    if cuda is None:
        return f"no CUDA: the installed torch {version} is a CPU-only build"
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return None
    count, why = driver_device_count()
    if count == 0:
        return f"no CUDA GPU: {why}"
    if "torch" in sys.modules:
        return "no CUDA GPU usable by torch (torch.cuda.is_available() is False)"
    return None


def cuda_device_facts(index: int = 0) -> dict[str, Any]:
    """Name, compute capability and memory of CUDA device `index` (torch must see it), for manifests."""
    import torch

    properties = torch.cuda.get_device_properties(index)
    return {
        "gpu": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }
