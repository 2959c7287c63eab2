"""LiteRT (TFLite) quantization with ai-edge-quantizer: fp16 weights, dynamic-range int8 (int8 weights, float
I/O) or calibrated full-integer int8 (int8 I/O), on a float32 `.tflite` that targets/litert.py converted.

Calibration: activation ranges are the min and max over every calibration sample (ai-edge-quantizer has no
other activation calibration), weights are symmetric int8 (TFLite kernels take no other), per channel or per
tensor as the spec says, and activations asymmetric unless the spec asks for symmetric ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.quantization.summary import QuantizeSummary

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.quantization.calibration import CalibrationData, CalibrationSpec
    from kiln.compiler.quantization.weight_only import WeightOnlySpec
    from kiln.compiler.types import TensorSpec

SIGNATURE = "serving_default"  # the signature litert_torch writes, and the one calibration feeds
CALIBRATION_THREADS = 2
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")
TFLITE_PRECISIONS = ("fp16", "int8-dynamic", "int8")
_METHODS = {"fp16": "float16", "int8-dynamic": "weights-only", "int8": "minmax"}


def quantize_tflite(
    source: Path,
    destination: Path,
    precision: str,
    calibration: CalibrationData | None,
    inputs: Sequence[TensorSpec] = (),
) -> QuantizeSummary:
    """Write the float32 `.tflite` `source` at `precision` to `destination`: fp16 weights, int8-dynamic (int8
    weights) or int8 (full integer, calibrated on `calibration` with its spec's per-channel weights and
    symmetric activations). `inputs` are the `.tflite`'s input specs (channels-last where the artifact's I/O
    is): int8 calibration rows are put in that layout and batched at their batch size. The summary's
    settings are, for int8, what ai-edge-quantizer could do of the spec (`static_int8_settings`)."""
    from importlib.metadata import version

    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

    if precision not in TFLITE_PRECISIONS:
        raise UsageError(f"LiteRT quantization has no precision {precision}", f"use one of {', '.join(_METHODS)}")
    start = time.perf_counter()
    engine = quantizer.Quantizer(str(source))
    used: dict[str, Any] = {}
    if precision == "fp16":
        for op in WEIGHT_OPS:
            engine.add_weight_only_config(
                regex=".*",
                operation_name=getattr(qtyping.TFLOperationName, op),
                num_bits=16,
                algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
            )
    elif precision == "int8-dynamic":
        engine.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        if calibration is None:
            raise UsageError("int8 needs calibration data", "pass --calib FILE.npz|DIR|file.py:loader")
        used = static_int8_settings(calibration.spec)
        engine.load_quantization_recipe(static_int8_recipe(used))
    ranges = None
    if engine.need_calibration:
        assert calibration is not None, "only int8 needs calibration"
        ranges = _calibrate(source, engine, calibration_feeds(calibration, inputs))
    engine.quantize(ranges, enable_progress_report=False).export_model(str(destination), overwrite=True)
    return QuantizeSummary(
        precision=precision,
        tool=f"ai-edge-quantizer {version('ai-edge-quantizer')}",
        method=_METHODS[precision],
        settings=used,
        seconds=time.perf_counter() - start,
        ir="tflite",
    )


def calibration_feeds(calibration: CalibrationData, inputs: Sequence[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """The calibration rows in the layout of `inputs`, batched at their batch size, in 32-bit types (TFLite
    narrows 64-bit I/O)."""
    import numpy as np

    specs = list(inputs)
    narrow = {np.dtype(np.int64): np.int32, np.dtype(np.float64): np.float32}
    return [
        {name: a.astype(narrow.get(a.dtype, a.dtype)) for name, a in batch.items()}
        for batch in calibration.in_layout(specs).batches(specs)
    ]


def static_int8_settings(spec: CalibrationSpec | None) -> dict[str, Any]:
    """What ai_edge_quantizer can do of a calibration spec: per-channel or per-tensor int8 weights (symmetric:
    TFLite kernels take no other), symmetric or asymmetric int8 activations (asymmetric by default: LiteRT's
    usual int8 scheme), and min/max ranges, the only activation calibration it has."""
    from kiln.compiler.quantization.calibration import CalibrationSpec

    spec = spec or CalibrationSpec()
    return {
        "method": "minmax",
        "method_asked": spec.method,
        "per_channel": spec.per_channel,
        "symmetric_activations": bool(spec.symmetric_activations),
    }


def static_int8_recipe(settings: dict[str, Any]) -> Any:
    """The ai_edge_quantizer recipe for full-integer int8 with these settings (from `static_int8_settings`)."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    granularity = qtyping.QuantGranularity.TENSORWISE
    if settings["per_channel"]:
        granularity = qtyping.QuantGranularity.CHANNELWISE
    manager = recipe_manager.RecipeManager()
    manager.add_quantization_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        op_config=qtyping.OpQuantizationConfig(
            activation_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=8, symmetric=settings["symmetric_activations"]
            ),
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=8, symmetric=True, granularity=granularity),
            compute_precision=qtyping.ComputePrecision.INTEGER,
            explicit_dequantize=False,
        ),
        algorithm_key=algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT,
    )
    return manager.get_quantization_recipe()


def _calibrate(source: Path, engine: Any, calibration: list[dict[str, np.ndarray]]) -> Any:
    """Activation ranges as the min and max over every calibration sample, as ONNX Runtime's and NNCF's minmax
    compute them (`Quantizer.calibrate` would take a moving average of per-sample ranges instead)."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(engine.get_quantization_recipe())
    calib = calibrator.Calibrator(
        str(source), num_threads=CALIBRATION_THREADS, qsv_update_func=qsv_utils.min_max_update
    )
    calib.calibrate({SIGNATURE: calibration}, manager)
    return calib.get_model_qsvs()


def quantize_tflite_weights(source: Path, destination: Path, spec: WeightOnlySpec) -> QuantizeSummary:
    """Write the float32 `.tflite` `source` (every signature of it) with int8 weights to `destination`, by
    ai-edge-quantizer's weight-only recipe: symmetric int8 per output channel (TFLite kernels take no other), the
    weights dequantized in the graph, compute in float. See kiln.compiler.quantization.weight_only."""
    from importlib.metadata import version

    from ai_edge_quantizer import qtyping, quantizer

    if spec.bits != 8 or not spec.symmetric:
        raise UsageError(
            f"LiteRT weight-only quantization takes int8 sym weights, not {spec.precision} "
            f"{'sym' if spec.symmetric else 'asym'}",
            "use --precision int8 without --weights asym for tflite",
        )
    start = time.perf_counter()
    engine = quantizer.Quantizer(str(source))
    engine.add_weight_only_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        num_bits=spec.bits,
        granularity=qtyping.QuantGranularity.CHANNELWISE,
    )
    engine.quantize(enable_progress_report=False).export_model(str(destination), overwrite=True)
    return QuantizeSummary(
        precision=spec.precision,
        tool=f"ai-edge-quantizer {version('ai-edge-quantizer')} (weight-only recipe)",
        method="weights-only",
        settings={**spec.to_dict(), "granularity": "per output channel", "compute": "float (explicit dequantize)"},
        seconds=round(time.perf_counter() - start, 3),
        ir="tflite",
    )
