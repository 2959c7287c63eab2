"""OpenVINO int8 through NNCF, driven by Kiln's one calibration spec.

- `int8`: post-training quantization (`nncf.quantize`) calibrated on `CalibrationData`: FakeQuantize
  on activations and weights, which the CPU plugin runs as int8 kernels.
- `int8-dynamic`: weights-only int8 (`nncf.compress_weights`, INT8_ASYM); activations stay float.
- text generation at `int8`/`int4`: weights-only, as the spec of kiln.compiler.quantization.weight_only says
  (`compress_openvino_weights`).

How `CalibrationSpec` maps onto NNCF:
- `method`: minmax -> global min/max of the calibration batches (`RangeEstimatorParametersSet.MINMAX`, like
  ONNX Runtime's MinMax; NNCF's own default averages the per-batch extremes instead); percentile -> per-batch
  0.01%/99.99% quantiles, averaged (`MEAN_QUANTILE`); entropy -> NNCF has no KL-divergence estimator: the
  nearest is `HISTOGRAM` (a histogram search for the range that minimizes the L2 quantization error, like
  PyTorch's HistogramObserver), and the summary says so.
- `per_channel`: per-channel (per output channel) or per-tensor weight scales.
- `symmetric_activations`: True -> symmetric activations (preset PERFORMANCE), False -> asymmetric (MIXED);
  None -> PERFORMANCE, but MIXED for graphs with attention (NNCF's own choice per model type). Symmetric
  activations are the CPU plugin's fast path with VNNI and without it (no zero-point compensation in the int8
  kernels) and lose nothing on ReLU-like outputs, which NNCF quantizes as unsigned [0, max]; attention and
  GELU/LayerNorm outputs are signed and skewed, where asymmetric ranges keep the zoo decoder within tolerance.
- `model_type=TRANSFORMER` when the graph has attention (a Softmax and a MatMul of two computed tensors): NNCF
  then leaves its transformer patterns in float (LayerNorm, Softmax paths), quantizes MatMuls of two
  activations symmetrically and applies SmoothQuant to MatMuls with weights.
- Weights are 8-bit symmetric with NNCF's overflow fix on the first layer: CPUs without VNNI (AVX2, like
  this machine) multiply u8 x s8 pairs with 16-bit saturation, which 7-bit first-layer weights avoid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.quantization.summary import QuantizeSummary

if TYPE_CHECKING:
    import openvino as ov
    from kiln.compiler.quantization.calibration import CalibrationData
    from kiln.compiler.quantization.weight_only import WeightOnlySpec
    from kiln.compiler.types import TensorSpec

QUANTIZED_PRECISIONS = ("int8", "int8-dynamic")
# Ops whose weights are quantized (the ones NNCF puts FakeQuantize on, or compresses the weights of).
WEIGHTED_OPS = frozenset(
    {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul"}
)
# Ops a quantized tensor passes through on its way to a weighted op (weight decompression, reshapes).
_PASS_THROUGH = frozenset({"Convert", "Reshape", "Transpose", "Subtract", "Multiply", "Unsqueeze", "Squeeze"})
LOW_BIT_TYPES = ("i8", "u8", "i4", "u4", "i2", "u2")  # the element types of quantized (compressed) weights
RANGE_ESTIMATORS = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}
ENTROPY_NOTE = (
    "calibration method entropy: NNCF has no KL-divergence (entropy) estimator; used its HISTOGRAM estimator, "
    "the range minimizing the L2 quantization error on a histogram of the calibration activations"
)


def quantize_openvino(
    ov_model: ov.Model,
    precision: str,
    calibration: CalibrationData | None,
    exclude: Sequence[str] = (),
) -> tuple[ov.Model, QuantizeSummary]:
    """`ov_model` quantized to `precision` (int8: calibrated on `calibration`; int8-dynamic: int8 weights only),
    keeping the ops of the ONNX nodes named in `exclude` in float; returns the model and what was done."""
    import nncf

    if precision not in QUANTIZED_PRECISIONS:
        raise UsageError(f"OpenVINO quantization to {precision} is not supported", "use int8 or int8-dynamic")
    if precision == "int8" and calibration is None:
        raise UsageError("int8 needs calibration data", "pass --calib FILE.npz|DIR|file.py:loader")
    ignored = ops_for_onnx_nodes(ov_model, exclude)
    scope = nncf.IgnoredScope(names=ignored) if ignored else None
    start = time.perf_counter()
    with _nncf_quiet():
        if calibration is not None and precision == "int8":
            quantized, settings, notes = _quantize_static(ov_model, calibration, scope)
            method, per_channel = calibration.spec.method, calibration.spec.per_channel
            symmetric: bool | None = settings["preset"] == "performance"
        else:
            # INT8_ASYM: a zero point per output channel costs nothing in the CPU plugin's weight
            # decompression and fits skewed weight rows better than symmetric scales.
            mode = nncf.CompressWeightsMode.INT8_ASYM
            # compress_weights changes the model in place; nncf.quantize returns a new one.
            quantized = nncf.compress_weights(ov_model.clone(), mode=mode, ignored_scope=scope)
            settings, notes = {"mode": str(mode.value)}, ()
            method, per_channel, symmetric = "weights-only", True, None
    seconds = time.perf_counter() - start
    states = weighted_op_states(quantized)
    return quantized, QuantizeSummary(
        precision=precision,
        tool=f"nncf {nncf.__version__}",
        method=method,
        settings={"per_channel": per_channel, "symmetric_activations": symmetric, **settings},
        nodes_before=len(ov_model.get_ordered_ops()),
        nodes_after=len(quantized.get_ordered_ops()),
        quantized=sum(states.values()),
        kept_float=tuple(name for name, q in states.items() if not q),
        excluded=tuple(exclude),
        seconds=round(seconds, 3),
        notes=tuple(notes),
        ir="openvino",
    )


@contextmanager
def _nncf_quiet() -> Iterator[None]:
    """NNCF's INFO log lines off while it runs (warnings still shown); its level restored after."""
    from nncf.common.logging import nncf_logger
    from nncf.common.logging.logger import set_log_level

    level = nncf_logger.level
    set_log_level(logging.WARNING)
    try:
        yield
    finally:
        set_log_level(level)


