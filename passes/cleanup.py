"""-O1 cleanup of the ONNX graph with `onnx_ir`'s own passes: nothing is computed differently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.passes.base import CLEANUP, ONNX, Pass, PassResult, onnx_ir_pass
from kiln.passes.subgraphs import eliminate_identities


def _identity_elimination(model: Any) -> PassResult:
    """onnx_ir's IdentityEliminationPass wires an outer value through to a subgraph output: ours keeps those."""
    return PassResult(model, eliminate_identities(model) > 0)


def _dead_node_elimination() -> Callable[[Any], Any]:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    return RemoveUnusedNodesPass()


def _common_subexpression_elimination() -> Callable[[Any], Any]:
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass

    return CommonSubexpressionEliminationPass()


def _deduplicate_initializers() -> Callable[[Any], Any]:
    from onnx_ir.passes.common import DeduplicateInitializersPass

    return DeduplicateInitializersPass()


PASSES = [
    Pass(
        "identity-elimination",
        "remove Identity nodes, wiring their input through",
        ONNX,
        CLEANUP,
        _identity_elimination,
    ),
    Pass(
        "deduplicate-initializers",
        "share identical constant tensors",
        ONNX,
        CLEANUP,
        onnx_ir_pass(_deduplicate_initializers),
    ),
    Pass(
        "common-subexpression-elimination",
        "merge nodes that compute the same thing",
        ONNX,
        CLEANUP,
        onnx_ir_pass(_common_subexpression_elimination),
    ),
]

# Runs after fusion and layout, which leave the nodes they replaced unused.
FINAL = [
    Pass(
        "dead-node-elimination",
        "remove nodes whose outputs nothing uses",
        ONNX,
        CLEANUP,
        onnx_ir_pass(_dead_node_elimination),
    ),
]
