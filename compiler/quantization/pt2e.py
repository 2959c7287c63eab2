"""ExecuTorch int8: PT2E quantization (torchao's `prepare_pt2e` / `convert_pt2e`) with ExecuTorch's
`XNNPACKQuantizer`, driven by Kiln's one calibration spec; its per-layer report and the `--max-drop` search.

The quantized program is the captured one with quantize/dequantize pairs around every pattern XNNPACK runs in
int8 (convolutions, linear layers, adds, muls, concatenations, pooling); the ExecuTorch target lowers it to
XNNPACK, which fuses each pair into its int8 kernels.

How `CalibrationSpec` maps onto the quantizer's config:
- `method`: minmax -> the global min/max of the calibration batches (`MinMaxObserver`); entropy -> a histogram
  search for the range with the least L2 quantization error (`HistogramObserver`, XNNPACK's own default:
  PyTorch has no KL-divergence observer); percentile -> the same histogram search (PyTorch has no percentile
  observer). The summary notes a method that is not the one asked for.
- `per_channel`: symmetric int8 weights per output channel (`PerChannelMinMaxObserver`) or per tensor.
- `symmetric_activations`: True -> symmetric int8 activations (zero point 0); otherwise asymmetric (affine)
  int8, XNNPACK's own scheme.

Per-layer report (`pt2e_report`, the same `QuantReport` as the ONNX one, `kiln quant-report`): the quantized
program (Q/DQ computed by PyTorch's reference kernels, as XNNPACK computes them in int8) and the fp32 program
run on the same inputs. A layer is a convolution or linear node; its *total* error is its output with every
earlier layer quantized, its *local* error its output when every node but it takes its fp32 value (its input
then passes only its own quantize/dequantize). Nodes keep their names through `prepare_pt2e` and
`convert_pt2e`, so both graphs are matched by name; `--max-drop` keeps layers in float by those names.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.errors import UsageError
from kiln.compiler.metrics import ErrorSums
from kiln.compiler.quantization.summary import QuantizeSummary

if TYPE_CHECKING:
    import torch
    from kiln.compiler.capture.dynamic import DynamicShapes
    from kiln.compiler.quantization.accuracy import AccuracyResult, ModelRunner
    from kiln.compiler.quantization.calibration import AccuracyBudget, CalibrationData, CalibrationSpec
    from kiln.compiler.quantization.report import QuantReport
    from kiln.compiler.types import Feeds, TensorSpec

METHOD_USED = {"minmax": "minmax", "entropy": "histogram", "percentile": "histogram"}
METHOD_NOTES = {
    "entropy": "calibration method entropy: PyTorch has no KL-divergence observer; used HistogramObserver, the "
    "range minimizing the L2 quantization error on a histogram of the calibration activations",
    "percentile": "calibration method percentile: PyTorch has no percentile observer; used HistogramObserver, the "
    "range minimizing the L2 quantization error on a histogram of the calibration activations",
}
DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel")


def quantization_config(spec: CalibrationSpec) -> tuple[Any, dict[str, Any]]:
    """The XNNPACK quantizer's config for `spec`, and the settings it stands for (for the manifest)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    base = get_symmetric_quantization_config(is_per_channel=spec.per_channel)
    observer = MinMaxObserver if spec.method == "minmax" else HistogramObserver
    symmetric = bool(spec.symmetric_activations)
    activations = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=observer.with_args(eps=2**-12),
    )
    config = QuantizationConfig(activations, activations, base.weight, base.bias, False)
    settings = {
        "method": METHOD_USED[spec.method],
        "method_asked": spec.method,
        "per_channel": spec.per_channel,
        "symmetric_activations": symmetric,
        "weights": f"int8 symmetric {'per channel' if spec.per_channel else 'per tensor'}",
        "quantizer": "executorch XNNPACKQuantizer",
    }
    return config, settings


def weighted_nodes(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The convolution and linear nodes of a program's graph, in order: the layers the quantizer gives int8
    weights (and the report and `--max-drop` name)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        CONV_TARGETS,
        CONV_TRANSPOSE_TARGETS,
        LINEAR_TARGETS,
    )

    weighted = {*CONV_TARGETS, *CONV_TRANSPOSE_TARGETS, *LINEAR_TARGETS}
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in weighted]


