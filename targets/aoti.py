"""`aoti` (alias `cuda`): an AOTInductor package (`model.pt2`) compiled for a CUDA GPU or for the CPU.

Route: the `torch.export` program -> (fp16/bf16: re-exported to compute in that dtype, float32 I/O kept) ->
moved to the device -> `torch._inductor.aoti_compile_and_package`. The package loads from Python with
`torch._inductor.aoti_load_package` and from C++ with `torch::inductor::AOTIModelPackageLoader`
(`examples/cpp/run_aoti.cpp`), on the device it was compiled for; parity runs it there.

Device: `--device cuda|cpu`. Without `--device`, `aoti` and its alias `cuda` compile for CUDA when a CUDA
GPU is present and otherwise stop with an error that says to pass `--device cpu`. Compiling takes tens of
seconds, so packages are cached (`targets/compile_cache.py`) under a key of the graph, the weights, precision,
device, dynamic batch, the torch version and the CPU or GPU; a cached package is validated like a new one.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target

if TYPE_CHECKING:
    import numpy as np
    import torch
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest

MODEL_FILE = "model.pt2"
CACHE_KIND = "aoti"
BUILD_VERSION = 1  # bump when the way packages are built changes: cached packages built the old way stop matching
# The export allows a batch of 1 in a dynamic range, which AOTInductor would refuse at run time (it assumes >= 2);
# parity runs the package at both ends of the range, so a batch of 1 is validated, not assumed.
INDUCTOR_CONFIGS: dict[str, Any] = {"aot_inductor.check_lowerbound": False}  # passed as a copy: torch adds keys
DEVICES = ("cuda", "cpu")


def resolve_device(requested: str | None) -> str:
    """The device to compile for: the one asked for, else cuda when present; a one-line error when it is absent."""
    from kiln.compiler.errors import MissingBackendError
    from kiln.targets.gpu import cuda_unavailable_reason

    if requested == "cpu":
        return "cpu"
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if requested == "cuda":
        raise MissingBackendError(
            f"--device cuda: {reason}",
            "run on a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu",
        )
    raise MissingBackendError(
        f"target aoti compiles for a CUDA GPU by default, but there is {reason}",
        "pass --device cpu to compile for this CPU",
    )


def _program_hash(program: torch.export.ExportedProgram) -> str:
    """sha256 of the program's graph code and of its weights, buffers and tensor constants."""
    import torch
    from kiln.compiler.capture.sources import state_hash

    tensors = dict(program.state_dict) | {k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}
    digest = hashlib.sha256(program.graph_module.code.encode())
    digest.update(state_hash(tensors).encode())
    return digest.hexdigest()


def _device_facts(device: str) -> dict[str, Any]:
    """What about the device changes the compiled code: the GPU (compute capability) or the CPU and its ISA."""
    if device == "cuda":
        from kiln.targets.gpu import cuda_device_facts

        facts = cuda_device_facts()
        return {"gpu": facts["gpu"], "compute_capability": facts["compute_capability"], "cuda": facts["cuda"]}
    from kiln.compiler.host import host_info

    host = host_info()
    return {"cpu": host["cpu"], "cpu_flags": host["cpu_flags"], "machine": host["machine"]}


class _KeyMemo:
    """The cache key of the last (model, precision, device) asked for: the stage line and the build share it."""

    def __init__(self) -> None:
        self.last: tuple[Any, tuple[str, str], str, dict[str, Any]] | None = None

    def get(self, model: CapturedModel, precision: str, device: str) -> tuple[str, dict[str, Any]]:
        import torch
        from kiln.targets.compile_cache import CompileCache

        wanted = (precision, device)
        if self.last is not None and self.last[0] is model.exported and self.last[1] == wanted:
            return self.last[2], self.last[3]
        assert model.exported is not None, "the aoti target needs the FX program"
        parts = {
            "build": BUILD_VERSION,
            "torch": torch.__version__,
            "program": _program_hash(model.exported),
            "inputs": [s.describe() for s in model.inputs],
            "outputs": [s.describe() for s in model.outputs],
            "precision": precision,
            "device": device,
            "dynamic_batch": str(model.dynamic) if model.dynamic else None,
            "device_facts": _device_facts(device),
            "inductor_configs": INDUCTOR_CONFIGS,
        }
        key = CompileCache.key(parts)
        self.last = (model.exported, wanted, key, parts)
        return key, parts


@contextmanager
def _full_fp32(enabled: bool) -> Iterator[None]:
    """fp32 convolutions and matmuls in full fp32 on NVIDIA GPUs (no TF32) while the block runs."""
    import torch

    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class AotiRunner(Runner):
    """Runs an AOTInductor package on the device it was compiled for."""

    thread_control = "torch.set_num_threads"

    def __init__(self, directory: Path, manifest: Manifest):
        import os

        import torch

        # Have the package check each input's dtype, shape and device against what it was compiled for.
        os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
        self.device = str(manifest.runtime_config.get("device", "cpu"))
        self.precision = manifest.precision
        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.compiled = torch._inductor.aoti_load_package(str(directory / MODEL_FILE))
        self.metadata = dict(self.compiled.get_metadata())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name (computed on the package's device, returned on the CPU)."""
        import numpy as np
        import torch

        with torch.inference_mode(), _full_fp32(self.device == "cuda" and self.precision == "fp32"):
            args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])).to(self.device) for s in self.inputs]
            leaves = torch.utils._pytree.tree_leaves(self.compiled(*args))
            return {spec.name: leaf.cpu().numpy() for spec, leaf in zip(self.outputs, leaves)}

    def runtime_info(self) -> dict[str, Any]:
        """torch version, device (GPU name or CPU ISA the package was compiled for) and compute precision."""
        import torch

        info: dict[str, Any] = {
            "runtime": f"torch {torch.__version__} AOTInductor",
            "device": self.device,
            "inference_precision": self.precision,
        }
        if self.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        elif self.metadata.get("AOTI_CPU_ISA"):
            info["cpu_isa"] = self.metadata["AOTI_CPU_ISA"]
        return info


