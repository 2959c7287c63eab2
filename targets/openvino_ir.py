"""`openvino` (alias `cpu`): OpenVINO IR, validated with the OpenVINO CPU runtime.

Routes, tried in order (`OpenVinoTarget.routes`): the IR is converted from Kiln's ONNX graph first
(`onnx(dynamo)`, then `onnx(torchscript)`): the ONNX route is the one every pass writes to, it accepts
`.onnx` sources, and OpenVINO's direct PyTorch frontend fails on models (e.g. transformers' GPT-2) that
its ONNX frontend reads. When neither ONNX route converts, `openvino.convert_model` converts the exported
program directly (`DIRECT_ROUTE`, see `kiln.targets.openvino_direct`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.compiler.quantization.openvino import QUANTIZED_PRECISIONS
from kiln.targets.base import ONNX_ROUTES, BuildOutput, BuildRequest, Route, Runner, RuntimeSettings, Target

if TYPE_CHECKING:
    import numpy as np
    import openvino as ov
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.quantization.accuracy import QuantizedModel
    from kiln.compiler.types import Feeds, Manifest, TensorSpec

MODEL_FILE = "model.xml"
FAKE_QUANTIZED = "::fake_quantized"  # the name a tapped FakeQuantize output is given (int8)
# What the runtime is asked to compute in, per export precision. fp16 keeps fp16 weights
# in the IR but computes in f32; bf16 asks the CPU plugin for bf16 where the CPU has it.
# int8 runs its quantized ops in int8 and the rest in f32 (not bf16 on CPUs that have it), so that
# it validates the same on every CPU.
INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32", "int8-dynamic": "f32"}
INFERENCE_PRECISION["int4"] = "f32"  # a text-generation export's int4 weights, decompressed to f32
# Runtime layers that are bookkeeping, not compute (left out of the int8 layer count).
_NOT_COMPUTE = ("Const", "Input", "Output", "Parameter", "Result")
# OpenVINO's PyTorch frontend on the torch.export program: the route after the ONNX ones.
# A fallback: it skips Kiln's ONNX passes, so it does not replace an ONNX build that converted but failed parity.
DIRECT_ROUTE = Route("openvino.convert_model(ExportedProgram)", "torch", fallback=True)


class OpenVinoRunner(Runner):
    """Runs an OpenVINO IR on the CPU plugin with the manifest's runtime config."""

    thread_control = "openvino INFERENCE_NUM_THREADS"

    def __init__(self, directory: Path, manifest: Manifest):
        import openvino as ov

        model = ov.Core().read_model(str(directory / MODEL_FILE))
        self._compile(model, manifest.runtime_config, manifest.inputs, manifest.outputs)

    @classmethod
    def in_memory(
        cls, ov_model: Any, runtime_config: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> OpenVinoRunner:
        """A runner on a model not saved yet (e.g. one of the trials of --max-drop)."""
        runner = cls.__new__(cls)
        runner._compile(ov_model, runtime_config, inputs, outputs)
        return runner

    def _compile(
        self, ov_model: Any, runtime_config: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(ov_model, "CPU", dict(runtime_config))
        self.request = self.compiled.create_infer_request()
        self.inputs, self.outputs = inputs, outputs
        self.output_ports = list(self.compiled.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        results = self.request.infer(feeds)
        return {spec.name: results[port].copy() for spec, port in zip(self.outputs, self.output_ports)}

    def runtime_info(self) -> dict[str, Any]:
        """The precision the CPU plugin actually ran in, and its threads."""
        import openvino as ov

        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return {
            "runtime": f"openvino {ov.get_version()}",
            "inference_precision": precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision),
            "execution_mode": str(self.compiled.get_property("EXECUTION_MODE_HINT")),
            "performance_hint": str(self.compiled.get_property("PERFORMANCE_HINT")),
            "num_streams": str(self.compiled.get_property("NUM_STREAMS")),
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
            **self.layer_precisions(),
        }

    def layer_precisions(self) -> dict[str, int]:
        """How many compute layers the CPU plugin runs, and how many of them in int8 (u8/i8)."""
        layers = int8 = 0
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if str(info["layerType"].astype(str)) in _NOT_COMPUTE:
                continue
            layers += 1
            int8 += str(info["runtimePrecision"].astype(str)) in ("u8", "i8")
        return {"layers": layers, "int8_layers": int8}


def nhwc_io(ov_model: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The model with the named image inputs and outputs in NHWC, by OpenVINO's PrePostProcessor (tensor layout
    NHWC, model layout NCHW): it adds the Transposes, and the CPU plugin picks its own layouts inside."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(ov_model)
    for name in inputs:
        ppp.input(name).tensor().set_layout(ov.Layout("NHWC"))
        ppp.input(name).model().set_layout(ov.Layout("NCHW"))
    for name in outputs:
        ppp.output(name).model().set_layout(ov.Layout("NCHW"))
        ppp.output(name).tensor().set_layout(ov.Layout("NHWC"))
    return ppp.build()


def _with_nhwc_io(ov_model: Any, model: CapturedModel, built: BuildOutput) -> Any:
    """`--io nhwc`: the IR with channels-last image I/O; its I/O specs, layout counts and pass record into `built`."""
    import time

    import onnx_ir
    from kiln.compiler.image_layout import channels_last, nhwc_names
    from kiln.compiler.types import PassRecord
    from kiln.passes.channels_last import NHWC_STEP, ONNX_CHANNELS_FIRST_OPS, LayoutCounts, count_ops

    assert model.onnx_path is not None
    inputs, outputs = channels_last(model.inputs), channels_last(model.outputs)
    nodes_before = len(ov_model.get_ordered_ops())
    started = time.perf_counter()
    converted = nhwc_io(ov_model, nhwc_names(inputs), nhwc_names(outputs))
    seconds = round(time.perf_counter() - started, 4)
    graph = onnx_ir.load(str(model.onnx_path))
    counts = LayoutCounts(
        boundary=len(nhwc_names(inputs)) + len(nhwc_names(outputs)),
        fixed_layout_ops=count_ops(graph, ONNX_CHANNELS_FIRST_OPS),
        model_transposes=count_ops(graph, {"Transpose"}),
        transposes_after=sum(op.get_type_name() == "Transpose" for op in converted.get_ordered_ops()),
    )
    built.inputs, built.outputs, built.info["layout"] = inputs, outputs, counts.to_info()
    nodes_after = len(converted.get_ordered_ops())
    built.passes.append(PassRecord(NHWC_STEP, True, nodes_before, nodes_after, seconds, "openvino"))
    return converted


def _read_onnx(path: Path, precision: str) -> Any:
    """The ONNX graph as an OpenVINO model: by `convert_model`, or for a graph with external data (large weights) at
    fp32/fp16/bf16 by `Core.read_model`, which maps the weights instead of copying them. `convert_model`'s
    transformations copy every MatMul weight, transposed, while the mapped weights are resident (twice the weights
    at once, with the interpreter lock held so nothing can hand pages back meanwhile); the CPU plugin applies its
    own when it compiles, in the same memory. On a 100M-parameter Llama the two IRs gave identical outputs, the
    read one with some shape ops left (558 runtime layers vs 472, latency within noise). NNCF quantizes the
    converted model."""
    import openvino as ov
    from kiln.compiler.capture.onnx_files import has_external_data

    if precision not in QUANTIZED_PRECISIONS and has_external_data(path):
        return ov.Core().read_model(str(path))
    return ov.convert_model(str(path))


class OpenVinoTarget(Target):
    """OpenVINO IR (`model.xml` + `model.bin`) for Intel/AMD CPUs."""

    name = "openvino"
    tuned_by_default = True  # kiln tune without --targets
    kv_cache = "growing"
    aliases = ("cpu", "ov")
    description = "OpenVINO IR (.xml + .bin), validated on the OpenVINO CPU runtime"
    requires: ClassVar[dict[str, str]] = {"openvino": "openvino", "onnx": "onnx"}
    precisions = ("fp32", "fp16", "bf16", "int8-dynamic", "int8")
    weight_only = ("int8", "int4")  # text generation: nncf.compress_weights (kiln.compiler.quantization.weight_only)
    io_options = ("nhwc",)
    accuracy_aware = True
    tappable = True  # extra outputs of the ov.Model (kiln.compiler.diagnose.fast_path)

    def routes(self) -> tuple[Route, ...]:
        """For text generation, OpenVINO GenAI's stateful model first (`kiln.targets.openvino_genai`); the ONNX
        routes, then OpenVINO's own PyTorch frontend on the exported program."""
        from kiln.targets.openvino_genai import GENAI_ROUTE

        return (GENAI_ROUTE, *ONNX_ROUTES, DIRECT_ROUTE)

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Convert the ONNX graph to IR, quantized with NNCF for int8/int8-dynamic; weights stay fp32 unless
        fp16 was asked for."""
        import openvino as ov
        from kiln.targets.openvino_direct import convert_direct
        from kiln.targets.openvino_genai import GENAI_ROUTE, write_genai_folder

        precision = request.precision
        if request.route == DIRECT_ROUTE.name:
            ov_model = convert_direct(model, request, DIRECT_ROUTE.name)
        else:
            assert model.onnx_path is not None, "an ONNX route needs the lowered graph"
            ov_model = _read_onnx(model.onnx_path, precision)
        built = BuildOutput(info={"weights": "fp16" if precision == "fp16" else "fp32"})
        if request.weights is not None:  # a text-generation export's weight-only int8/int4
            ov_model = _compress_weights(ov_model, model, request, built)
        elif precision in QUANTIZED_PRECISIONS:  # before the layout change: calibration rows are channels-first
            quantized = _quantize(ov_model, model, request)
            ov_model, quantization, aware = quantized.model, quantized.summary, quantized.accuracy
            built.passes.append(quantization.pass_record())
            built.info |= {"weights": "int8", "quantization": quantization.to_dict()}
            built.notes += quantization.notes
            if aware is not None:
                built.info["quantization"]["accuracy_aware"] = aware.summary()
                built.notes.append(aware.note())
            if request.calibration is not None:
                built.info["calibration"] = request.calibration.summary()
        if request.io_layout == "nhwc":
            ov_model = _with_nhwc_io(ov_model, model, built)
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}
        if request.route == GENAI_ROUTE.name:
            if config["INFERENCE_PRECISION_HINT"] == "f32":  # the cache as computed (the CPU's default is u8)
                config["KV_CACHE_PRECISION"] = "f32"
            write_genai_folder(ov_model, directory, request.language_model, config, built, precision == "fp16")
        else:  # save_model compresses weights to fp16 by default: only an fp16 export may.
            ov.save_model(ov_model, str(directory / MODEL_FILE), compress_to_fp16=precision == "fp16")
        cpu = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in cpu:
            built.notes.append(
                "this CPU has no bf16 support: OpenVINO computes in f32 here; "
                "the IR asks for bf16 and will use it on a CPU that has it"
            )
        built.runtime_config = config
        built.info["cpu_capabilities"] = list(cpu)
        return built

    def runtime_variants(self, precision: str) -> tuple[RuntimeSettings, ...]:
        """The CPU plugin's LATENCY and THROUGHPUT hints; also the CPU's own inference precision (bf16 on CPUs
        that have it, which the parity gate then judges; elsewhere it is the f32 the build pins). For int8 that
        is what `nncf.quantize`'s output gets by default: its unquantized ops in bf16."""
        import openvino as ov

        hints = ("LATENCY", "THROUGHPUT")
        bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        own = ("default",) if precision != "bf16" and bf16 else ()  # without bf16 the default is f32
        return (
            RuntimeSettings(),
            *(RuntimeSettings(performance_hint=h) for h in hints),
            *(RuntimeSettings(performance_hint=h, inference_precision=p) for h in hints for p in own),
        )

    def with_runtime_settings(self, manifest: Manifest, settings: RuntimeSettings) -> Manifest:
        """PERFORMANCE_HINT and INFERENCE_PRECISION_HINT into runtime_config (what the CPU plugin compiles with);
        inference precision "default" drops the pinned hint, "f32" pins f32."""
        from dataclasses import replace

        from kiln.compiler.errors import UsageError

        if settings.graph_optimization:
            return super().with_runtime_settings(manifest, settings)
        config = dict(manifest.runtime_config)
        if settings.performance_hint is not None:
            if settings.performance_hint not in ("LATENCY", "THROUGHPUT"):
                raise UsageError(
                    f"OpenVINO performance hint {settings.performance_hint!r}", "use LATENCY or THROUGHPUT"
                )
            config["PERFORMANCE_HINT"] = settings.performance_hint
        if settings.inference_precision == "default":
            config.pop("INFERENCE_PRECISION_HINT", None)
        elif settings.inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = settings.inference_precision
        return replace(manifest, runtime_config=config)

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """A compiled model on the CPU plugin (a stateful one for an `openvino-genai` artifact)."""
        from kiln.targets.openvino_genai import LLM_FORMAT, OpenVinoStatefulRunner

        if threads:
            from dataclasses import replace

            manifest = replace(manifest, runtime_config={**manifest.runtime_config, "INFERENCE_NUM_THREADS": threads})
        if manifest.target_info.get("llm_format") == LLM_FORMAT:
            return OpenVinoStatefulRunner(directory, manifest)
        return OpenVinoRunner(directory, manifest)

    def tapped_runs(
        self, directory: Path, manifest: Manifest, names: dict[int, str], inputs: list[Feeds]
    ) -> list[dict[int, np.ndarray]]:
        """The IR with each tensor added as an output of the `ov.Model`, compiled as `load` compiles it."""
        return _tapped_runs(directory, manifest, names, inputs)


def _compress_weights(ov_model: ov.Model, model: CapturedModel, request: BuildRequest, built: BuildOutput) -> ov.Model:
    """The weight-only int8/int4 of a text-generation export (`request.weights`, NNCF), recorded in `built`; with
    --max-drop, the most sensitive linear layers kept apart (ranked on the fp32 ONNX graph, whose node names the
    OpenVINO ops keep) until within budget."""
    from kiln.compiler.quantization.openvino import compress_openvino_weights

    spec = request.weights
    assert spec is not None
    kept: list[Any] = []

    def compress(apart: Sequence[str]) -> Any:
        keep = {"keep_8bit" if spec.bits < spec.head_bits else "keep_float": apart}
        kept[:] = list(compress_openvino_weights(ov_model, spec, **keep))
        return kept[0]

    if request.accuracy is None:
        compress(())
    else:
        from kiln.compiler.quantization.accuracy import accuracy_aware_weights, kept_apart_note, weight_candidates
        from kiln.targets.onnxrt import OnnxRuntimeRunner

        assert model.onnx_path is not None, "--max-drop ranks the layers on the ONNX graph"
        fp32 = OnnxRuntimeRunner(model.onnx_path)
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[spec.precision]}

        def runner(apart: Sequence[str]) -> Runner:
            return OpenVinoRunner.in_memory(compress(apart), config, fp32.inputs, fp32.outputs)

        candidates = weight_candidates(model.onnx_path, spec)
        aware = accuracy_aware_weights(runner, fp32, request.accuracy, candidates)
        built.info["accuracy_aware"] = aware.summary()
        built.notes.append(kept_apart_note(aware.reverted, spec.bits))
    compressed, summary = kept
    built.passes.append(summary.pass_record())
    built.info |= {"weights": spec.precision, "quantization": summary.to_dict()}
    built.notes.append(f"{spec.describe()}: {summary.quantized} layers compressed by NNCF")
    return compressed


def _quantize(ov_model: ov.Model, model: CapturedModel, request: BuildRequest) -> QuantizedModel:
    """The model quantized with NNCF as the request asks (accuracy-aware with --max-drop), with its summary and
    the --max-drop result."""
    from kiln.compiler.quantization.accuracy import QuantizedModel
    from kiln.compiler.quantization.openvino import quantize_openvino

    if request.accuracy is None:
        return QuantizedModel(*quantize_openvino(ov_model, request.precision, request.calibration))
    from kiln.compiler.quantization.accuracy import accuracy_aware_nncf
    from kiln.compiler.quantization.report import module_classes
    from kiln.targets.onnxrt import OnnxRuntimeRunner

    assert model.onnx_path is not None and request.calibration is not None
    classes = module_classes(model.exported) if model.exported is not None else None
    fp32_runner = OnnxRuntimeRunner(model.onnx_path)
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION["int8"]}

    def open_runner(quantized: ov.Model) -> Runner:
        return OpenVinoRunner.in_memory(quantized, config, fp32_runner.inputs, fp32_runner.outputs)

    return accuracy_aware_nncf(
        ov_model, model.onnx_path, request.calibration, request.accuracy, fp32_runner, open_runner, classes
    )


