#!/usr/bin/env python3
"""Build a TensorRT engine (`model.engine`) from the `model.onnx` beside this script.

Kiln's `tensorrt` target writes this file into every build kit as `build_engine.py`, and builds engines
with it itself where TensorRT and a CUDA GPU are present. It needs Python, TensorRT (>= 10) and a CUDA
GPU; nothing from Kiln:

    python build_engine.py                  # model.engine, model.timing.cache and engine.json, here
    python build_engine.py --print-trtexec  # the equivalent trtexec command instead (needs nothing)

`profiles.json` gives the precision and each input's min/opt/max shape (an optimization profile is made
for the dynamic ones; edit "opt" to the batch you serve most). The network is strongly typed: an fp16 kit's
ONNX already computes in fp16. An engine runs only with the TensorRT version and on the GPU model (compute
capability) it was built with, so `engine.json` records both, with the sha256 of the ONNX it came from;
`kiln verify DIR` checks them, then validates the engine against the parity reference stored in the kit.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "model.timing.cache"
PROFILES_FILE = "profiles.json"
ENGINE_RECORD_FILE = "engine.json"
MIN_TENSORRT_MAJOR = 10
CU_COMPUTE_CAPABILITY_MAJOR, CU_COMPUTE_CAPABILITY_MINOR = 75, 76  # CUdevice_attribute values


class EngineBuildError(Exception):
    """The engine cannot be built here; the message says why in one line."""


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_profiles(directory: Path) -> dict[str, Any]:
    """The kit's profiles.json: precision, tf32, and min/opt/max (and whether dynamic) per input."""
    path = directory / PROFILES_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise EngineBuildError(f"cannot read {path}: {exc}") from None


def _shape_flag(flag: str, profiles: dict[str, Any], which: str) -> str:
    shapes = ",".join(
        f"{name}:{'x'.join(str(d) for d in spec[which])}"
        for name, spec in profiles["inputs"].items()
        if spec["dynamic"]
    )
    return f"--{flag}={shapes}"


def trtexec_command(profiles: dict[str, Any]) -> list[str]:
    """The trtexec command that builds the same engine as `build_engine` (run it in the kit's directory)."""
    command = [
        "trtexec",
        f"--onnx={ONNX_FILE}",
        f"--saveEngine={ENGINE_FILE}",
        f"--timingCacheFile={TIMING_CACHE_FILE}",
        "--stronglyTyped",
    ]
    if not profiles.get("tf32", True):
        command.append("--noTF32")
    if any(spec["dynamic"] for spec in profiles["inputs"].values()):
        command += [
            _shape_flag(f, profiles, w) for f, w in (("minShapes", "min"), ("optShapes", "opt"), ("maxShapes", "max"))
        ]
    return command


def gpu_facts() -> dict[str, str]:
    """Name and compute capability of the CUDA device TensorRT builds for (the first visible one)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise EngineBuildError(
            "no NVIDIA driver here (libcuda.so.1 not found): build the engine on the GPU machine"
        ) from None
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        raise EngineBuildError("the NVIDIA driver reports no usable CUDA GPU here")
    cuda.cuDeviceGetName(name, len(name), device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_COMPUTE_CAPABILITY_MAJOR, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_COMPUTE_CAPABILITY_MINOR, device)
    return {"gpu": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def import_tensorrt() -> Any:
    """The tensorrt module, checked to be recent enough."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineBuildError(f"TensorRT is not importable ({exc}): pip install tensorrt") from None
    if int(trt.__version__.split(".")[0]) < MIN_TENSORRT_MAJOR:
        raise EngineBuildError(f"TensorRT {trt.__version__} is too old: this kit needs TensorRT {MIN_TENSORRT_MAJOR}+")
    return trt


def build_engine(directory: Path, workspace_gib: float | None = None, verbose: bool = False) -> dict[str, Any]:
    """Build `model.engine` (and keep the timing cache) in `directory`; returns what engine.json records."""
    trt = import_tensorrt()
    gpu = gpu_facts()
    profiles = read_profiles(directory)
    onnx_path = directory / ONNX_FILE
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None and int(trt.__version__.split(".")[0]) < 11:  # always on from TensorRT 11
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if not profiles.get("tf32", True):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 kits compute in full fp32, as they were validated
    cache_path = directory / TIMING_CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)  # one from another GPU
    dynamic = {name: spec for name, spec in profiles["inputs"].items() if spec["dynamic"]}
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, spec in dynamic.items():
            profile.set_shape(name, spec["min"], spec["opt"], spec["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (its log above says why)")
    partial = directory / f".{ENGINE_FILE}.partial"
    partial.write_bytes(memoryview(serialized))
    os.replace(partial, directory / ENGINE_FILE)
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    record = {
        "tensorrt_version": trt.__version__,
        **gpu,
        "precision": profiles.get("precision", "fp32"),
        "onnx_sha256": sha256_of(onnx_path),
        "dynamic_inputs": sorted(dynamic),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (directory / ENGINE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Command line of build_engine.py."""
    parser = argparse.ArgumentParser(description="Build model.engine from this kit's model.onnx with TensorRT.")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent), help="the kit (default: here)")
    parser.add_argument("--print-trtexec", action="store_true", help="print the equivalent trtexec command")
    parser.add_argument("--workspace-gib", type=float, help="limit TensorRT's workspace memory")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose build log")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    try:
        if args.print_trtexec:
            print(" ".join(trtexec_command(read_profiles(directory))))
            return 0
        record = build_engine(directory, args.workspace_gib, args.verbose)
    except EngineBuildError as exc:
        print(f"build_engine: error: {exc}", file=sys.stderr)
        return 3
    print(
        f"built {directory / ENGINE_FILE} with TensorRT {record['tensorrt_version']} for {record['gpu']} "
        f"(compute capability {record['compute_capability']}) in {record['build_seconds']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
