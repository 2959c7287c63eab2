"""Fusion and cleanup of the ONNX graph, with `onnxscript`'s optimizer and rewrite rules where they are good.

What fires where (the dynamo exporter already runs `onnxscript.optimizer` when it lowers a capture, so
on Kiln's own captures the -O1/-O2 rules mostly find nothing left to do; they earn their place on
`.onnx` sources from other exporters and on models that spell out LayerNorm or GELU by hand):
- constant-folding, no-op-elimination, conv-batchnorm-folding, matmul-add-to-gemm,
  transpose-reshape-cancellation: `.onnx` sources (TorchScript exporter, tf2onnx, ...);
- layer-norm-fusion, gelu-fusion: hand-written LayerNorm / GELU (`(x - mean) / sqrt(var + eps)`,
  `0.5 * x * (1 + erf(x / sqrt 2))`, GPT-2's tanh GELU), which the exporter leaves as arithmetic;
- ort-transformer-fusion (-O3, ONNX Runtime only): attention, skip-LayerNorm and bias-GELU of the zoo's
  transformer and decoder, into `com.microsoft` ops that ONNX Runtime's own session optimizer does not
  form from these graphs.
Conv+Add+Relu is not fused here: ONNX Runtime (FusedConv / NCHWc Conv with sum) and OpenVINO fuse it
when they load the model, and ONNX has no standard op for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from kiln.passes.base import CLEANUP, FUSION, ONNX, TARGET_SPECIFIC, Pass, PassResult
from kiln.passes.subgraphs import eliminate_identities, pinned_subgraph_outputs

LAYER_NORM_OPSET = 18  # LayerNormalization is opset 17; the rules match ReduceMean with axes as an input (18)
GELU_OPSET = 20  # the ONNX Gelu op


def onnx_opset(model: Any) -> int:
    """The default-domain opset the model imports (0 if none)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _rewrite(rules: Callable[[], Sequence[Any]], min_opset: int = 0) -> Callable[[Any], PassResult]:
    """A pass applying onnxscript rewrite rules (made by `rules`, imported lazily), in either operand order."""

    def run(model: Any) -> PassResult:
        if onnx_opset(model) < min_opset:
            return PassResult(model, False)
        from onnxscript.rewriter import pattern

        before = _nodes(model)
        with pinned_subgraph_outputs(model) as pinning:
            count = pattern.RewriteRuleSet(list(rules()), commute=True).apply_to_model(model)
        # the rewriter may also drop nodes left unused by earlier passes: that changes the graph too
        return PassResult(model, pinning.judge(count > 0 or _nodes(model) != before))

    return run


def _fold_constants(model: Any) -> PassResult:
    from onnxscript.optimizer import fold_constants

    with pinned_subgraph_outputs(model) as pinning:
        modified = bool(fold_constants(model).modified)
    return PassResult(model, pinning.judge(modified))


def _no_op_elimination(model: Any) -> PassResult:
    """Dropout at inference, x+0, x*1, x/1, same-type Cast, no-op Expand/Transpose: replaced by their input."""
    dropouts = _remove_inference_dropouts(model)
    rewritten = _rewrite(_no_op_rules)(model).changed
    if dropouts or rewritten:
        eliminate_identities(model)  # the rules leave Identity nodes behind
    return PassResult(model, dropouts > 0 or rewritten)