def _quantize_static(
    ov_model: ov.Model, calibration: CalibrationData, scope: Any
) -> tuple[ov.Model, dict[str, Any], tuple[str, ...]]:
    """nncf.quantize with the spec's settings; the model, the NNCF settings used and notes."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    spec = calibration.spec
    transformer = has_attention(ov_model)
    symmetric = not transformer if spec.symmetric_activations is None else spec.symmetric_activations
    preset = nncf.QuantizationPreset.PERFORMANCE if symmetric else nncf.QuantizationPreset.MIXED
    estimator = RANGE_ESTIMATORS[spec.method]
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=spec.per_channel),
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, estimator),
    )
    batches = calibration.batches(model_inputs(ov_model))
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset(batches),
        preset=preset,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(batches),
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        ignored_scope=scope,
        advanced_parameters=advanced,
    )
    settings = {
        "preset": str(preset.value),
        "model_type": "transformer" if transformer else "default",
        "activations_range_estimator": estimator,
        "weights_range_estimator": "MINMAX",
        "target_device": "CPU",
        "subset_size": len(batches),
        "overflow_fix": "first_layer",
        "fast_bias_correction": True,
    }
    return quantized, settings, (ENTROPY_NOTE,) if spec.method == "entropy" else ()


def model_inputs(ov_model: ov.Model) -> list[TensorSpec]:
    """The model's inputs as TensorSpecs (static dims as ints, dynamic ones as names)."""
    from kiln.compiler.types import TensorSpec

    specs = []
    for port in ov_model.inputs:
        shape = tuple(d.get_length() if d.is_static else f"d{i}" for i, d in enumerate(port.get_partial_shape()))
        specs.append(TensorSpec(port.get_any_name(), shape, port.get_element_type().to_dtype().name))
    return specs


def has_attention(ov_model: ov.Model) -> bool:
    """Whether the graph has attention: a Softmax and a MatMul of two computed (non-constant) tensors."""
    ops = ov_model.get_ordered_ops()
    softmax = any(op.get_type_name() in ("Softmax", "ScaledDotProductAttention") for op in ops)
    return softmax and any(
        op.get_type_name() == "MatMul" and not any(_is_constant(op.input_value(i).get_node()) for i in range(2))
        for op in ops
    )


def _is_constant(node: Any) -> bool:
    """Whether `node` is a constant, possibly behind a Convert/Reshape (decompression)."""
    for _ in range(4):
        if node.get_type_name() == "Constant":
            return True
        if node.get_type_name() not in _PASS_THROUGH:
            return False
        node = node.input_value(0).get_node()
    return False


def ops_for_onnx_nodes(ov_model: ov.Model, names: Sequence[str]) -> list[str]:
    """The OpenVINO op names that the ONNX nodes `names` became, for an NNCF IgnoredScope.

    OpenVINO's ONNX frontend names an op after the ONNX node it comes from; a node it splits keeps its name on
    the last op and names the others `NAME/...` (Conv with a bias: `NAME/WithoutBiases` + the bias Add `NAME`).
    A node whose output is a graph output may be renamed after that output, so output tensor names match too.
    """
    ops = ov_model.get_ordered_ops()
    found: list[str] = []
    for name in names:
        matches = [
            op.get_friendly_name()
            for op in ops
            if op.get_friendly_name() == name
            or op.get_friendly_name().startswith(name + "/")
            or any(name in out.get_names() for out in op.outputs())
        ]
        matches = [m for m in matches if not m.endswith("/sink_port_0")]  # Result ops are not quantized
        if not matches:
            raise UsageError(f"cannot exclude {name} from quantization: the model has no such ONNX node")
        found += [m for m in matches if m not in found]
    return found


