"""Every ONNX pass over graphs with subgraphs (Loop, If, Scan, and nn.EmbeddingBag's Loop): still valid,
same outputs (issue 14: identity elimination made a Loop body return an outer-scope value, which ONNX
Runtime refuses)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from kiln.compiler.capture.program import CapturedModel, capture
from kiln.compiler.capture.sources import from_module
from kiln.compiler.export.options import ExportOptions, ParityOptions, PassOptions
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.ort_session import ort_session
from kiln.passes import PASSES, PassAdjustments, pipeline_for, run_pipeline
from kiln.passes.base import ONNX
from kiln.passes.subgraphs import eliminate_identities

from tests.models import subgraphs

ONNX_PASSES = [name for name, p in PASSES.items() if p.ir == ONNX]
HAND_BUILT: dict[str, Callable[[], onnx.ModelProto]] = {
    "loop": subgraphs.loop_model,
    "if": subgraphs.if_model,
    "scan": subgraphs.scan_model,
}


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(proto.SerializeToString()).run(None, feeds)


def _assert_valid_and_same(before: onnx.ModelProto, after: ir.Model, feeds: list[dict[str, np.ndarray]]) -> None:
    proto = ir.to_proto(after)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == [o.name for o in before.graph.output]
    assert [i.name for i in proto.graph.input] == [i.name for i in before.graph.input]
    for feed in feeds:
        for expected, got in zip(_run(before, feed), _run(proto, feed), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _hand_feeds(proto: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    return [subgraphs.feeds(proto, seed) for seed in (0, 1)]  # seed 0 takes If's then-branch, 1 the else


@pytest.mark.parametrize("name", ONNX_PASSES)
@pytest.mark.parametrize("model", HAND_BUILT)
def test_each_pass_keeps_subgraph_models_valid(model, name):
    proto = HAND_BUILT[model]()
    onnx.checker.check_model(proto, full_check=True)
    graph, _ = PASSES[name](ir.from_proto(proto))
    _assert_valid_and_same(proto, graph, _hand_feeds(proto))


@pytest.mark.parametrize("model", HAND_BUILT)
def test_whole_pipeline_keeps_subgraph_models_valid(model):
    proto = HAND_BUILT[model]()
    graph, records = run_pipeline(ir.from_proto(proto), pipeline_for(ONNX, "onnx", level=3))
    assert any(r.changed for r in records)
    _assert_valid_and_same(proto, graph, _hand_feeds(proto))


def test_identity_elimination_keeps_only_the_identities_a_subgraph_needs():
    model = ir.from_proto(subgraphs.loop_model())
    assert eliminate_identities(model) == 2  # t2_id in the body, acc_id in the main graph
    loop = next(n for n in model.graph if n.op_type == "Loop")
    body = loop.attributes["body"].as_graph()
    kept = {str(n.outputs[0].name) for n in body if n.op_type == "Identity"}
    assert kept == {"cond_out", "outer_id"}  # a body input and an outer value, both returned by the body
    assert eliminate_identities(model) == 0


@pytest.fixture(scope="module")
def embedding_bag_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CapturedModel]:
    """nn.EmbeddingBag lowered with (captured) and without (raw, as at -O0) the exporter's optimizer."""
    root = tmp_path_factory.mktemp("embedding-bag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            variant: capture(from_module(*subgraphs.embedding_bag()), None, root / variant, True, optimize)
            for variant, optimize in (("captured", True), ("raw", False))
        }


def _bag_feeds() -> list[dict[str, np.ndarray]]:
    _, (indices, offsets) = subgraphs.embedding_bag()
    return [
        {"input": indices.numpy(), "offsets": offsets.numpy()},
        {"input": np.arange(10, dtype=np.int64) % 20, "offsets": np.array([0, 1, 9], dtype=np.int64)},
    ]


# onnxscript's optimize_for_ort re-infers the Loop's types and gives its sequence output a tensor type,
# which onnx.checker and ONNX Runtime refuse: run_pipeline rolls it back (found with this model).
KNOWN_BROKEN = {"ort-transformer-fusion"}


@pytest.mark.parametrize("variant", ["captured", "raw"])
def test_every_pass_keeps_the_embedding_bag_loop_valid(embedding_bag_graphs, variant):
    path = embedding_bag_graphs[variant].onnx_path
    assert path is not None
    proto = onnx.load(str(path))
    assert any(n.op_type == "Loop" for n in proto.graph.node)
    for name in ONNX_PASSES:
        graph, (record,) = run_pipeline(ir.load(str(path)), [PASSES[name]])
        assert record.rolled_back is None or name in KNOWN_BROKEN, record
        _assert_valid_and_same(proto, graph, _bag_feeds())
    graph, records = run_pipeline(ir.load(str(path)), pipeline_for(ONNX, "onnx", level=3))
    assert {r.name for r in records if r.rolled_back} <= KNOWN_BROKEN, records
    _assert_valid_and_same(proto, graph, _bag_feeds())


def test_a_pass_that_breaks_the_loop_is_rolled_back(embedding_bag_graphs):
    """ort-transformer-fusion on the EmbeddingBag Loop: the pipeline goes on with the graph before it."""
    path = embedding_bag_graphs["captured"].onnx_path
    assert path is not None
    graph, (record,) = run_pipeline(ir.load(str(path)), [PASSES["ort-transformer-fusion"]])
    assert record.rolled_back is not None and "onnx.checker" in record.rolled_back
    assert not record.changed and record.nodes_after == record.nodes_before
    _assert_valid_and_same(onnx.load(str(path)), graph, _bag_feeds())


def test_embedding_bag_exports_with_identity_elimination(tmp_path: Path):
    """The issue's export: the raw graph (as at -O0) through identity elimination, then parity on ONNX Runtime."""
    torch.manual_seed(0)
    added = PassAdjustments(added=("identity-elimination",))
    # one parity set: random offsets would be invalid
    options = ExportOptions(passes=PassOptions(0, added), parity=ParityOptions(samples=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, inputs = subgraphs.embedding_bag()
        (result,) = export_targets(module, "onnx", tmp_path / "out", options, example_inputs=inputs)
    assert result.published
    record = next(r for r in result.manifest.passes if r.name == "identity-elimination")
    assert record.changed and record.rolled_back is None
