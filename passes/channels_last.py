"""Layout: the NCHW -> NHWC I/O conversion of the ONNX graph (`--io nhwc`) and how to count its Transposes.

Transpose sinking (the registered `transpose-sinking` pass, -O2) is `kiln.passes.transpose_sinking`.

`to_nhwc` is not a registered pass because it changes the graph's signature: image inputs and
outputs become channels-last behind a Transpose at the boundary, which sinking then moves and
cancels as far as standard ONNX allows. Standard ONNX Conv, pooling and normalization are
NCHW-only, so an ONNX graph fed NHWC images keeps at least one Transpose per image input that
reaches such an op; `LayoutCounts` says how many are left against what a naive conversion leaves.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.image_layout import NCHW_TO_NHWC, NHWC_TO_NCHW
from kiln.compiler.large_graphs import load_ir, save_onnx
from kiln.passes.base import ONNX, PassResult
from kiln.passes.graphs import count_nodes, fresh_name, names_in, permuted_shape
from kiln.passes.transpose_sinking import sink_transposes

if TYPE_CHECKING:
    import onnx_ir as ir
    from kiln.compiler.types import PassRecord

NHWC_STEP = "nhwc-layout"  # the name of the layout step in a manifest's passes (a build-time step, not in PASSES)

# ONNX ops whose data layout the operator fixes to channels-first (axis 1 is C): a graph made NHWC
# inside needs a Transpose before and after each of them.
ONNX_CHANNELS_FIRST_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "DeformConv",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "MaxUnpool",
        "MaxRoiPool",
        "RoiAlign",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "LRN",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
# TFLite ops whose data layout the operator fixes to channels-last.
TFLITE_CHANNELS_LAST_OPS = frozenset(
    {
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "TRANSPOSE_CONV",
        "CONV_3D",
        "CONV_3D_TRANSPOSE",
        "MAX_POOL_2D",
        "AVERAGE_POOL_2D",
        "L2_POOL_2D",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "DEPTH_TO_SPACE",
        "SPACE_TO_DEPTH",
        "BATCH_TO_SPACE_ND",
        "SPACE_TO_BATCH_ND",
    }
)


@dataclass(frozen=True)
class LayoutCounts:
    """Transposes of an NHWC artifact: what a naive conversion leaves, and what is left inside the artifact.

    The naive conversion is the per-op one converters emit before optimizing (tf2onnx, onnx2tf, the
    TFLite converter's legalization): a Transpose per image input or output converted at the boundary
    (`boundary`), a Transpose before and after each op whose layout the operator set fixes to the
    other one (`fixed_layout_ops`: Conv, pooling... in ONNX, which are NCHW; CONV_2D, pooling,
    resizes... in TFLite, which are NHWC), and the model's own Transposes (`model_transposes`). So
    `transposes_before = model_transposes + boundary + 2 * fixed_layout_ops`; `transposes_after` is
    the number of Transpose ops in the artifact's graph.
    """

    boundary: int
    fixed_layout_ops: int
    model_transposes: int
    transposes_after: int

    @property
    def transposes_before(self) -> int:
        """Transposes a naive per-op conversion leaves (see the class docstring)."""
        return self.model_transposes + self.boundary + 2 * self.fixed_layout_ops

    def to_info(self) -> dict[str, Any]:
        """The manifest's `target_info["layout"]`."""
        return {
            "io": "nhwc",
            "transposes_before": self.transposes_before,
            "transposes_after": self.transposes_after,
            "boundary_transposes": self.boundary,
            "fixed_layout_ops": self.fixed_layout_ops,
            "model_transposes": self.model_transposes,
        }


def count_ops(model: ir.Model, op_types: Collection[str]) -> int:
    """Nodes of the main graph whose (default-domain) op type is in `op_types`."""
    return sum(1 for node in model.graph if node.domain in ("", "ai.onnx") and node.op_type in op_types)


def image_values(model: ir.Model) -> tuple[list[str], list[str]]:
    """Names of the 4-d floating-point graph inputs and outputs (the tensors `--io nhwc` makes channels-last)."""
    import onnx_ir as ir

    floats = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}

    def is_image(value: ir.Value) -> bool:
        return value.shape is not None and len(value.shape) == 4 and value.dtype in floats

    return [str(v.name) for v in model.graph.inputs if is_image(v)], [
        str(v.name) for v in model.graph.outputs if is_image(v)
    ]


def to_nhwc(model: ir.Model, inputs: Iterable[str] | None = None, outputs: Iterable[str] | None = None) -> PassResult:
    """Make the named 4-d graph inputs and outputs NHWC (default: every 4-d float one), keeping their names.

    A Transpose to NCHW follows each converted input and one to NHWC precedes each converted output;
    transpose sinking then moves them into the graph and cancels what it can. Changes the signature.
    """
    import onnx_ir as ir

    default_inputs, default_outputs = image_values(model)
    input_names = set(default_inputs if inputs is None else inputs)
    output_names = set(default_outputs if outputs is None else outputs)
    graph = model.graph
    taken = names_in(model)
    changed = False
    for index, old in enumerate(list(graph.inputs)):
        if old.name not in input_names or old.shape is None or len(old.shape) != 4:
            continue
        name = str(old.name)
        nhwc = ir.val(name, shape=permuted_shape(old.shape, NCHW_TO_NHWC), type=old.type)
        transpose = ir.node(
            "Transpose", [nhwc], {"perm": list(NHWC_TO_NCHW)}, name=fresh_name(f"{name}_to_nchw", taken)
        )
        nchw = transpose.outputs[0]
        nchw.name, nchw.shape, nchw.type = fresh_name(f"{name}_nchw", taken), old.shape, old.type
        old.replace_all_uses_with(nchw, replace_graph_outputs=True)
        graph.inputs[index] = nhwc
        first = next(iter(graph), None)
        if first is None:
            graph.append(transpose)
        else:
            graph.insert_before(first, transpose)
        changed = True
    for index, old in enumerate(list(graph.outputs)):
        if old.name not in output_names or old.shape is None or len(old.shape) != 4:
            continue
        name = str(old.name)
        old.name = fresh_name(f"{name}_nchw", taken)
        transpose = ir.node("Transpose", [old], {"perm": list(NCHW_TO_NHWC)}, name=fresh_name(f"{name}_to_nhwc", taken))
        result = transpose.outputs[0]
        result.name, result.shape, result.type = name, permuted_shape(old.shape, NCHW_TO_NHWC), old.type
        graph.append(transpose)
        graph.outputs[index] = result
        changed = True
    sunk = sink_transposes(model)
    return PassResult(sunk.graph, changed or sunk.changed)


def nhwc_onnx_file(
    source: Path, destination: Path, inputs: Collection[str], outputs: Collection[str]
) -> tuple[LayoutCounts, PassRecord]:
    """Write the ONNX file `source` to `destination` with the named image inputs and outputs made NHWC
    (`to_nhwc`); the transposes before and after, and the layout step as a pass record."""
    from kiln.compiler.types import PassRecord

    model = load_ir(source)
    nodes_before, own = count_nodes(model), count_ops(model, {"Transpose"})
    fixed = count_ops(model, ONNX_CHANNELS_FIRST_OPS)
    started = time.perf_counter()
    result = to_nhwc(model, inputs, outputs)
    seconds = round(time.perf_counter() - started, 4)
    save_onnx(result.graph, destination)
    counts = LayoutCounts(len(inputs) + len(outputs), fixed, own, count_ops(result.graph, {"Transpose"}))
    record = PassRecord(NHWC_STEP, result.changed, nodes_before, count_nodes(result.graph), seconds, ONNX)
    return counts, record
