"""Graph passes over the ONNX graph (onnx_ir), and the pipeline that runs them.

A pass is a small named unit: it takes an `onnx_ir.Model` and returns a `PassResult`
(the model, and whether it changed anything), the way `onnx_ir.passes` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

    from compiler.types import PassRecord


@dataclass(frozen=True)
class GraphPass:
    """A named transformation of an ONNX IR model."""

    name: str
    description: str
    make: Callable[[], Callable[[ir.Model], object]]

    def __call__(self, model: ir.Model) -> tuple[ir.Model, bool]:
        """Run the pass: the new model and whether it changed."""
        result = self.make()(model)
        return result.model, bool(result.modified)  # type: ignore[attr-defined]


def _identity_elimination() -> Callable[[ir.Model], object]:
    from onnx_ir.passes.common import IdentityEliminationPass

    return IdentityEliminationPass()


def _dead_node_elimination() -> Callable[[ir.Model], object]:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    return RemoveUnusedNodesPass()


def _common_subexpression_elimination() -> Callable[[ir.Model], object]:
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass

    return CommonSubexpressionEliminationPass()


def _deduplicate_initializers() -> Callable[[ir.Model], object]:
    from onnx_ir.passes.common import DeduplicateInitializersPass

    return DeduplicateInitializersPass()


PASSES: dict[str, GraphPass] = {
    p.name: p
    for p in [
        GraphPass("identity-elimination", "remove Identity nodes, wiring their input through", _identity_elimination),
        GraphPass("deduplicate-initializers", "share identical constant tensors", _deduplicate_initializers),
        GraphPass(
            "common-subexpression-elimination",
            "merge nodes that compute the same thing",
            _common_subexpression_elimination,
        ),
        GraphPass("dead-node-elimination", "remove nodes whose outputs nothing uses", _dead_node_elimination),
    ]
}

DEFAULT_PIPELINE: tuple[str, ...] = tuple(PASSES)


def count_nodes(model: ir.Model) -> int:
    """Number of nodes in the main graph."""
    return sum(1 for _ in model.graph)


def run_pipeline(source: Path, destination: Path, pipeline: Sequence[GraphPass]) -> list[PassRecord]:
    """Run `pipeline` over the ONNX file `source`, write the result to `destination`, record each pass."""
    import onnx_ir as ir

    from compiler.types import PassRecord

    model = ir.load(str(source))
    records = []
    for graph_pass in pipeline:
        before, started = count_nodes(model), time.perf_counter()
        model, changed = graph_pass(model)
        records.append(
            PassRecord(graph_pass.name, changed, before, count_nodes(model), round(time.perf_counter() - started, 4))
        )
    large = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) > 2**30
    if large:
        ir.save(model, str(destination), external_data=destination.name + ".data")
    else:
        # Pull weights that lived in the source's external files into the new self-contained file.
        ir.save(ir.external_data.load_to_model(model), str(destination))
    return records
