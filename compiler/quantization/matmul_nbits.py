"""The weight-only int8/int4 of text-generation exports for ONNX Runtime: each linear layer's weights as
MatMulNBits blocks (`quantize_onnx_weights`), written one layer at a time; the layers `--max-drop` may keep apart,
ranked by how their weights round (`rank_by_weight_error`). See kiln.compiler.quantization.weight_only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.quantization.summary import QuantizeSummary

if TYPE_CHECKING:
    import onnx
    from kiln.compiler.quantization.weight_only import WeightOnlySpec


# MatMulNBits' accuracy level 4: activations quantized to int8 per block inside the kernel, int8 dot products. Measured
# on this CPU (a 29M-parameter Llama, decode step at context 128): 8-bit weights at level 0 (float compute) ran
# 2x slower than fp32 (the kernel dequantizes the weights on every call), at level 4 several times faster; 4-bit
# level 0 and 4 ran alike. Level 4's logits were as close to fp32 (cosine 0.9994 vs 0.9996 at 8 bits).
MATMUL_NBITS_ACCURACY_LEVEL = 4


def quantize_onnx_weights(
    source: Path,
    destination: Path,
    spec: WeightOnlySpec,
    keep_float: Sequence[str] = (),
    keep_8bit: Sequence[str] = (),
) -> QuantizeSummary:
    """Write the ONNX file `source` to `destination` with the weights of its MatMuls in `spec.bits` bits as ONNX
    Runtime's MatMulNBits (blocks of `spec.group_size` along the input, symmetric or with zero points; the blocks
    made by ONNX Runtime's own kernels, as its MatMulNBitsQuantizer makes them); on a 4-bit spec the LM head (the
    MatMul nearest the `logits` output) and the nodes `keep_8bit` in 8 bits; the nodes `keep_float` left in float.

    One layer at a time: each weight is read alone from `source`'s external data, quantized and appended to
    `destination`'s (the weights no MatMulNBits replaces are copied in chunks), so that memory holds one layer's
    weights and the graph, not the model (MatMulNBitsQuantizer loads the whole model and builds the new one beside
    it: about 2x a 3B decoder's 12 GB). `destination` is self-contained when its weights come to at most
    EXTERNAL_DATA_BYTES, else its weights are in `destination.name + '.data'`. See
    kiln.compiler.quantization.weight_only."""
    import onnx
    import onnxruntime

    start = time.perf_counter()
    proto = onnx.load(str(source), load_external_data=False)
    nodes_before = len(proto.graph.node)
    weighted = constant_matmuls(proto)
    unknown = [name for name in (*keep_float, *keep_8bit) if name not in weighted]
    if unknown:
        raise UsageError(f"cannot keep {', '.join(unknown[:3])} apart: no MatMul of that name with constant weights")
    head = lm_head(proto, weighted)
    low_bits = spec.bits < spec.head_bits
    apart = {*keep_float, *keep_8bit, *([head] if head and low_bits else [])}
    bits_of = {name: spec.head_bits if name in apart else spec.bits for name in weighted if name not in keep_float}
    _write_quantized(proto, source.parent, destination, spec, bits_of)
    eight = [name for name, bits in bits_of.items() if low_bits and bits == spec.head_bits]
    settings = {
        **spec.to_dict(),
        "operator": "MatMulNBits",
        "accuracy_level": MATMUL_NBITS_ACCURACY_LEVEL,
        "lm_head": head,
        "int8_layers": eight,
        "embeddings": "float32 (ONNX Runtime's quantizer quantizes an embedding Gather only to 4 bits)",
    }
    return QuantizeSummary(
        precision=spec.precision,
        tool=f"onnxruntime {onnxruntime.__version__} MatMulNBits blocks, one layer at a time",
        method="weights-only",
        settings=settings,
        nodes_before=nodes_before,
        nodes_after=len(proto.graph.node),
        quantized=len(bits_of),
        kept_float=tuple(keep_float),
        excluded=tuple(keep_float),
        seconds=round(time.perf_counter() - start, 3),
    )


def _write_quantized(
    proto: onnx.ModelProto, directory: Path, destination: Path, spec: WeightOnlySpec, bits_of: dict[str, int]
) -> None:
    """`proto` (read from `directory` without its data) rewritten in place with the MatMuls `bits_of` names as
    MatMulNBits of those bits, and saved to `destination`: the new weights and the ones still read written to its
    data file as they come, then pulled back into the protobuf when they come to at most EXTERNAL_DATA_BYTES."""
    import onnx
    from kiln.compiler.large_graphs import EXTERNAL_DATA_BYTES, ExternalDataWriter

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    writer = ExternalDataWriter(destination.parent, destination.name + ".data")
    try:
        made: dict[tuple[str, int], list[Any]] = {}  # (weight, bits): its tensors, made once if MatMuls share it
        nodes = []
        for node in proto.graph.node:
            bits = bits_of.get(node.name)
            if bits is None:
                nodes.append(node)
                continue
            weight = initializers[node.input[1]]
            node_made, arrays = _matmul_nbits(node, weight, directory, spec, bits, (weight.name, bits) in made)
            nodes.append(node_made)
            made.setdefault((weight.name, bits), [writer.add(name, array) for name, array in arrays.items()])
        read = _inputs_read(nodes) | {output.name for output in proto.graph.output}
        kept = [writer.copy(tensor, directory) for tensor in proto.graph.initializer if tensor.name in read]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend([*kept, *(tensor for tensors in made.values() for tensor in tensors)])
        inputs = [value for value in proto.graph.input if value.name not in initializers or value.name in read]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        if not any(opset.domain == "com.microsoft" for opset in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        written = writer.close()
    except BaseException:
        writer.discard()
        raise
    if 0 < written <= EXTERNAL_DATA_BYTES:  # small enough for one file: the data pulled back into the protobuf
        onnx.load_external_data_for_model(proto, str(destination.parent))
        _save_replacing(proto, destination)
        (destination.parent / writer.name).unlink()
    else:
        _save_replacing(proto, destination)


def _matmul_nbits(
    node: onnx.NodeProto, weight: onnx.TensorProto, directory: Path, spec: WeightOnlySpec, bits: int, made: bool
) -> tuple[onnx.NodeProto, dict[str, Any]]:
    """The MatMulNBits node replacing the MatMul `node`, and its new initializers' arrays by name (packed blocks,
    scales, zero points when asymmetric), named as ONNX Runtime's MatMulNBitsQuantizer names them; `weight`
    ([K, N], float) read alone from the file's data in `directory`; no arrays when they were `made` for another
    node."""
    import numpy as np
    import onnx
    from kiln.compiler.large_graphs import read_initializer
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    k, n = weight.dims
    names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales"]
    names += [] if spec.symmetric else [f"{weight.name}_zero_points"]
    arrays = {}
    if not made:
        w = np.ascontiguousarray(read_initializer(weight, directory), dtype=np.float32)
        config = DefaultWeightOnlyQuantConfig(block_size=spec.group_size, is_symmetric=spec.symmetric, bits=bits)
        arrays = dict(zip(names, DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)))
    node_made = onnx.helper.make_node(
        "MatMulNBits",
        inputs=[node.input[0], *names],
        outputs=[node.output[0]],
        name=f"{node.name}_Q{bits}" if node.name else "",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=spec.group_size,
        accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL,
    )
    return node_made, arrays


def _inputs_read(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Every value name the nodes (and the graphs in their attributes: If, Loop, Scan) read."""
    read: set[str] = set()
    for node in nodes:
        read.update(node.input)
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                read |= _inputs_read(graph.node) | {output.name for output in graph.output}
    return read


