"""`tensorrt` (alias `trt`): a TensorRT build kit, and the engine itself where TensorRT and a CUDA GPU are present.

The kit: `model.onnx` prepared for TensorRT (the optimized graph with shapes inferred; fp16 kits compute in
fp16 in the graph itself, with float32 inputs and outputs, because TensorRT networks are strongly typed),
`profiles.json` (min/opt/max shape per input) and `build_engine.py` (builds `model.engine` with the
TensorRT Python API, or prints the equivalent `trtexec` command). Where TensorRT and a CUDA GPU are present
the engine is built right away (timing cache kept beside it) and parity is validated on the GPU; elsewhere
the kit's ONNX is validated with ONNX Runtime on the CPU, and the manifest marks the engine as not built.
An engine runs only with the TensorRT version and on the GPU model it was built with: `engine.json` beside
it records them, and loading an engine from another TensorRT or GPU is a one-line error.

int8 (explicit Q/DQ) waits for Kiln's quantization pass.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.targets import trt_engine
from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest

BUILD_SCRIPT = "build_engine.py"


def engine_unavailable_reason() -> str | None:
    """None when an engine can be built and run here, else what is missing."""
    from kiln.targets.gpu import cuda_unavailable_reason

    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("tensorrt (pip install tensorrt)")
    reason = cuda_unavailable_reason()
    if reason:
        missing.append(f"a CUDA GPU usable by torch ({reason})")
    return f"needs {' and '.join(missing)}" if missing else None


def profiles(model: CapturedModel, precision: str) -> dict[str, Any]:
    """profiles.json: precision, TF32 off for fp32, and min/opt/max per input: for each dynamic axis its
    range's MIN, OPT (MAX when the range gives none) and MAX."""
    from kiln.compiler.errors import UsageError

    shapes: dict[str, Any] = {}
    for spec in model.inputs:
        dims = spec.dynamic_dims
        ranges = {axis: model.dynamic.symbol_of(spec.name, axis) if model.dynamic else None for axis in dims}
        unknown = sorted(axis for axis, found in ranges.items() if found is None)
        if unknown:
            raise UsageError(
                f"input {spec.name} has dynamic dims {dims} with no known range for a TensorRT optimization profile",
                "give the ONNX file static input shapes, or export from PyTorch with --dynamic-batch MIN:MAX "
                "or --dynamic NAME:AXIS=MIN:MAX:OPT",
            )
        low, opt, high = [], [], []
        for axis, size in enumerate(spec.shape):
            found = ranges.get(axis)
            low.append(found.minimum if found else size)
            opt.append((found.opt or found.maximum) if found else size)
            high.append(found.maximum if found else size)
        shapes[spec.name] = {"dtype": spec.dtype, "dynamic": bool(dims), "min": low, "opt": opt, "max": high}
    return {"precision": precision, "tf32": precision != "fp32", "onnx": trt_engine.ONNX_FILE, "inputs": shapes}


def prepare_onnx(source: Path, destination: Path) -> dict[str, Any]:
    """Write `source` (and its external data) as `destination` with inferred shapes; what TensorRT should know."""
    import onnx

    for file in source.parent.iterdir():
        if file != source:
            shutil.copy2(file, destination.parent / file.name)
    onnx.shape_inference.infer_shapes_path(str(source), str(destination))
    onnx.checker.check_model(str(destination))
    proto = onnx.load(str(destination), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"opset": opset, "ops": sorted({n.op_type for n in proto.graph.node}), "custom_domain_ops": custom}


def _reduced_precision_onnx(model: CapturedModel, precision: str, work: Path) -> Path:
    """The model lowered to ONNX computing in `precision` (float32 I/O kept), through Kiln's graph passes."""
    import onnx_ir
    from kiln.compiler.capture.program import lower_to_onnx
    from kiln.compiler.errors import UsageError
    from kiln.compiler.large_graphs import save_onnx
    from kiln.passes import pipeline_for, run_pipeline
    from kiln.passes.base import ONNX
    from kiln.targets.precision import reduced_precision_program

    if model.exported is None:
        raise UsageError(
            f"--precision {precision} for tensorrt needs a PyTorch model, not an ONNX file",
            "give the model as file.py:factory, .pt2 or zoo:NAME, or export fp32",
        )
    program = reduced_precision_program(model.exported, precision, [s.name for s in model.inputs], model.dynamic)
    lowered = work / "lowered" / trt_engine.ONNX_FILE
    lowered.parent.mkdir(parents=True)
    lower_to_onnx(program, lowered, [s.name for s in model.outputs], model.dynamic)
    optimized = work / "optimized" / trt_engine.ONNX_FILE
    optimized.parent.mkdir()
    graph, _ = run_pipeline(onnx_ir.load(str(lowered)), pipeline_for(ONNX, "tensorrt"))
    return save_onnx(graph, optimized)