def weighted_op_states(ov_model: ov.Model) -> dict[str, bool]:
    """Each weighted op (Convolution, MatMul...) by name: True when an input of it is quantized (FakeQuantize on
    its activations or weights, or int8 weights), False when it computes in float."""
    return {
        op.get_friendly_name(): any(_quantized_source(op.input_value(i).get_node()) for i in range(op.get_input_size()))
        for op in ov_model.get_ordered_ops()
        if op.get_type_name() in WEIGHTED_OPS
    }


def _quantized_source(node: Any, depth: int = 4) -> bool:
    """Whether `node` is a FakeQuantize or a low-bit constant, possibly behind decompression/reshape ops."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return node.get_element_type().get_type_name() in LOW_BIT_TYPES
    if kind not in _PASS_THROUGH or depth == 0:
        return False
    return any(_quantized_source(node.input_value(i).get_node(), depth - 1) for i in range(node.get_input_size()))


def compress_openvino_weights(
    ov_model: ov.Model,
    spec: WeightOnlySpec,
    keep_float: Sequence[str] = (),
    keep_8bit: Sequence[str] = (),
) -> tuple[ov.Model, QuantizeSummary]:
    """A copy of `ov_model` with its weights compressed by `nncf.compress_weights` as `spec` says (INT8_SYM/ASYM
    per channel; INT4_SYM/ASYM in groups of `spec.group_size`, every layer but the embeddings and the LM head, which
    NNCF keeps in 8 bits, its default for 4-bit modes). The ops of the ONNX nodes `keep_float` stay float, those of
    `keep_8bit` take 8 bits. A group size that does not divide a layer's input channels is adjusted for that layer
    (NNCF's ADJUST fallback: the largest divisor from 32 on, else 8 bits). See
    kiln.compiler.quantization.weight_only."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    float_ops, eight_ops = ops_for_onnx_nodes(ov_model, keep_float), ops_for_onnx_nodes(ov_model, keep_8bit)
    start, model = time.perf_counter(), ov_model.clone()
    with _nncf_quiet():
        extra: dict[str, Any] = {}
        if spec.bits < spec.head_bits:
            extra = {
                "group_size": spec.group_size,
                "ratio": 1.0,
                "all_layers": False,
                "backup_mode": nncf.BackupMode.INT8_SYM if spec.symmetric else nncf.BackupMode.INT8_ASYM,
                "advanced_parameters": AdvancedCompressionParameters(
                    group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
                ),
            }
        skipped = [*float_ops, *eight_ops]
        scope = nncf.IgnoredScope(names=skipped, validate=False) if skipped else None
        model = nncf.compress_weights(model, mode=_compress_mode(spec), ignored_scope=scope, **extra)
        if eight_ops:  # then those in 8 bits, every other layer (already compressed) ignored
            others = [n for n in weighted_op_states(model) if n not in eight_ops]
            eight = replace(spec, bits=spec.head_bits)
            scope = nncf.IgnoredScope(names=others, validate=False)
            model = nncf.compress_weights(model, mode=_compress_mode(eight), ignored_scope=scope)
    states = weighted_op_states(model)
    return model, QuantizeSummary(
        precision=spec.precision,
        tool=f"nncf {nncf.__version__} compress_weights",
        method="weights-only",
        settings={**spec.to_dict(), "mode": str(_compress_mode(spec).value), "int8_layers": eight_ops},
        nodes_before=len(ov_model.get_ordered_ops()),
        nodes_after=len(model.get_ordered_ops()),
        quantized=sum(states.values()),
        kept_float=tuple(name for name, q in states.items() if not q),
        excluded=tuple(keep_float),
        seconds=round(time.perf_counter() - start, 3),
        ir="openvino",
    )


def _compress_mode(spec: WeightOnlySpec) -> Any:
    """NNCF's CompressWeightsMode for a spec (INT2_SYM only for the gate's planted-bug tests)."""
    import nncf

    name = f"INT{spec.bits}_{'SYM' if spec.symmetric else 'ASYM'}"
    mode = getattr(nncf.CompressWeightsMode, name, None)
    if mode is None:
        raise UsageError(f"NNCF has no {spec.precision} {'sym' if spec.symmetric else 'asym'} weight compression")
    return mode
