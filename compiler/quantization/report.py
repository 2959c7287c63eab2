"""Per-layer error of a quantized ONNX graph against its fp32 original, mapped to PyTorch module names.

Both graphs run on the same inputs with every float intermediate exposed. A layer is a compute node of
the quantized graph (not a QuantizeLinear/DequantizeLinear) whose output tensor has a name the fp32 graph
also has; what is compared is that tensor as the next layers see it (after its own Q/DQ, if any).
Two errors are measured per layer:

- total: the layer's output in the quantized graph, with every earlier layer quantized too;
- local: the same layer fed the *exact fp32* values of its inputs (through its own input Q/DQ), so it
  measures only what quantizing this one layer (its weights, its inputs' and output's ranges) costs.
  It is computed for every layer at once, in one extra run of a copy of the quantized graph whose
  compute nodes read fp32 tensors fed from the fp32 run. Layers are ranked by local SNR, worst first:
  unlike the total error, which only grows along the graph and so always blames the last layers,
  the local error points at the layer that loses the information, and reverting that layer to float
  removes it (the ranking does not change as layers are reverted, so one report ranks them all).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.metrics import ErrorSums
from kiln.compiler.quantization.qdq_graph import (
    FP32_FEED_SUFFIX,
    QdqGraph,
    float_tensors,
    load_onnx,
    local_model,
    module_of,
    session,
    with_outputs,
)
from kiln.compiler.types import Feeds, json_safe, non_finite_back

if TYPE_CHECKING:
    import torch

REPORT_FILE = "quant_report.json"
DEFAULT_REPORT_SAMPLES = 16


@dataclass
class LayerError:
    """How far one layer's output in the quantized graph is from fp32, in total and on its own (local)."""

    name: str  # the ONNX node name (the name `exclude` / nodes_to_exclude takes)
    op_type: str  # e.g. Conv, or Conv+Relu when the quantizer merged the fp32 Relu into the Conv
    tensor: str  # the output tensor compared (its fp32 name)
    module: str  # PyTorch module path, e.g. features.3 ("" for the root module, "?" when unknown)
    module_class: str = ""  # e.g. Conv2d
    merged: list[str] = field(default_factory=list)  # other modules folded into this node (BatchNorm, ReLU...)
    quantized: bool = True  # False when the node computes in float (excluded, or an op the quantizer leaves)
    cosine: float = 1.0
    snr_db: float = math.inf
    max_abs: float = 0.0
    local_cosine: float = 1.0
    local_snr_db: float = math.inf
    local_max_abs: float = 0.0

    @property
    def label(self) -> str:
        """The module as people know it, e.g. `features.3 (Conv2d) +features.4`."""
        text = self.module or "<root>"
        if self.module_class:
            text += f" ({self.module_class})"
        if self.merged:
            text += " +" + ",".join(self.merged)
        return text


@dataclass
class ReportSummary:
    """What a report covers: samples run, layers compared, and fp32 tensors the quantized graph lost."""

    samples: int
    layers: int
    quantized_layers: int
    not_compared: int  # fp32 tensors absent from the quantized graph (fused or renamed by the quantizer)
    ranked_by: str = "local SNR (dB), lowest first"
    output_snr_db: float = math.inf  # worst total SNR among the graph's outputs
    reverted: list[str] = field(default_factory=list)  # --max-drop: labels of layers kept in float


