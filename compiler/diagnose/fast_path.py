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

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from kiln.compiler.diagnose.probe import NotBuilt, Probe, build_program
from kiln.compiler.errors import error_text
from kiln.compiler.onnx_metadata import name_scopes

if TYPE_CHECKING:
    from kiln.compiler.diagnose.cut import Boundary
    from kiln.compiler.diagnose.divergence_record import ModuleError
    from kiln.compiler.types import OutputMetrics, Tolerance
    from kiln.targets.base import Target


def supported(target: Target, io_layout: str | None) -> bool:
    """Whether `target` has a fast path: it can be tapped (`Target.tappable`), and not for NHWC I/O, whose
    boundaries are in another layout."""
    return target.tappable and io_layout != "nhwc"


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
        scopes = name_scopes(node) if node is not None else []
        if scopes and scopes[-1] == boundary.node and boundary.module in scopes:
            found[boundary.index] = boundary.node
    return found


def read_boundaries(probe: Probe, bounds: list[Boundary]) -> dict[int, ModuleError] | None:
    """Every boundary the runtime can expose with a certain mapping, measured from one build of the whole model
    (this module); None when the target has no fast path or it cannot be used."""
    from kiln.compiler.diagnose.cut import intermediates
    from kiln.compiler.diagnose.divergence_record import ModuleError

    layout = probe.recipe.request.io_layout
    if not bounds or not supported(probe.target, layout):
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
        runs = probe.target.tapped_runs(artifact.directory, artifact.manifest, names, probe.samples.inputs)
    except Exception as refused:  # a runtime that refuses the extra outputs: the bisection still answers
        why = error_text(refused, 120)
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