def is_quantized(node: torch.fx.Node) -> bool:
    """Whether a weighted node of a converted graph reads int8 weights (its weight comes from a dequantize)."""
    weight: Any = node.args[1] if len(node.args) > 1 else None
    return getattr(weight, "op", "") == "call_function" and any(d in str(weight.target) for d in DEQUANTIZE)


def quantize_pt2e(
    program: torch.export.ExportedProgram,
    calibration: CalibrationData,
    inputs: list[TensorSpec],
    dynamic: DynamicShapes | None,
    exclude: Sequence[str] = (),
) -> tuple[torch.export.ExportedProgram, torch.fx.GraphModule, QuantizeSummary]:
    """`program` quantized to int8 for XNNPACK, calibrated on `calibration` with its spec, the weighted nodes
    named in `exclude` kept in float: the re-exported program (same input names and dynamic dims), the
    converted graph module (for the report) and what was done."""
    from importlib.metadata import version

    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    start = time.perf_counter()
    config, settings = quantization_config(calibration.spec)
    quantizer = XNNPACKQuantizer().set_global(config)
    unknown = set(exclude) - {n.name for n in weighted_nodes(program.module())}
    if unknown:
        raise UsageError(f"cannot keep {sorted(unknown)[0]} in float: the program has no such layer")
    if exclude:
        skipped = set(exclude)
        quantizer.set_filter_function(lambda node: node.name not in skipped)
    prepared = prepare_pt2e(copy.deepcopy(program.module()), quantizer)
    with torch.no_grad():
        for feeds in calibration.batches(inputs):
            prepared(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in inputs])
    converted = convert_pt2e(prepared)
    args, _ = program.example_inputs
    shapes = dynamic.torch_shapes([s.name for s in inputs]) if dynamic is not None else None
    quantized = torch.export.export(converted, tuple(args), dynamic_shapes=shapes, strict=False)
    layers = weighted_nodes(converted)
    note = METHOD_NOTES.get(calibration.spec.method)
    summary = QuantizeSummary(
        precision="int8",
        tool=f"torchao {version('torchao')} PT2E, executorch {version('executorch')} XNNPACKQuantizer",
        method=settings["method"],
        settings=settings,
        nodes_before=len(program.graph.nodes),
        nodes_after=len(quantized.graph.nodes),
        quantized=sum(is_quantized(n) for n in layers),
        kept_float=tuple(n.name for n in layers if not is_quantized(n)),
        excluded=tuple(exclude),
        seconds=round(time.perf_counter() - start, 3),
        notes=(note,) if note else (),
        ir="torch.export",
    )
    return quantized, converted, summary


class _Recorder:
    """Runs a graph module node by node, keeping the values of the nodes named in `keep` (all when None); with
    `forced`, every node named there but not in `computed` takes the forced value instead of computing."""

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        keep: set[str] | None = None,
        forced: dict[str, Any] | None = None,
        computed: frozenset[str] | set[str] = frozenset(),
    ):
        import torch

        outer = self

        class Interpreter(torch.fx.Interpreter):
            def run_node(self, node: torch.fx.Node) -> Any:
                forced = outer.forced is not None and node.op == "call_function" and node.name in outer.forced
                if forced and node.name not in outer.computed:
                    return outer.forced[node.name]  # type: ignore[index]
                value = super().run_node(node)
                if outer.keep is None or node.name in outer.keep:
                    outer.values[node.name] = value
                return value

        self.interpreter = Interpreter(graph_module)
        self.keep, self.forced, self.computed = keep, forced, computed
        self.values: dict[str, Any] = {}

    def run(self, *args: torch.Tensor) -> tuple[dict[str, Any], Any]:
        """The kept values and the graph's output."""
        import torch

        self.values = {}
        with torch.no_grad():
            output = self.interpreter.run(*args)
        return self.values, output


