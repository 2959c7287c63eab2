"""`executorch` (aliases `et`, `pte`): an ExecuTorch program (`model.pte`), PyTorch's own on-device runtime for
phones, embedded boards and desktop C++, its ops delegated to XNNPACK where XNNPACK takes them.

Route: the `torch.export` program (after Kiln's FX passes) -> fp16: re-exported to compute in fp16 (float32 I/O
kept, `kiln.targets.precision`); int8: quantized with PT2E and the XNNPACK quantizer (`kiln.compiler.quantization.pt2e`)
-> `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])` -> `to_executorch()` -> `model.pte`.
Ops XNNPACK does not take run in the runtime's own CPU kernels; the manifest lists both sets
(`target_info.delegation`), and an op the runtime has no kernel for either is refused at build, by name. Dynamic
dims keep their range: ExecuTorch plans memory for the upper bound (a lowering that fails is refused with its
reason, as any conversion failure). Parity runs the `.pte` in `executorch.runtime`, the runtime the C++ API wraps
(`examples/executorch_cpp/`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target
from kiln.targets.buckets import bucket_for

if TYPE_CHECKING:
    import numpy as np
    import torch
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest, TensorSpec

MODEL_FILE = "model.pte"
METHOD = "forward"
PROGRAM_IDENTIFIER = b"ET12"  # the flatbuffer file identifier of ExecuTorch 1.x programs (bytes 4-8)
THREADS = 2  # the thread pool's size when none is asked for (as the LiteRT runner: 2 threads)
INFERENCE_PRECISION = {
    "fp32": "f32",
    "fp16": "fp16 inside the graph (XNNPACK fp16 kernels), float32 I/O",
    "int8": "int8 where quantized (XNNPACK qs8 kernels), f32 elsewhere",
}
_NOT_OPS = ("executorch_call_delegate", "getitem")  # call_function nodes that are bookkeeping, not compute


def op_name(target: Any) -> str:
    """`aten.convolution.default` for an ATen or Edge operator (`dim_order_ops._to_dim_order_copy.default`...)."""
    name = str(getattr(target, "__name__", target))
    namespace = getattr(target, "namespace", "")
    return f"{namespace}.{name}" if namespace and not name.startswith(namespace + ".") else name


def delegation(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """Which ops of a lowered (edge) program XNNPACK runs and which the runtime's own kernels run, by op."""
    xnnpack: Counter[str] = Counter()
    portable: Counter[str] = Counter()
    subgraphs = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module"):
            subgraphs += 1
            inner = getattr(graph_module, str(node.target)).original_module.graph.nodes
            xnnpack.update(op_name(n.target) for n in inner if n.op == "call_function")
        elif node.op == "call_function" and not any(word in str(node.target) for word in _NOT_OPS):
            portable[op_name(node.target)] += 1
    return {
        "backend": "XnnpackBackend",
        "delegated_subgraphs": subgraphs,
        "delegated_ops": sum(xnnpack.values()),
        "portable_ops": sum(portable.values()),
        "xnnpack": dict(xnnpack.most_common()),
        "portable": dict(portable.most_common()),
    }


def delegation_note(placed: dict[str, Any]) -> str | None:
    """A note naming the ops left out of XNNPACK (the usual reason a .pte is slower than expected)."""
    if not placed["portable"]:
        return None
    shown = ", ".join(f"{op} ({n})" for op, n in list(placed["portable"].items())[:6])
    more = len(placed["portable"]) - 6
    return (
        f"{placed['portable_ops']} of {placed['portable_ops'] + placed['delegated_ops']} ops not delegated to "
        f"XNNPACK, run by ExecuTorch's own CPU kernels: {shown}" + (f" and {more} more kinds" if more > 0 else "")
    )