def _save_replacing(proto: onnx.ModelProto, destination: Path) -> None:
    """`onnx.save` under a temporary name, renamed over `destination` (a session still reading the old file reads
    on)."""
    import onnx

    partial = destination.with_name(f".{destination.name}.partial")
    onnx.save(proto, str(partial))
    partial.replace(destination)


def constant_matmuls(proto: onnx.ModelProto) -> list[str]:
    """The names of the MatMuls whose second input is a 2-D initializer (the linear layers), in graph order."""
    shapes = {i.name: len(i.dims) for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and shapes.get(n.input[1]) == 2]


def lm_head(proto: onnx.ModelProto, weighted: Sequence[str], output: str = "logits") -> str | None:
    """The MatMul nearest the `output` graph output walking back through its producers (the LM head, behind a
    soft-cap or a scale if the model has one), or None."""
    producer = {name: node for node in proto.graph.node for name in node.output}
    constants, wanted = {i.name for i in proto.graph.initializer}, set(weighted)
    frontier, seen = [output], set()
    while frontier:
        node = producer.get(frontier.pop(0))
        if node is None or node.name in seen:
            continue
        if node.name in wanted:
            return str(node.name)
        seen.add(node.name)
        frontier += [name for name in node.input if name and name not in constants]
    return None


def rank_by_weight_error(source: Path, spec: WeightOnlySpec, names: Sequence[str]) -> list[str]:
    """The MatMuls `names` ordered by the relative error their weights take when rounded as `spec` says
    (|W - Q(W)| / |W|, round-to-nearest per group of `spec.group_size` input channels), the largest first: the
    candidates `--max-drop` keeps apart (in 8 bits or in float) first. A weight-only proxy of sensitivity: it needs
    no activations, and a layer whose weights round worst (outliers in a group) loses the most. The MatMuls of the
    ONNX file `source`, their weights read one at a time."""
    import numpy as np
    import onnx
    from kiln.compiler.large_graphs import read_initializer

    proto = onnx.load(str(source), load_external_data=False)
    weights = {i.name: i for i in proto.graph.initializer}
    by_node = {n.name: n.input[1] for n in proto.graph.node if n.name in set(names)}
    errors = {}
    for name, weight in by_node.items():
        w = read_initializer(weights[weight], source.parent).astype(np.float64)  # [in, out]
        pad = -w.shape[0] % spec.group_size
        groups = np.pad(w, ((0, pad), (0, 0))).reshape(-1, spec.group_size, w.shape[1])
        levels = 2**spec.bits - 1
        if spec.symmetric:
            scale = np.max(np.abs(groups), axis=1, keepdims=True) / (levels // 2)
            low = np.zeros_like(scale)
        else:
            low = np.min(groups, axis=1, keepdims=True)
            scale = (np.max(groups, axis=1, keepdims=True) - low) / levels
        scale = np.where(scale == 0, 1.0, scale)
        rounded = np.round((groups - low) / scale) * scale + low
        errors[name] = float(np.linalg.norm(rounded - groups)) / max(float(np.linalg.norm(groups)), 1e-30)
    return sorted(errors, key=lambda n: -errors[n])