def read_engine_record(directory: Path) -> dict[str, Any]:
    """engine.json beside model.engine; a one-line error when it is missing or unreadable."""
    from kiln.compiler.errors import UsageError

    path = directory / trt_engine.ENGINE_RECORD_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        raise UsageError(
            f"{directory / trt_engine.ENGINE_FILE} has no readable {trt_engine.ENGINE_RECORD_FILE}: "
            "which TensorRT and GPU built it is unknown",
            f"rebuild it with `python {BUILD_SCRIPT}` in {directory}",
        ) from None


def check_engine_runs_here(directory: Path, record: dict[str, Any]) -> None:
    """Raise a one-line error unless the engine's TensorRT version, GPU model and ONNX match this machine and kit."""
    from kiln.compiler.errors import MissingBackendError, UsageError
    from kiln.targets.gpu import cuda_device_facts, cuda_unavailable_reason

    built = (
        f"{trt_engine.ENGINE_FILE} was built with TensorRT {record.get('tensorrt_version', '?')} for "
        f"{record.get('gpu', '?')} (compute capability {record.get('compute_capability', '?')})"
    )
    rebuild = f"rebuild it on this machine with `python {BUILD_SCRIPT}` in {directory}"
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingBackendError(
            f"{built}; this machine has no TensorRT",
            f"pip install tensorrt=={record.get('tensorrt_version', '')} on a machine with that GPU",
        )
    import tensorrt

    if tensorrt.__version__ != record.get("tensorrt_version"):
        raise MissingBackendError(
            f"{built}; this machine has TensorRT {tensorrt.__version__}, and an engine runs only with the "
            "TensorRT version that built it",
            rebuild,
        )
    reason = cuda_unavailable_reason()
    if reason:
        raise MissingBackendError(f"{built}; here there is {reason}", "run it on a machine with that GPU")
    here = cuda_device_facts()
    if here["compute_capability"] != record.get("compute_capability"):
        raise MissingBackendError(
            f"{built}; this GPU is {here['gpu']} (compute capability {here['compute_capability']})", rebuild
        )
    if trt_engine.sha256_of(directory / trt_engine.ONNX_FILE) != record.get("onnx_sha256"):
        raise UsageError(f"{built} from another {trt_engine.ONNX_FILE} than the one beside it", rebuild)