def to_pte(
    program: torch.export.ExportedProgram, path: Path, methods: dict[str, torch.export.ExportedProgram] | None = None
) -> dict[str, Any]:
    """Lower `program` (the method `forward`, and `methods`: more programs of the model, each a method of the same
    `.pte`, e.g. a static-cache decoder's prefill) to XNNPACK and write the ExecuTorch program to `path`; which ops
    of `forward` were delegated. An op left to the runtime that the runtime has no kernel for (the `.pte` would not
    load) is refused here, by name."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from kiln.compiler.capture.decompositions import module_path_of
    from kiln.compiler.errors import UnsupportedOpError

    edge = to_edge_transform_and_lower({METHOD: program, **(methods or {})}, partitioner=[XnnpackPartitioner()])
    placed = delegation(edge.exported_program(METHOD).graph_module)
    lowered = edge.to_executorch()
    missing = missing_kernels(lowered.executorch_program.execution_plan)
    if missing:
        also = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UnsupportedOpError(
            f"ExecuTorch has no kernel for {missing[0]} in {module_path_of(program, missing[0])}{also}, and XNNPACK "
            "does not take it: the program would not load",
            "replace that operation in the model, or try another target",
        )
    path.write_bytes(lowered.buffer)
    return placed


def missing_kernels(plans: list[Any]) -> list[str]:
    """The operators the execution plans call that the ExecuTorch runtime here has no kernel for
    (`aten::sort.values`); the quantized kernels count (the runner loads them)."""
    from kiln.compiler.progress import native_stderr_silenced

    with native_stderr_silenced():
        import executorch.kernels.quantized  # noqa: F401 (registers the quantized_decomposed kernels)
        from executorch.runtime import Runtime

        known = set(Runtime.get().operator_registry.operator_names)
    used = {f"{o.name}.{o.overload}" if o.overload else o.name for plan in plans for o in plan.operators}
    return sorted(used - known)


def check_program_file(path: Path) -> None:
    """A one-line UsageError unless `path` starts like an ExecuTorch program (flatbuffer identifier `ET12`): the
    runtime's own check of a foreign file logs its bytes through Python and aborts the process on non-UTF-8 ones."""
    from kiln.compiler.errors import UsageError

    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", "re-export the model") from None
    if len(head) < 8 or head[4:8] != PROGRAM_IDENTIFIER:
        raise UsageError(
            f"{path} is not an ExecuTorch program (no {PROGRAM_IDENTIFIER.decode()} identifier in its header)",
            "re-export the model with --target executorch",
        )


class ExecuTorchRunner(Runner):
    """Runs a `.pte` in the ExecuTorch runtime (`executorch.runtime`, XNNPACK delegate) on the CPU."""

    thread_control = "executorch thread pool size (portable_lib._unsafe_reset_threadpool, process-wide)"

    def __init__(
        self,
        path: Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        precision: str,
        threads: int,
        buckets: dict[str, dict[str, list[int]]] | None = None,
    ):
        """`buckets`: each method's input shapes, where the program has more than `forward` (the method run is the
        one whose shapes the feeds have)."""
        from kiln.compiler.progress import native_stderr_silenced

        check_program_file(path)
        # its imports (torchao's) and the runtime (CPU probing, thread pool resets, from C++) log to stderr
        with native_stderr_silenced():
            import executorch.kernels.quantized  # noqa: F401 (quantize/dequantize ops XNNPACK left to the runtime)
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

            if portable_lib._threadpool_get_thread_count() != threads:
                portable_lib._unsafe_reset_threadpool(threads)
            self.program = Runtime.get().load_program(Path(path))
            self.methods = {name: self.program.load_method(name) for name in buckets or (METHOD,)}
        self.inputs, self.outputs, self.precision, self.threads = inputs, outputs, precision, threads
        self.buckets = buckets

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name (copied out of the runtime's planned memory)."""
        import numpy as np
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs]
        method = self.methods[bucket_for("executorch", self.buckets, feeds) if self.buckets else METHOD]
        results = torch.utils._pytree.tree_leaves(method.execute(args))
        return {spec.name: np.array(value.numpy(), copy=True) for spec, value in zip(self.outputs, results)}

    def runtime_info(self) -> dict[str, Any]:
        """Runtime version, its registered backends, threads and the compute precision."""
        from importlib.metadata import version

        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        return {
            "runtime": f"executorch {version('executorch')} runtime (XNNPACK delegate)",
            "backends": list(Runtime.get().backend_registry.registered_backend_names),
            "threads": int(portable_lib._threadpool_get_thread_count()),
            "inference_precision": INFERENCE_PRECISION.get(self.precision, self.precision),
        }