class AotiTarget(Target):
    """An AOTInductor package for CUDA or the CPU, loadable from Python and C++."""

    name = "aoti"
    aliases = ("cuda", "aotinductor")
    description = (
        "AOTInductor package (model.pt2) for a CUDA GPU or the CPU (--device), loadable from C++; "
        "validated on its device"
    )
    requires: ClassVar[dict[str, str]] = {"torch": "torch"}
    precisions = ("fp32", "fp16", "bf16")
    consumes = "torch"
    devices = DEVICES

    def __init__(self) -> None:
        self._keys = _KeyMemo()

    def limitation(self) -> str | None:
        """On a machine without a CUDA GPU, only `--device cpu` packages can be built (and validated) here."""
        from kiln.targets.gpu import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        return f"--device cpu only ({reason})" if reason else None

    def check_request(self, request: BuildRequest) -> None:
        """Refuse an unknown device, and a CUDA one when there is no CUDA GPU here."""
        super().check_request(request)
        resolve_device(request.device)

    def stage_detail(self, model: CapturedModel, request: BuildRequest) -> str:
        """Precision, device, and whether the package comes from the compile cache."""
        from kiln.targets.compile_cache import CompileCache

        device = resolve_device(request.device)
        key, _ = self._keys.get(model, request.precision, device)
        cached = CompileCache(CACHE_KIND).lookup(key) is not None
        how = "from the compile cache" if cached else "AOTInductor compile, tens of seconds (cached for next time)"
        return f"{request.precision} for {device}: {how}"

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Compile the program into `model.pt2`, or copy it from the compile cache."""
        import torch
        from kiln.targets.compile_cache import CompileCache

        assert model.exported is not None, "the aoti target needs the FX program"
        device = resolve_device(request.device)
        key, parts = self._keys.get(model, request.precision, device)
        cache = CompileCache(CACHE_KIND)
        entry = cache.lookup(key)
        notes = []
        if entry is not None:
            shutil.copy2(entry.directory / MODEL_FILE, directory / MODEL_FILE)
            notes.append(f"package reused from the compile cache ({entry.directory}); parity re-validated")
        else:
            program = model.exported
            if request.precision != "fp32":
                from kiln.targets.precision import reduced_precision_program

                program = reduced_precision_program(
                    program, request.precision, [s.name for s in model.inputs], model.dynamic
                )
            if device != "cpu":
                import copy

                from torch.export.passes import move_to_device_pass

                # The pass moves the program in place: work on a copy (other targets share the captured one).
                program = move_to_device_pass(
                    program if program is not model.exported else copy.deepcopy(program), device
                )
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(directory / MODEL_FILE), inductor_configs=dict(INDUCTOR_CONFIGS)
            )
            if cache.store(key, parts, [directory / MODEL_FILE]) is None:
                notes.append(f"compile cache {cache.directory} is not writable: the next export compiles again")
        info: dict[str, Any] = {
            "device": device,
            "compile_cache": {"hit": entry is not None, "key": key, "directory": str(cache.directory)},
            "compute_precision": request.precision,
            **{k: v for k, v in parts["device_facts"].items() if k != "cpu_flags"},
        }
        runtime_config = {"device": device, "tf32": False} if device == "cuda" else {"device": device}
        return BuildOutput(runtime_config=runtime_config, info=info, notes=notes)

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """The package, loaded on its device; a one-line error when this machine lacks that device."""
        from kiln.compiler.errors import MissingBackendError
        from kiln.targets.gpu import cuda_device_facts, cuda_unavailable_reason

        if manifest.runtime_config.get("device") == "cuda":
            built_for = (
                f"{manifest.target_info.get('gpu', 'a CUDA GPU')} (compute capability "
                + str(manifest.target_info.get("compute_capability", "?"))
                + ")"
            )
            reason = cuda_unavailable_reason()
            if reason:
                raise MissingBackendError(
                    f"this aoti package was compiled for {built_for}, and here there is {reason}",
                    "run it on a machine with that GPU, or re-export with --device cpu",
                )
            here = cuda_device_facts()
            if here["compute_capability"] != manifest.target_info.get("compute_capability"):
                raise MissingBackendError(
                    f"this aoti package was compiled for {built_for}; this GPU is {here['gpu']} "
                    f"(compute capability {here['compute_capability']})",
                    "re-export it on this machine",
                )
        if threads:
            import torch

            torch.set_num_threads(threads)
        return AotiRunner(directory, manifest)
