"""Quantization: int8 (calibrated or weights-only) and fp16 versions of a model, one calibration spec for every
toolchain, the per-layer error report and the accuracy-aware `--max-drop` search.

Why it lives in `compiler/` and not in `passes/`: quantization is a build-time step that a target calls on its
own toolchain's format (an ONNX graph for ONNX Runtime, an OpenVINO model for NNCF, a `.tflite` for
ai-edge-quantizer), driven by calibration data. It is not a rewrite of Kiln's shared graph that every target
sees. Targets import this package; it never imports a target module (`kiln.targets.base` interfaces only): what it
needs from a runtime, such as a runner for a candidate model, the target passes in.

Modules:
- `calibration`: `CalibrationSpec` (--calib, --calib-method...), `CalibrationData` and its loader,
  `AccuracyBudget` (--max-drop);
- `summary`: `QuantizeSummary`, what every quantizer returns;
- `onnxrt`: ONNX Runtime Q/DQ int8, weights-only int8 and fp16 (`quantize_onnx`);
- `openvino`: NNCF for OpenVINO (`quantize_openvino`);
- `litert`: ai-edge-quantizer for LiteRT (`quantize_tflite`);
- `pt2e`: PT2E with ExecuTorch's XNNPACK quantizer on the FX program (`quantize_pt2e`), its per-layer report
  (`pt2e_report`) and its `--max-drop` driver (`accuracy_aware_pt2e`);
- `report` (with `qdq_graph`): the per-layer error report of a Q/DQ graph (`quant_report.json`);
- `accuracy`: the `--max-drop` search (`accuracy_aware`) and its ONNX and OpenVINO drivers.

The interface every per-toolchain quantizer follows:

    quantize_<toolchain>(source, [destination,] precision, calibration, [exclude]) -> QuantizeSummary

`source` is the float model (a path, or the toolchain's in-memory model, which is then returned with the
summary); `precision` is one of the toolchain's quantized precisions; `calibration` is a `CalibrationData`
(None where the precision needs none); `exclude` names the layers (ONNX node names; FX node names for PT2E) kept
in float, for the toolchains that can (ONNX Runtime, NNCF, PT2E). PT2E's source is the `torch.export` program, which
it re-exports quantized (so it also takes the inputs' specs and dynamic dims, and returns the converted module its
report reads). Bad requests raise `kiln.compiler.errors.UsageError`.
"""