class ExecuTorchTarget(Target):
    """An ExecuTorch program with XNNPACK delegation, validated in the ExecuTorch runtime."""

    name = "executorch"
    aliases = ("et", "pte")
    description = (
        "ExecuTorch program (.pte), ops delegated to XNNPACK, for phones, embedded boards and C++; "
        "validated in the ExecuTorch runtime"
    )
    requires: ClassVar[dict[str, str]] = {"executorch": "executorch"}
    precisions = ("fp32", "fp16", "int8")
    consumes = "torch"
    accuracy_aware = True
    kv_cache = "static"  # text generation: the static-cache decode step (compiler/generation/static_kv_cache.py)
    tuned_by_default = True  # `kiln tune` times it by default: its artifacts run on the CPU that tunes

    def stage_detail(self, model: CapturedModel, request: BuildRequest) -> str:
        """Precision and the lowering."""
        return f"{request.precision}: to_edge_transform_and_lower (XNNPACK) -> to_executorch"

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Lower the program (re-exported in fp16, or quantized, as the precision asks) and write `model.pte`."""
        assert model.exported is not None, "the executorch target needs the FX program"
        built = BuildOutput(runtime_config={"method": METHOD, "threads": THREADS})
        path = directory / MODEL_FILE
        if request.precision == "int8":
            built.info["delegation"] = self._quantized(model, path, request, built)
        else:
            programs = {METHOD: model, **dict(model.signatures)}  # a static-cache decoder's prefill: a second method
            if request.precision == "fp16":
                from kiln.targets.precision import reduced_precision_program

                exported = {
                    name: reduced_precision_program(v.exported, "fp16", [s.name for s in v.inputs], v.dynamic)
                    for name, v in programs.items()
                    if v.exported is not None
                }
            else:
                exported = {name: v.exported for name, v in programs.items() if v.exported is not None}
            if len(exported) > 1:
                built.runtime_config["buckets"] = {
                    n: {s.name: list(s.shape) for s in v.inputs} for n, v in programs.items()
                }
            forward = exported.pop(METHOD)
            built.info["delegation"] = to_pte(forward, path, exported)
        built.info["model_bytes"] = path.stat().st_size
        note = delegation_note(built.info["delegation"])
        built.notes += [note] if note else []
        return built

    @staticmethod
    def _quantized(model: CapturedModel, path: Path, request: BuildRequest, built: BuildOutput) -> dict[str, Any]:
        """Write the int8 `.pte` (accuracy-aware with --max-drop) and its per-layer report; record the quantization
        in `built`; which ops the kept program delegated."""
        from dataclasses import asdict

        from kiln.compiler.quantization.accuracy import reverted_note
        from kiln.compiler.quantization.pt2e import accuracy_aware_pt2e, pt2e_report, quantize_pt2e
        from kiln.compiler.quantization.report import DEFAULT_REPORT_SAMPLES, module_classes
        from kiln.targets.pt2 import ExportedProgramRunner

        assert model.exported is not None and request.calibration is not None, "int8 needs calibration data"
        calibration, classes = request.calibration, module_classes(model.exported)
        placed: list[dict[str, Any]] = []

        def lowered(program: torch.export.ExportedProgram) -> Runner:
            placed[:] = [to_pte(program, path)]
            return ExecuTorchRunner(path, model.inputs, model.outputs, "int8", THREADS)

        extra: dict[str, Any] = {}
        if request.accuracy is None:
            program, converted, summary = quantize_pt2e(model.exported, calibration, model.inputs, model.dynamic)
            feeds = calibration.batches(model.inputs)[:DEFAULT_REPORT_SAMPLES]
            report = pt2e_report(model.exported, converted, feeds, model.inputs, classes)
            lowered(program)
        else:
            reference = ExportedProgramRunner.in_memory(model.exported, model.inputs, model.outputs)
            _, summary, report, result = accuracy_aware_pt2e(
                model.exported, calibration, request.accuracy, model.inputs, model.dynamic, reference, lowered, classes
            )
            extra["accuracy_aware"] = result.summary()
            built.notes.append(reverted_note(result.reverted_modules))
        report.write(path.parent)
        built.info["quantization"] = {
            **summary.to_dict(),
            "calibration": calibration.summary(),
            "quant_report": asdict(report.summary),
            **extra,
        }
        built.notes[:0] = [
            f"int8: {summary.quantized} weighted nodes converted"
            + (f", {len(summary.kept_float)} kept in float32" if summary.kept_float else ""),
            *summary.notes,
        ]
        built.passes.append(summary.pass_record())
        return placed[0]

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """The `.pte` in the ExecuTorch runtime, its thread pool at `threads` (else the manifest's, 2)."""
        from kiln.compiler.limits import check_threads

        count = threads or manifest.runtime_config.get("threads", THREADS)
        check_threads("the manifest's runtime_config.threads", count)  # a forged manifest: a one-line error
        buckets = manifest.runtime_config.get("buckets")
        return ExecuTorchRunner(
            directory / MODEL_FILE, manifest.inputs, manifest.outputs, manifest.precision, count, buckets or None
        )