@dataclass
class QuantReport:
    """The per-layer error report of one quantized artifact, worst layer first; `quant_report.json`."""

    layers: list[LayerError]
    summary: ReportSummary

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """JSON-ready form (non-finite floats as strings), each layer with its `label`; the `top` worst only."""
        layers = [asdict(layer) | {"label": layer.label} for layer in self.layers[: top or None]]
        return json_safe({"layers": layers, "summary": asdict(self.summary)})  # type: ignore[no-any-return]

    def write(self, directory: Path) -> Path:
        """Write `quant_report.json` into `directory`."""
        path = Path(directory) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> QuantReport:
        """Read `quant_report.json` from an export directory (UsageError if it has none)."""
        path = Path(directory) / REPORT_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise not_quantized(directory) from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}", "re-export the model") from None
        known = set(LayerError.__dataclass_fields__)
        layers = [LayerError(**{k: v for k, v in non_finite_back(row).items() if k in known}) for row in data["layers"]]
        return cls(layers, ReportSummary(**non_finite_back(data["summary"])))

    def table(self, top: int | None = None) -> str:
        """The layers as a text table, worst first (the first `top` only when given)."""
        rows = self.layers[:top] if top else self.layers
        width = max([len("layer (PyTorch module)"), *(len(r.label) for r in rows)])
        node_width = max([4, *(len(r.name) for r in rows)])
        head = (
            f"{'#':>3}  {'layer (PyTorch module)':<{width}}  {'node':<{node_width}}  {'op':<12} "
            f"{'local SNR':>9} {'SNR dB':>7} {'cosine':>8} {'max abs':>9}"
        )
        lines = [head]
        for rank, r in enumerate(rows, 1):
            float_mark = "" if r.quantized else "  (float)"
            lines.append(
                f"{rank:>3}  {r.label:<{width}}  {r.name:<{node_width}}  {r.op_type:<12} "
                f"{_db(r.local_snr_db):>9} {_db(r.snr_db):>7} {r.cosine:>8.5f} {r.max_abs:>9.3g}{float_mark}"
            )
        s = self.summary
        lines.append(
            f"{s.layers} layers ({s.quantized_layers} quantized) compared on {s.samples} samples, "
            f"ranked by {s.ranked_by}; worst output SNR {_db(s.output_snr_db)} dB"
            + (f"; {s.not_compared} fp32 tensors fused away by the quantizer" if s.not_compared else "")
            + (f"; kept in float by --max-drop: {', '.join(s.reverted)}" if s.reverted else "")
        )
        return "\n".join(lines)


def not_quantized(directory: Path | str) -> UsageError:
    """The error for an export that has no per-layer quantization report."""
    return UsageError(
        f"{directory} is not a quantized export: it has no {REPORT_FILE}",
        "export with --precision int8 to get a per-layer report",
    )


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.1f}"


def layer_errors(
    fp32_onnx: Path,
    quantized_onnx: Path,
    feeds: list[Feeds],
    module_classes: dict[str, str] | None = None,
) -> list[LayerError]:
    """Per-layer error of `quantized_onnx` against `fp32_onnx` on `feeds`, worst (lowest local SNR) first.

    `module_classes` (module path -> class name, see `module_classes`) names modules the ONNX metadata
    lost (a Conv folded with its BatchNorm carries only the BatchNorm's scope).
    """
    return _compare(Path(fp32_onnx), Path(quantized_onnx), feeds, module_classes or {})[0]


def quant_report(
    fp32_onnx: Path,
    quantized_onnx: Path,
    feeds: list[Feeds],
    module_classes: dict[str, str] | None = None,
) -> QuantReport:
    """The per-layer report (layers worst first and a summary) of a quantized graph against fp32."""
    layers, missing, output_snr = _compare(Path(fp32_onnx), Path(quantized_onnx), feeds, module_classes or {})
    summary = ReportSummary(
        samples=len(feeds),
        layers=len(layers),
        quantized_layers=sum(1 for layer in layers if layer.quantized),
        not_compared=missing,
        output_snr_db=output_snr,
    )
    return QuantReport(layers, summary)


def write_quant_report(
    directory: Path,
    fp32_onnx: Path,
    quantized_onnx: Path,
    feeds: list[Feeds],
    module_classes: dict[str, str] | None = None,
    reverted: list[str] | None = None,
) -> QuantReport:
    """Compute the per-layer report on (at most 16 of) `feeds` and write it as `quant_report.json` in `directory`.

    `reverted`: labels of the layers `--max-drop` kept in float, recorded in the summary.
    """
    report = quant_report(fp32_onnx, quantized_onnx, feeds[:DEFAULT_REPORT_SAMPLES], module_classes)
    report.summary.reverted = list(reverted or [])
    report.write(directory)
    return report


def module_classes(exported: torch.export.ExportedProgram | None) -> dict[str, str]:
    """Module path -> class name (e.g. `features.0` -> `Conv2d`) from a `torch.export` program's module stacks."""
    classes: dict[str, str] = {}
    if exported is None:
        return classes
    for node in exported.graph.nodes:
        for path, class_name in (node.meta.get("nn_module_stack") or {}).values():
            classes[str(path)] = str(class_name).rsplit(".", 1)[-1]
    return classes


