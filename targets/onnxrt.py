"""`onnx`: the ONNX file itself (fp32, or quantized by compiler/quantization/onnxrt.py), validated with ONNX
Runtime's CPU provider."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.compiler.ort_session import graph_optimization_level, ort_session
from kiln.targets.base import ONNX_ROUTES, BuildOutput, BuildRequest, Route, Runner, RuntimeSettings, Target

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.quantization.accuracy import QuantizedModel
    from kiln.compiler.quantization.calibration import AccuracyBudget, CalibrationData
    from kiln.compiler.quantization.summary import QuantizeSummary
    from kiln.compiler.types import Feeds, Manifest

MODEL_FILE = "model.onnx"
INFERENCE_PRECISION = {
    "int8": "int8 (Q/DQ fused into ONNX Runtime's integer kernels; uint8 activations)",
    "int8-dynamic": "int8 weights, activations quantized at run time; other ops f32",
    "fp16": "fp16 weights and activations; f32 where ONNX Runtime's CPU provider has no fp16 kernel (it casts)",
}


# A text-generation export's int8/int4 (kiln.compiler.quantization.weight_only)
WEIGHT_ONLY = "int4/int8 weights (MatMulNBits), activations quantized to int8 per block inside the kernel"


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file with ONNX Runtime (CPU provider)."""

    thread_control = "onnxruntime intra_op_num_threads"

    def __init__(self, path: Path, manifest: Manifest | None = None, threads: int = 0):
        from kiln.compiler.types import TensorSpec

        level = (manifest.runtime_config if manifest is not None else {}).get(GRAPH_OPTIMIZATION_KEY)
        self.path, self.threads = path, threads
        self.session: Any = ort_session(path, threads, str(level) if level is not None else None)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.precision = manifest.precision if manifest is not None else "fp32"
        quantization = manifest.target_info.get("quantization") if manifest is not None else None
        matmul_nbits = isinstance(quantization, dict) and "MatMulNBits" in str(quantization.get("tool"))
        own = INFERENCE_PRECISION.get(self.precision, self.precision)
        self.inference_precision = WEIGHT_ONLY if matmul_nbits else own
        self.graph_optimization = str(level or "all")
        if manifest is not None:
            self.inputs, self.outputs = manifest.inputs, manifest.outputs
        else:
            self.inputs = [TensorSpec(i.name, tuple(i.shape), _ort_dtype(i.type)) for i in self.session.get_inputs()]
            self.outputs = [TensorSpec(o.name, tuple(o.shape), _ort_dtype(o.type)) for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def runtime_info(self) -> dict[str, Any]:
        """Provider and ONNX Runtime version."""
        import onnxruntime as ort

        return {
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": self.providers,
            "inference_precision": self.inference_precision,
            "graph_optimization": self.graph_optimization,
        }


GRAPH_OPTIMIZATION_KEY = "graph_optimization_level"  # runtime_config key: RuntimeSettings.graph_optimization


def _ort_dtype(type_string: str) -> str:
    """`tensor(float)` -> `float32`."""
    import numpy as np

    inner = type_string.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64", "float16": "float16"}.get(inner, inner)).name


class OnnxRuntimeTarget(Target):
    """The optimized ONNX graph, for ONNX Runtime or any ONNX consumer."""

    name = "onnx"
    tuned_by_default = True  # kiln tune without --targets
    kv_cache = "growing"
    aliases = ("onnxruntime", "ort")
    description = "ONNX file (opset >= 18), validated with ONNX Runtime on the CPU"
    requires: ClassVar[dict[str, str]] = {"onnx": "onnx", "onnxruntime": "onnxruntime"}
    precisions = ("fp32", "int8", "int8-dynamic", "fp16")  # bf16: ORT's CPU provider has no bf16 kernels
    weight_only = ("int8", "int4")  # text generation: MatMulNBits (kiln.compiler.quantization.weight_only)
    io_options = ("nhwc",)
    accuracy_aware = True
    tappable = True  # extra graph outputs (kiln.compiler.diagnose.fast_path)

    def routes(self) -> tuple[Route, ...]:
        """For text generation, an onnxruntime-genai folder first (`kiln.targets.onnxrt_genai`); the ONNX routes."""
        from kiln.targets.onnxrt_genai import GENAI_ROUTE

        return (GENAI_ROUTE, *ONNX_ROUTES)

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """The optimized ONNX file (and any external data) in the artifact directory: with `--io nhwc`
        rewritten for channels-last image I/O, and quantized when the precision is not fp32; by the
        `onnxruntime-genai` route, with the folder onnxruntime-genai loads around it."""
        from kiln.targets.onnxrt_genai import GENAI_ROUTE, write_genai_folder

        output = self._build_graph(model, directory, request)
        if request.route == GENAI_ROUTE.name:
            write_genai_folder(directory / MODEL_FILE, request.language_model, output)
        return output

    def _build_graph(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """The ONNX file of `build`."""
        assert model.onnx_path is not None, "an ONNX target needs the lowered graph"
        output = BuildOutput(runtime_config={"providers": ["CPUExecutionProvider"]})
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as scratch:
            graph = model.onnx_path
            if request.io_layout == "nhwc":
                from kiln.compiler.image_layout import channels_last, nhwc_names
                from kiln.passes.channels_last import nhwc_onnx_file

                output.inputs, output.outputs = channels_last(model.inputs), channels_last(model.outputs)
                graph = Path(scratch) / MODEL_FILE
                counts, record = nhwc_onnx_file(
                    model.onnx_path, graph, nhwc_names(output.inputs), nhwc_names(output.outputs)
                )
                output.info["layout"] = counts.to_info()
                output.passes.append(record)
            if request.precision == "fp32":
                from kiln.compiler.large_graphs import link_or_copy

                for file in graph.parent.iterdir():
                    if file == graph:
                        shutil.copy2(file, directory / MODEL_FILE)
                    else:  # external data, never rewritten in place: linked where it can be
                        link_or_copy(file, directory / file.name)
                return output
            if request.weights is not None:
                quantize_weights_artifact(model, graph, directory / MODEL_FILE, request, output)
                return output
            if request.calibration is not None and output.inputs is not None:
                request = replace(request, calibration=request.calibration.in_layout(output.inputs))
            self._quantize(model, graph, directory, request, output)
        return output

    @staticmethod
    def _quantize(
        model: CapturedModel, graph: Path, directory: Path, request: BuildRequest, output: BuildOutput
    ) -> None:
        """Write `graph` quantized at the requested precision into the artifact directory; calibrated int8 also
        gets its per-layer report (`quant_report.json`) and, with --max-drop, reverts its most sensitive layers."""
        from kiln.compiler.quantization.accuracy import reverted_note
        from kiln.compiler.quantization.onnxrt import quantize_onnx
        from kiln.compiler.quantization.report import module_classes

        calibration = request.calibration
        if request.precision == "int8":
            assert calibration is not None, "int8 needs calibration data (the pipeline provides it)"
            classes = module_classes(model.exported) if model.exported is not None else None
            summary, extra = quantize_onnx_artifact(
                graph, directory / MODEL_FILE, calibration, request.accuracy, module_classes=classes
            )
        else:
            summary, extra = quantize_onnx(graph, directory / MODEL_FILE, request.precision, calibration), {}
        output.info["quantization"] = {
            **summary.to_dict(),
            "calibration": calibration.summary() if calibration is not None else None,
            **extra,
        }
        output.notes.append(
            f"{request.precision}: {summary.quantized} weighted nodes converted"
            + (f", {len(summary.kept_float)} kept in float32" if summary.kept_float else "")
        )
        if "accuracy_aware" in extra:
            output.notes.append(reverted_note(extra["accuracy_aware"]["reverted_modules"]))
        output.passes.append(summary.pass_record())

    def runtime_variants(self, precision: str) -> tuple[RuntimeSettings, ...]:
        """ONNX Runtime's default (all graph optimizations) and only its basic ones (fewer fusions: on some
        models and CPUs the extended fusions are slower)."""
        return (RuntimeSettings(), RuntimeSettings(graph_optimization="basic"))

    def with_runtime_settings(self, manifest: Manifest, settings: RuntimeSettings) -> Manifest:
        """The graph optimization level into runtime_config (what OnnxRuntimeRunner reads)."""
        if settings.performance_hint or settings.inference_precision:
            return super().with_runtime_settings(manifest, settings)
        config = {k: v for k, v in manifest.runtime_config.items() if k != GRAPH_OPTIMIZATION_KEY}
        if settings.graph_optimization is not None:
            graph_optimization_level(settings.graph_optimization)  # refuse an unknown level now
            config[GRAPH_OPTIMIZATION_KEY] = settings.graph_optimization
        return replace(manifest, runtime_config=config)

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """An ONNX Runtime session on the artifact (with the graph optimization level its runtime_config names);
        for an `onnxruntime-genai` artifact, with onnxruntime-genai's Generator for decoding."""
        from kiln.targets.onnxrt_genai import LLM_FORMAT

        if manifest.target_info.get("llm_format") == LLM_FORMAT:
            return OnnxGenAIRunner(directory, manifest, threads=threads or 0)
        return OnnxRuntimeRunner(directory / MODEL_FILE, manifest, threads=threads or 0)

    def tapped_runs(
        self, directory: Path, manifest: Manifest, names: dict[int, str], inputs: list[Feeds]
    ) -> list[dict[int, np.ndarray]]:
        """The artifact's ONNX graph with each tensor added as a graph output, run by ONNX Runtime."""
        return _tapped_runs(directory / MODEL_FILE, names, inputs)


def quantize_weights_artifact(
    model: CapturedModel, graph: Path, destination: Path, request: BuildRequest, output: BuildOutput
) -> None:
    """The weight-only int8/int4 of a text-generation export (`request.weights`) into `destination`, with its
    summary, note and pass record in `output`."""
    from kiln.compiler.quantization.accuracy import accuracy_aware_weights, kept_apart_note, weight_candidates
    from kiln.compiler.quantization.matmul_nbits import quantize_onnx_weights

    spec = request.weights
    assert spec is not None
    kept: list[Any] = []

    def quantize(apart: Sequence[str]) -> Runner:
        keep = {"keep_8bit" if spec.bits < spec.head_bits else "keep_float": apart}
        kept[:] = [quantize_onnx_weights(graph, destination, spec, **keep)]
        return OnnxRuntimeRunner(destination)

    if request.accuracy is None:
        quantize(())
    else:  # --max-drop: the most sensitive layers kept apart until within budget
        aware = accuracy_aware_weights(
            quantize, OnnxRuntimeRunner(graph), request.accuracy, weight_candidates(graph, spec)
        )
        output.info["accuracy_aware"] = aware.summary()
        output.notes.append(kept_apart_note(aware.reverted, spec.bits))
    summary = kept[0]
    output.info["quantization"] = summary.to_dict()
    output.notes.append(
        f"{spec.describe()}: {summary.quantized} linear layers as MatMulNBits"
        + (f" ({len(summary.settings['int8_layers'])} in int8)" if summary.settings["int8_layers"] else "")
    )
    output.passes.append(summary.pass_record())


def accuracy_aware_onnx(
    fp32_onnx: Path,
    destination: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    module_classes: dict[str, str] | None = None,
) -> QuantizedModel:
    """`--max-drop` for this target: kiln.compiler.quantization.accuracy.accuracy_aware_qdq run with ONNX Runtime."""
    from kiln.compiler.quantization.accuracy import accuracy_aware_qdq

    return accuracy_aware_qdq(fp32_onnx, destination, calibration, budget, OnnxRuntimeRunner, module_classes)


def quantize_onnx_artifact(
    fp32_onnx: Path,
    destination: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget | None = None,
    module_classes: dict[str, str] | None = None,
) -> tuple[QuantizeSummary, dict[str, Any]]:
    """Quantize `fp32_onnx` to calibrated int8 into `destination` (accuracy-aware when `budget` is given) and
    write the per-layer report next to it; the quantization summary and what the target records in
    `BuildOutput.info` (report summary, --max-drop result)."""
    from dataclasses import asdict

    from kiln.compiler.capture.onnx_files import onnx_signature
    from kiln.compiler.quantization.onnxrt import quantize_onnx
    from kiln.compiler.quantization.report import write_quant_report

    info: dict[str, Any] = {}
    if budget is not None:
        kept = accuracy_aware_onnx(fp32_onnx, destination, calibration, budget, module_classes)
        assert kept.accuracy is not None and kept.report is not None
        summary, report = kept.summary, kept.report
        report.write(destination.parent)
        info["accuracy_aware"] = kept.accuracy.summary()
    else:
        summary = quantize_onnx(fp32_onnx, destination, "int8", calibration)
        feeds = calibration.batches(onnx_signature(fp32_onnx, torch_layout=False)[0])
        report = write_quant_report(destination.parent, fp32_onnx, destination, feeds, module_classes)
    info["quant_report"] = asdict(report.summary)
    return summary, info


def _tapped_runs(path: Path, names: dict[int, str], inputs: list[Feeds]) -> list[dict[int, np.ndarray]]:
    """`Target.tapped_runs` for an ONNX file: each tensor (in a QDQ graph, as read back) an extra graph output."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    outputs = {o.name for o in model.graph.output}
    produced = {value for node in model.graph.node for value in node.output}
    taps: dict[int, str] = {}
    for index, name in names.items():
        tapped = _dequantized(model, name)
        if tapped in types and tapped in produced:
            taps[index] = tapped
            if tapped not in outputs:
                model.graph.output.append(onnx.helper.make_tensor_value_info(tapped, types[tapped], None))
                outputs.add(tapped)
    session = ort_session(model.SerializeToString())
    wanted = list(dict.fromkeys(taps.values()))
    runs = []
    for feeds in inputs:
        values = dict(zip(wanted, session.run(wanted, feeds)))
        runs.append({index: values[name] for index, name in taps.items()})
    return runs


def _dequantized(model: Any, name: str) -> str:
    """The DequantizeLinear output that reads `name` back after its QuantizeLinear (a QDQ graph), else `name`."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    users = consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        after = consumers.get(users[0].output[0], [])
        if after and all(n.op_type == "DequantizeLinear" for n in after):
            return str(after[0].output[0])
    return name


class OnnxGenAIRunner(OnnxRuntimeRunner):
    """An `onnxruntime-genai` artifact: ONNX Runtime for the step graph's feeds, onnxruntime-genai's Generator for
    decoding (loaded on first use)."""

    keeps_cache = True

    def __init__(self, directory: Path, manifest: Manifest, threads: int = 0):
        super().__init__(directory / MODEL_FILE, manifest, threads)
        self.directory = directory
        self.context = int(manifest.source.get("decoder", {}).get("max_positions") or 0)
        self.genai: Any = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name, from ONNX Runtime's session (made again if the Generator's model replaced it)."""
        if self.session is None:
            self.genai = None  # one copy of the weights at a time: a 3B model's two did not fit in 24 GB
            gc.collect()
            self.session = ort_session(self.path, self.threads, self.graph_optimization)
        return super().run(feeds)

    def decoder(self) -> Callable[[Sequence[int]], np.ndarray]:
        """A new sequence in onnxruntime-genai's Generator (its model loaded in place of ONNX Runtime's session)."""
        import onnxruntime_genai as og

        if self.genai is None:
            self.session = None
            gc.collect()
            config = og.Config(str(self.directory))
            if self.threads:
                options = {"session_options": {"intra_op_num_threads": self.threads}}
                config.overlay(json.dumps({"model": {"decoder": options}}))
            self.genai = og.Model(config)
        params = og.GeneratorParams(self.genai)
        if self.context:
            params.set_search_options(max_length=self.context)
        return _GenAIDecoder(og.Generator(self.genai, params))

    def runtime_info(self) -> dict[str, Any]:
        """ONNX Runtime's, and onnxruntime-genai's version."""
        import onnxruntime_genai as og

        return super().runtime_info() | {"generation_runtime": f"onnxruntime-genai {og.__version__}"}


class _GenAIDecoder:
    """One sequence in an onnxruntime-genai Generator: `append_tokens`, then the last position's logits."""

    def __init__(self, generator: Any):
        self.generator = generator

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        self.generator.append_tokens(list(ids))
        return np.asarray(self.generator.get_logits())[0, -1].copy()