def _remove_inference_dropouts(model: Any) -> int:
    """Wire each inference-mode Dropout's input through (its mask unused, not itself a graph output)."""
    import onnx_ir as ir

    outputs = set(model.graph.outputs)
    removed = 0
    for node in [n for n in model.graph if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")]:
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None and (training.const_value is None or bool(training.const_value.numpy())):
            continue
        if any(o.uses() for o in node.outputs[1:]) or node.outputs[0] in outputs:
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        model.graph.remove(node, safe=True)
        removed += 1
    return removed


def _no_op_rules() -> list[Any]:
    from onnxscript.rewriter.rules import common

    return [
        common.dropout_inference_rule,
        common.dropout_zero_rule,
        common.add_0_rule,
        common.sub_0_rule,
        common.mul_by_1_rule,
        common.div_by_1_rule,
        common.no_op_cast_rule,
        common.no_op_expand_rule,
        common.no_op_transpose_rule,
    ]


def _batchnorm_rules() -> list[Any]:
    from onnxscript.rewriter.rules import common

    return [
        common.fuse_batchnorm_into_conv_rule,
        common.fuse_batchnorm_into_conv_transpose_rule,
        common.fuse_batchnorm_into_gemm_rule,
    ]


def _gemm_rules() -> list[Any]:
    from onnxscript.rewriter.rules import common

    return [
        common.matmul_add_to_gemm_rule,
        common.transpose_a_matmul_add_to_gemm_rule,
        common.transpose_b_matmul_add_to_gemm_rule,
        common.transpose_ab_matmul_add_to_gemm_rule,
    ]


def _reshape_transpose_rules() -> list[Any]:
    from onnxscript.rewriter.rules import common

    return [
        common.transpose_transpose_rule,
        common.reshape_reshape_rule,
        common.unsqueeze_unsqueeze_rule,
        common.squeeze_reshape_1d_rule,
        common.flatten_to_reshape_rule,
    ]


def _layer_norm_rules() -> list[Any]:
    from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_rules

    return list(layer_normalization_rules)


def _gelu_rules() -> list[Any]:
    """Erf GELU and tanh GELU, as written out by hand in the usual groupings, to the ONNX Gelu op."""
    from onnxscript.rewriter import pattern

    sqrt_2_over_pi = math.sqrt(2.0 / math.pi)

    def erf_term(op: Any, x: Any) -> Any:
        return op.Add(op.Erf(pattern.OrValue([op.Div(x, math.sqrt(2.0)), op.Mul(x, 1.0 / math.sqrt(2.0))])), 1.0)

    def tanh_term(op: Any, x: Any) -> Any:
        cube = pattern.OrValue([op.Pow(x, 3.0), op.Mul(op.Mul(x, x), x)])
        return op.Add(op.Tanh(op.Mul(op.Add(x, op.Mul(cube, 0.044715)), sqrt_2_over_pi)), 1.0)

    def groupings(term: Callable[[Any, Any], Any]) -> list[Callable[[Any, Any], Any]]:
        return [
            lambda op, x: op.Mul(op.Mul(x, term(op, x)), 0.5),  # (x * t) * 0.5
            lambda op, x: op.Mul(op.Mul(x, 0.5), term(op, x)),  # (0.5 * x) * t
            lambda op, x: op.Mul(x, op.Mul(term(op, x), 0.5)),  # x * (0.5 * t)
        ]

    def gelu(approximate: str) -> Callable[[Any, Any], Any]:
        return lambda op, x: op.Gelu(x, approximate=approximate)

    return [pattern.RewriteRule(p, gelu("none")) for p in groupings(erf_term)] + [
        pattern.RewriteRule(p, gelu("tanh")) for p in groupings(tanh_term)
    ]


def _ort_transformer_fusion(model: Any) -> PassResult:
    """onnxscript's ONNX Runtime fusions: attention (MultiHeadAttention), SkipLayerNormalization, BiasGelu..."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    before = _nodes(model)
    with pinned_subgraph_outputs(model) as pinning:
        model, counts = optimize_for_ort(model)
    return PassResult(model, pinning.judge(any(counts.values()) or _nodes(model) != before))


def _nodes(model: Any) -> list[int]:
    """The identity of every node of the main graph, in order: rewrites make new nodes."""
    return [id(node) for node in model.graph]


PASSES = [
    Pass(
        "constant-folding",
        "compute at export time what depends on constants only",
        ONNX,
        CLEANUP,
        _fold_constants,
    ),
    Pass(
        "no-op-elimination",
        "remove Dropout at inference, x+0, x*1, x/1, same-type Cast, no-op Expand and Transpose",
        ONNX,
        CLEANUP,
        _no_op_elimination,
    ),
    Pass(
        "conv-batchnorm-folding",
        "fold BatchNormalization into the weights of the Conv, ConvTranspose or Gemm before it",
        ONNX,
        FUSION,
        _rewrite(_batchnorm_rules),
    ),
    Pass(
        "matmul-add-to-gemm",
        "2-d MatMul followed by a bias Add (and transposes of its operands) to one Gemm",
        ONNX,
        FUSION,
        _rewrite(_gemm_rules),
    ),
    Pass(
        "layer-norm-fusion",
        "LayerNorm written as mean/variance arithmetic to one LayerNormalization (opset >= 18)",
        ONNX,
        FUSION,
        _rewrite(_layer_norm_rules, LAYER_NORM_OPSET),
    ),
    Pass(
        "gelu-fusion",
        "GELU written as erf or tanh arithmetic to one Gelu (opset >= 20)",
        ONNX,
        FUSION,
        _rewrite(_gelu_rules, GELU_OPSET),
    ),
    Pass(
        "transpose-reshape-cancellation",
        "merge Transpose pairs, Reshape pairs, Unsqueeze pairs; Flatten to Reshape",
        ONNX,
        FUSION,
        _rewrite(_reshape_transpose_rules),
    ),
    Pass(
        "ort-transformer-fusion",
        "attention, skip-LayerNorm and bias-GELU to ONNX Runtime's com.microsoft kernels",
        ONNX,
        TARGET_SPECIFIC,
        _ort_transformer_fusion,
        targets=("onnx",),
    ),
]