def pt2e_report(
    program: torch.export.ExportedProgram,
    converted: torch.fx.GraphModule,
    feeds: list[Feeds],
    inputs: list[TensorSpec],
    classes: dict[str, str] | None = None,
) -> QuantReport:
    """The per-layer report of the quantized `converted` graph against the fp32 `program` on `feeds` (see the
    module docstring): layers worst local SNR first."""
    import torch
    from kiln.compiler.quantization.report import QuantReport, ReportSummary

    if not feeds:
        raise UsageError("the per-layer quantization report needs at least one input sample", "give calibration data")
    layers = weighted_nodes(converted)
    names = {n.name for n in layers}
    total = {name: ErrorSums() for name in names}
    local = {name: ErrorSums() for name in names}
    outputs: list[ErrorSums] = []
    fp32_module = program.module()
    for feed in feeds:
        args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in inputs]
        reference, fp32_out = _Recorder(fp32_module).run(*args)
        quantized, q_out = _Recorder(converted, keep=names).run(*args)
        alone, _ = _Recorder(converted, keep=names, forced=reference, computed=names).run(*args)
        for name in names & set(reference):
            total[name].add(quantized[name].numpy(), reference[name].numpy())
            local[name].add(alone[name].numpy(), reference[name].numpy())
        leaves = zip(torch.utils._pytree.tree_leaves(q_out), torch.utils._pytree.tree_leaves(fp32_out))
        for index, (got, want) in enumerate(leaves):
            if index == len(outputs):
                outputs.append(ErrorSums())
            if want.is_floating_point():
                outputs[index].add(got.float().numpy(), want.numpy())
    rows = [_layer(node, total[node.name], local[node.name], classes or {}) for node in layers]
    rows.sort(key=lambda layer: (layer.local_snr_db, layer.snr_db))
    summary = ReportSummary(
        samples=len(feeds),
        layers=len(rows),
        quantized_layers=sum(1 for row in rows if row.quantized),
        not_compared=0,
        output_snr_db=min((o.snr_db for o in outputs), default=math.inf),
    )
    return QuantReport(rows, summary)


def _layer(node: torch.fx.Node, total: ErrorSums, local: ErrorSums, classes: dict[str, str]) -> Any:
    """The LayerError of one weighted node, with the PyTorch module it came from."""
    from kiln.compiler.quantization.report import LayerError

    stack = list((node.meta.get("nn_module_stack") or {}).values())
    module = str(stack[-1][0]) if stack else "?"
    module_class = classes.get(module) or (str(stack[-1][1]).rsplit(".", 1)[-1] if stack else "")
    return LayerError.measured(
        total,
        local,
        name=node.name,
        op_type=str(getattr(node.target, "__name__", node.target)).split(".")[0],
        tensor=node.name,
        module=module,
        module_class=module_class,
        quantized=is_quantized(node),
    )


def accuracy_aware_pt2e(
    program: torch.export.ExportedProgram,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    inputs: list[TensorSpec],
    dynamic: DynamicShapes | None,
    fp32_runner: ModelRunner,
    open_runner: Callable[[torch.export.ExportedProgram], ModelRunner],
    classes: dict[str, str] | None = None,
) -> tuple[torch.export.ExportedProgram, QuantizeSummary, QuantReport, AccuracyResult]:
    """`--max-drop` for ExecuTorch: quantize with PT2E, keeping the layers with the worst local error in float
    until the drop (measured on `open_runner(quantized program)`, the lowered artifact) is within budget; the
    program kept, its summary, its per-layer report and the result. `fp32_runner` runs the reference."""
    from kiln.compiler.quantization.accuracy import accuracy_aware
    from kiln.compiler.quantization.report import DEFAULT_REPORT_SAMPLES

    feeds = calibration.batches(inputs)[:DEFAULT_REPORT_SAMPLES]
    labels: dict[str, str] = {}
    kept: list[tuple[torch.export.ExportedProgram, torch.fx.GraphModule, QuantizeSummary]] = []

    def build(exclude: Sequence[str]) -> ModelRunner:
        kept[:] = [quantize_pt2e(program, calibration, inputs, dynamic, exclude)]
        return open_runner(kept[0][0])

    def ranking() -> list[str]:
        report = pt2e_report(program, kept[0][1], feeds, inputs, classes)
        labels.update({layer.name: layer.label for layer in report.layers})
        return [layer.name for layer in report.layers if layer.quantized]

    result = accuracy_aware(build, fp32_runner, calibration.batches(fp32_runner.inputs), budget, ranking, labels)
    quantized, converted, summary = kept[0]
    report = pt2e_report(program, converted, feeds, inputs, classes)
    report.summary.reverted = list(result.reverted_modules)
    return quantized, summary, report, result
