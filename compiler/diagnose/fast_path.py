"""Localization in one build, where the runtime can expose intermediate tensors (ONNX Runtime, OpenVINO).

The whole model is built once (same target, precision, passes and calibration) and each module boundary's
tensor is added as an extra output of the built graph: an extra graph output of the ONNX model for ONNX
Runtime, an extra output of the `ov.Model` before it is compiled for OpenVINO. A boundary is tapped only when
its mapping is certain: the ONNX value is named after the boundary's FX node and the node producing it carries
the dynamo exporter's `pkg.torch.onnx.name_scopes`, ending with that FX node and containing the module. In an
int8 graph the value the next layer reads is tapped: the DequantizeLinear after the value's QuantizeLinear (QDQ), the
FakeQuantize after it (OpenVINO): a tensor whose quantization loses channels is the boundary where they are lost.
`divergence.localize` uses the answer only when every boundary up to the first failing one is tapped,
and bisects otherwise.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kiln.compiler.diagnose.cut import Boundary
    from kiln.compiler.diagnose.divergence import ModuleError, Probe
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.parity.gate import Feeds
    from kiln.compiler.types import OutputMetrics, Tolerance

FAST_TARGETS = ("onnx", "openvino")
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
FAKE_QUANTIZED = "::fake_quantized"  # the name a tapped FakeQuantize output is given (OpenVINO int8)


def supported(target: str, io_layout: str | None) -> bool:
    """Whether `target` has a fast path (not for NHWC I/O, whose boundaries are in another layout)."""
    return target in FAST_TARGETS and io_layout != "nhwc"


def certain_names(onnx_path: Path, bounds: list[Boundary], outputs: dict[str, int]) -> dict[int, str]:
    """Boundary index -> ONNX value name, for the boundaries whose value in `onnx_path` is certainly theirs;
    `outputs`: the FX nodes that are the program's outputs, by position (the graph's output of that position)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    producers = {value: node for node in model.graph.node for value in node.output}
    graph_outputs = [o.name for o in model.graph.output]
    found = {}
    for boundary in bounds:
        position = outputs.get(boundary.node)
        if position is not None and position < len(graph_outputs):
            found[boundary.index] = graph_outputs[position]
            continue
        node = producers.get(boundary.node)
        scopes = _name_scopes(node) if node is not None else []
        if scopes and scopes[-1] == boundary.node and boundary.module in scopes:
            found[boundary.index] = boundary.node
    return found


def _name_scopes(node: Any) -> list[str]:
    text = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), "")
    try:
        scopes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in scopes] if isinstance(scopes, list) else []


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


def tapped_runs(artifact: Artifact, names: dict[int, str], inputs: list[Feeds]) -> list[dict[int, np.ndarray]]:
    """Run the built artifact with the boundaries' tensors as extra outputs: per input set, boundary index ->
    the runtime's value (boundaries the runtime cannot expose are left out)."""
    if artifact.target == "onnx":
        return _onnxruntime_taps(artifact.directory / "model.onnx", names, inputs)
    return _openvino_taps(artifact, names, inputs)


def _onnxruntime_taps(path: Path, names: dict[int, str], inputs: list[Feeds]) -> list[dict[int, np.ndarray]]:
    import onnx
    import onnxruntime as ort

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
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = list(dict.fromkeys(taps.values()))
    runs = []
    for feeds in inputs:
        values = dict(zip(wanted, session.run(wanted, feeds)))
        runs.append({index: values[name] for index, name in taps.items()})
    return runs


def _openvino_taps(artifact: Artifact, names: dict[int, str], inputs: list[Feeds]) -> list[dict[int, np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(artifact.directory / "model.xml"))
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
    compiled = core.compile_model(model, "CPU", dict(artifact.manifest.runtime_config))
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


def read_boundaries(probe: Probe, bounds: list[Boundary]) -> dict[int, ModuleError] | None:
    """Every boundary the runtime can expose with a certain mapping, measured from one build of the whole model
    (this module); None when the target has no fast path or it cannot be used."""
    from kiln.compiler.diagnose.cut import intermediates
    from kiln.compiler.diagnose.divergence import ModuleError, NotBuilt, build_program

    layout = probe.recipe.request.io_layout
    if not bounds or not supported(probe.target.name, layout):
        return None
    if probe.route is not None and probe.route.consumes != "onnx":
        return None  # the module boundaries are mapped through the ONNX graph the target built from
    started = time.perf_counter()
    try:
        artifact, onnx_graph = build_program(probe, probe.captured, probe.work / "whole")
    except NotBuilt:
        return None  # the bisection names the module whose addition breaks conversion
    finally:
        probe.builds += 1
    # the mapping is read from the ONNX graph the target built from (its quantizers keep value names, not always
    # the exporter's metadata); a name the built graph does not have is not tapped
    assert probe.captured.exported is not None
    returned = next(n for n in probe.captured.exported.graph.nodes if n.op == "output").args[0]
    outputs = {getattr(node, "name", ""): position for position, node in enumerate(returned)}
    names = certain_names(onnx_graph, bounds, outputs) if onnx_graph and onnx_graph.is_file() else {}
    if not names:
        return None
    try:
        runs = tapped_runs(artifact, names, probe.samples.inputs)
    except Exception as refused:  # a runtime that refuses the extra outputs: the bisection still answers
        why = f"{type(refused).__name__}: {str(refused)[:120]}"
        probe.progress.say(f"localize: fast path not usable ({why}); bisecting")
        return None
    program, nodes = probe.captured.exported, [bounds[i].node for i in names]
    values = [intermediates(program, nodes, feeds, probe.reference) for feeds in probe.samples.inputs]
    reference = [{i: value[bounds[i].node] for i in names} for value in values]
    tolerance = probe.recipe.thresholds.tolerance(artifact.manifest.precision)
    found = {}
    for index, metrics in judge_taps(runs, reference, tolerance).items():
        error = ModuleError.at(bounds[index])
        error.take(metrics)
        found[index] = error
    probe.progress.say(
        f"localize {probe.target.name} build {probe.builds}: fast path, {len(found)} of {len(bounds)} module "
        f"boundaries read from the runtime ({time.perf_counter() - started:.1f}s)"
    )
    return found


def judge_taps(
    runs: list[dict[int, np.ndarray]], reference: list[dict[int, np.ndarray]], tolerance: Tolerance
) -> dict[int, OutputMetrics]:
    """Each tapped boundary's metrics against PyTorch's value, judged as the bisection judges a prefix."""
    from kiln.compiler.parity.gate import compare

    indices = sorted(set(runs[0]) & set(reference[0])) if runs else []
    # a tensor of another shape than PyTorch's is not certainly that boundary's: not judged
    indices = [i for i in indices if all(np.shape(r[i]) == np.shape(e[i]) for r, e in zip(runs, reference))]
    actual = [{str(i): run[i] for i in indices} for run in runs]
    expected = [{str(i): ref[i] for i in indices} for ref in reference]
    if not indices:
        return {}
    return {int(m.name): m for m in compare(actual, expected, tolerance)}