def _compare(
    fp32_onnx: Path, quantized_onnx: Path, feeds: list[Feeds], classes: dict[str, str]
) -> tuple[list[LayerError], int, float]:
    """Layers worst first, the number of fp32 tensors the quantized graph lacks, and the worst output SNR."""
    if not feeds:
        raise UsageError("the per-layer quantization report needs at least one input sample", "give calibration data")
    fp32_model, q_model = load_onnx(fp32_onnx), load_onnx(quantized_onnx)
    fp32, q = QdqGraph.of(fp32_model), QdqGraph.of(q_model)
    fp32_floats = float_tensors(fp32_model)
    fp32_floats.update({i.name: i.type.tensor_type.elem_type for i in fp32_model.graph.input if i.name in fp32.inputs})
    compared = {
        name: q.visible(name)
        for name in fp32_floats
        if name in fp32.producer and (name in q.producer or name in q.consumers)
    }
    compared = {name: seen for name, seen in compared.items() if q.compute_producer(name) is not None}
    visible = {seen: fp32_floats[name] for name, seen in compared.items()}
    total = {name: ErrorSums() for name in compared}
    local = {name: ErrorSums() for name in compared}
    with tempfile.TemporaryDirectory(prefix="kiln-quant-report-") as work:
        fp32_run = session(with_outputs(fp32_model, fp32_floats), Path(work), "fp32")
        q_run = session(with_outputs(q_model, visible), Path(work), "quantized")
        alone_model, fed = local_model(q, fp32_floats, visible)
        local_run = session(alone_model, Path(work), "local")
        fp32_names = [o.name for o in fp32_run.get_outputs()]
        q_names = [o.name for o in q_run.get_outputs()]
        local_names = [o.name for o in local_run.get_outputs()]
        local_inputs = {i.name for i in local_run.get_inputs()}
        for feed in feeds:
            reference = dict(zip(fp32_names, fp32_run.run(None, feed)))
            reference.update(feed)
            quantized = dict(zip(q_names, q_run.run(None, feed)))
            local_feed = {k: v for k, v in feed.items() if k in local_inputs}
            local_feed.update({n + FP32_FEED_SUFFIX: reference[n] for n in fed})
            alone = dict(zip(local_names, local_run.run(None, local_feed)))
            for name, seen in compared.items():
                total[name].add(quantized[seen], reference[name])
                local[name].add(alone[seen], reference[name])
    layers = [_layer(name, fp32, q, classes, total[name], local[name]) for name in compared]
    layers.sort(key=lambda layer: (layer.local_snr_db, layer.snr_db))
    outputs = [total[o.name].snr_db for o in fp32_model.graph.output if o.name in total]
    missing = sum(1 for name in fp32_floats if name in fp32.producer and name not in compared)
    return layers, missing, min(outputs, default=math.inf)


def _layer(
    name: str, fp32: QdqGraph, q: QdqGraph, classes: dict[str, str], total: ErrorSums, local: ErrorSums
) -> LayerError:
    """The LayerError of the layer computing fp32 tensor `name`, with its PyTorch module."""
    computer = q.compute_producer(name)
    assert computer is not None
    fp32_node = fp32.producer[name]
    node = next((n for n in fp32.model.graph.node if n.name == computer.name), fp32_node)
    op_type = computer.op_type if node is fp32_node else f"{computer.op_type}+{fp32_node.op_type}"
    module, module_class, merged = module_of(node, fp32.constants, classes)
    if node is not fp32_node:
        extra, _, _ = module_of(fp32_node, fp32.constants, classes)
        if extra not in (module, *merged):
            merged.append(extra)
    return LayerError(
        name=computer.name,
        op_type=op_type,
        tensor=name,
        module=module,
        module_class=module_class,
        merged=merged,
        quantized=q.is_quantized(computer),
        cosine=total.cosine,
        snr_db=total.snr_db,
        max_abs=total.max_abs,
        local_cosine=local.cosine,
        local_snr_db=local.snr_db,
        local_max_abs=local.max_abs,
    )
