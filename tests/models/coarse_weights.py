"""Planted too-coarse weight quantizations of a text-generation export, which the quantized gate must reject
(tests/test_llm_quantization.py, benchmarks/bench_llm_quant.py): 2-bit weights (the real toolchains, asked for 2
bits instead of 4) and int4 with one scale for a whole matrix (per-tensor, written here on the ONNX graph)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np


@contextmanager
def two_bit_weights() -> Iterator[None]:
    """Every int4 export asks its toolchain for 2-bit weights in groups of 32 (MatMulNBits bits=2, NNCF INT2_SYM)."""
    from kiln.compiler.quantization.weight_only import WeightOnlySpec

    def planted(cls: type, precision: str, group_size: int | None = None, weights: str | None = None) -> Any:
        return cls(2, 32, True)

    with mock.patch.object(WeightOnlySpec, "for_precision", classmethod(planted)):
        yield


def per_tensor_int4(
    source: Path, destination: Path, spec: Any, keep_float: Sequence[str] = (), keep_8bit: Sequence[str] = ()
) -> Any:
    """In place of `quantize_onnx_weights`: every linear layer's weights rounded to 4 bits with one scale for the
    whole matrix, stored dequantized (float32), as a too-coarse quantizer would leave them."""
    import onnx
    from kiln.compiler.quantization.matmul_nbits import constant_matmuls
    from kiln.compiler.quantization.summary import QuantizeSummary
    from onnx import numpy_helper

    proto = onnx.load(str(source))
    names = set(constant_matmuls(proto))
    weights = {n.input[1] for n in proto.graph.node if n.name in names}
    for initializer in proto.graph.initializer:
        if initializer.name in weights:
            w = numpy_helper.to_array(initializer)
            scale = float(np.abs(w).max()) / 7 or 1.0
            rounded = (np.clip(np.round(w / scale), -8, 7) * scale).astype(np.float32)
            initializer.CopyFrom(numpy_helper.from_array(rounded, initializer.name))
    onnx.save(proto, str(destination))
    return QuantizeSummary("int4", "planted per-tensor int4", "weights-only", {"int8_layers": []})


@contextmanager
def per_tensor_onnx_weights() -> Iterator[None]:
    """The onnx target's weight-only quantizer replaced by `per_tensor_int4`."""
    with mock.patch("kiln.compiler.quantization.matmul_nbits.quantize_onnx_weights", per_tensor_int4):
        yield


def without_zero_points(quantize: Any) -> Any:
    """`quantize` (quantize_onnx_weights) followed by the planted bug: each MatMulNBits's zero-points input emptied,
    its initializer left behind (the graph stays valid; the kernel takes its default zero point)."""

    def planted(
        source: Path, destination: Path, spec: Any, keep_float: Sequence[str] = (), keep_8bit: Sequence[str] = ()
    ) -> Any:
        import onnx

        summary = quantize(source, destination, spec, keep_float, keep_8bit)
        proto = onnx.load(str(destination))
        dropped = 0
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits" and len(node.input) > 3 and node.input[3]:
                node.input[3] = ""
                dropped += 1
        assert dropped, "no MatMulNBits with zero points: plant this on --weights asym"
        onnx.save(proto, str(destination))
        return summary

    return planted


@contextmanager
def dropped_zero_points() -> Iterator[None]:
    """The onnx target's weight-only quantizer with `without_zero_points` planted after it."""
    from kiln.compiler.quantization import matmul_nbits

    planted = without_zero_points(matmul_nbits.quantize_onnx_weights)
    with mock.patch.object(matmul_nbits, "quantize_onnx_weights", planted):
        yield