class TensorRtEngineRunner(Runner):
    """Runs model.engine on the GPU, with torch CUDA tensors as the I/O buffers."""

    def __init__(self, directory: Path, manifest: Manifest, record: dict[str, Any]):
        import tensorrt as trt
        from kiln.compiler.errors import MissingBackendError

        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.record = record
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((directory / trt_engine.ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise MissingBackendError(
                f"TensorRT {trt.__version__} could not load {directory / trt_engine.ENGINE_FILE}",
                f"rebuild it with `python {BUILD_SCRIPT}` in {directory}",
            )
        self.context = self.engine.create_execution_context()
        self.trt = trt

    def _torch_dtype(self, name: str) -> Any:
        import numpy as np
        import torch

        return torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def bind(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """GPU buffers (torch tensors) for these inputs and for the outputs, bound to the execution context."""
        import numpy as np
        import torch

        buffers = {}
        for spec in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[spec.name]))
            tensor = tensor.to(device="cuda", dtype=self._torch_dtype(spec.name)).contiguous()
            self.context.set_input_shape(spec.name, tuple(tensor.shape))
            buffers[spec.name] = tensor
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            buffers[spec.name] = torch.empty(shape, dtype=self._torch_dtype(spec.name), device="cuda")
        for name, tensor in buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        return buffers

    def execute(self) -> None:
        """Run the engine once on the bound buffers and wait for it."""
        import torch

        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name (computed on the GPU, returned on the CPU)."""
        buffers = self.bind(feeds)
        self.execute()
        return {spec.name: buffers[spec.name].cpu().numpy() for spec in self.outputs}

    def runtime_info(self) -> dict[str, Any]:
        """TensorRT version, GPU and precision of the engine."""
        return {
            "runtime": f"tensorrt {self.trt.__version__}",
            "artifact": trt_engine.ENGINE_FILE,
            "gpu": self.record.get("gpu"),
            "compute_capability": self.record.get("compute_capability"),
            "inference_precision": self.record.get("precision"),
        }


class KitRunner(Runner):
    """Runs the kit's model.onnx with ONNX Runtime on the CPU, where no engine has been built."""

    thread_control = "onnxruntime intra_op_num_threads"

    def __init__(self, directory: Path, manifest: Manifest, threads: int | None = None):
        from kiln.targets.onnxrt import OnnxRuntimeRunner

        self.onnx = OnnxRuntimeRunner(directory / trt_engine.ONNX_FILE, manifest, threads=threads or 0)
        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.precision = manifest.precision

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        return self.onnx.run(feeds)

    def runtime_info(self) -> dict[str, Any]:
        """ONNX Runtime facts, and that the engine itself is not what ran."""
        return {
            **self.onnx.runtime_info(),
            "artifact": f"{trt_engine.ONNX_FILE} (engine not built here)",
            "inference_precision": self.precision,
        }


class TensorRtTarget(Target):
    """A TensorRT build kit, with the engine built and validated where TensorRT and a CUDA GPU are present."""

    name = "tensorrt"
    aliases = ("trt",)
    description = (
        "TensorRT build kit (model.onnx for TensorRT, profiles.json, build_engine.py); the engine is built and "
        "validated on the GPU where TensorRT and CUDA are present, else the kit's ONNX under ONNX Runtime"
    )
    requires: ClassVar[dict[str, str]] = {"onnx": "onnx", "onnxruntime": "onnxruntime"}
    precisions = ("fp32", "fp16")
    # build_engine.py adds these on the GPU machine; engine.json records the sha256 of the ONNX they came from
    later_files = (trt_engine.ENGINE_FILE, trt_engine.ENGINE_RECORD_FILE, trt_engine.TIMING_CACHE_FILE)

    def limitation(self) -> str | None:
        """Without TensorRT and a CUDA GPU, only the build kit is made here."""
        reason = engine_unavailable_reason()
        return f"build kit only, engine not built here: {reason}" if reason else None

    def stage_detail(self, model: CapturedModel, request: BuildRequest) -> str:
        """Precision, and whether the engine is built here."""
        built = "kit + engine" if engine_unavailable_reason() is None else "kit only (no TensorRT/GPU here)"
        return f"{request.precision}: {built}"

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Write the kit; build the engine too when TensorRT and a CUDA GPU are here."""
        import tempfile

        assert model.onnx_path is not None, "the tensorrt target needs the lowered graph"
        with tempfile.TemporaryDirectory(prefix="kiln-trt-") as work:
            source = model.onnx_path
            if request.precision != "fp32":
                source = _reduced_precision_onnx(model, request.precision, Path(work))
            graph = prepare_onnx(source, directory / trt_engine.ONNX_FILE)
        kit_profiles = profiles(model, request.precision)
        (directory / trt_engine.PROFILES_FILE).write_text(json.dumps(kit_profiles, indent=2) + "\n")
        shutil.copy2(trt_engine.__file__, directory / BUILD_SCRIPT)
        notes = []
        if graph["custom_domain_ops"]:
            notes.append(
                f"ops outside the ONNX standard need TensorRT plugins: {', '.join(graph['custom_domain_ops'])}"
            )
        reason = engine_unavailable_reason()
        if reason is None:
            record = trt_engine.build_engine(directory)
            engine: dict[str, Any] = {"built": True, **record}
        else:
            engine = {
                "built": False,
                "why": reason,
                "how": f"on the GPU machine: python {BUILD_SCRIPT} in this directory",
            }
            notes.append(
                f"the engine must be built on the GPU machine (`python {BUILD_SCRIPT}` in this directory, then "
                f"`kiln verify` there); here it {reason}"
            )
        info = {
            "engine": engine,
            "onnx": graph,
            "profiles": kit_profiles["inputs"],
            "trtexec": " ".join(trt_engine.trtexec_command(kit_profiles)),
        }
        return BuildOutput(runtime_config={"tf32": kit_profiles["tf32"]}, info=info, notes=notes)

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """The engine when the kit has one (checked to run here), else the kit's ONNX under ONNX Runtime."""
        if (directory / trt_engine.ENGINE_FILE).is_file():
            record = read_engine_record(directory)
            check_engine_runs_here(directory, record)
            return TensorRtEngineRunner(directory, manifest, record)
        return KitRunner(directory, manifest, threads)