def _tapped_runs(
    directory: Path, manifest: Manifest, names: dict[int, str], inputs: list[Feeds]
) -> list[dict[int, np.ndarray]]:
    """`Target.tapped_runs` for an IR: each tensor (in an int8 IR, as read back) an extra output of the `ov.Model`."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(directory / MODEL_FILE))
    ports: dict[str, Any] = {}
    for op in model.get_ordered_ops():
        for port in op.outputs():
            for name in port.get_names():
                ports.setdefault(name, port)
    taps: dict[int, str] = {}
    outputs: dict[str, Any] = {}
    for index, name in names.items():
        if name in ports:
            tapped, port = _read_back(ports[name], name)
            taps[index], outputs[tapped] = tapped, port
    model.add_outputs(list(outputs.values()))
    from kiln.targets.openvino_genai import plugin_config

    compiled = core.compile_model(model, "CPU", plugin_config(manifest.runtime_config))
    by_name = {name: out for out in compiled.outputs for name in out.get_names()}
    request = compiled.create_infer_request()
    runs = []
    for feeds in inputs:
        results = request.infer(feeds)
        runs.append({index: np.array(results[by_name[name]]) for index, name in taps.items() if name in by_name})
    return runs


def _read_back(port: Any, name: str) -> tuple[str, Any]:
    """The tensor `name` (an OpenVINO output port) as the next layers read it: in an int8 IR, the output of the
    FakeQuantize that is its one consumer (given the name `name` + FAKE_QUANTIZED to be tapped by), else itself."""
    consumers = list(port.get_target_inputs())
    if len(consumers) != 1 or consumers[0].get_node().get_type_name() != "FakeQuantize":
        return name, port
    quantized = consumers[0].get_node().output(0)
    quantized.get_tensor().add_names({name + FAKE_QUANTIZED})
    return name + FAKE_QUANTIZED, quantized
